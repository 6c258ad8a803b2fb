"""Files: atomic writes and content digests, safetensors headers, the GGUF header reader, the tokenizer as GGUF keys,
the export manifest.  Imports nothing above ``convert.errors`` and ``convert.names``."""
