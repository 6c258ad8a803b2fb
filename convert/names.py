"""The names the command line, the recipe schema and the pipeline share, one list per concept (no heavy imports, so
the command line reads them at start-up)."""

# the pipeline's stages in the order they run; validate comes after export, so it can measure the exported GGUFs
# (validate.outputs) as well as the HF checkpoint
STAGES = ("source", "factors", "bake", "train", "export", "validate", "verify")
# GGUF weight types `dprope export` / `export-gguf` write
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# where a GGUF carries the factors: rope_freqs.weight, or rope_factors_long/short.weight with rope.scaling.type
ROPE_LAYOUTS = ("freqs", "longrope")
