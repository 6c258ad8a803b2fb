"""Measuring a model: lm-eval tasks (perplexity, passkey, RULER data, DPE's needle), the lm-eval models for HF
checkpoints and GGUF files, the cached run engine, release gates and reports, and the fitness a search calls."""
