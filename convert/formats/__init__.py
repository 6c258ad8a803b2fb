"""Checkpoint formats: opening a source (HF directory, GGUF, hub cache), the Hugging Face form of an extension
(longrope config.json, factors tensor), GGUF export, and the portable HF copy."""
