"""Where outputs run: one small interface (``base.Runtime``: load, logits, generate, the keys it reads) with
transformers, llama.cpp, MLX-lm and DPE's attention behind it; ``readers`` models how vLLM, SGLang, ExLlamaV2 and
MLX-lm read a config.json."""
