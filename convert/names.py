"""Every name the outputs, the command line, the recipe schema and the pipeline share: one list per concept, one
constant per file name (no heavy imports, so the command line reads them at start-up)."""

# the pipeline's stages in the order they run; validate comes after export, so it can measure the exported GGUFs
# (validate.outputs) as well as the HF checkpoint
STAGES = ("source", "factors", "bake", "train", "export", "validate", "verify")
# GGUF weight types `dprope export` / `export-gguf` write
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# where a GGUF carries the factors: rope_freqs.weight, or rope_factors_long/short.weight with rope.scaling.type
ROPE_LAYOUTS = ("freqs", "longrope")

# ---- files of a Hugging Face checkpoint (safetensors' own names: huggingface/transformers modeling_utils.py)
CONFIG_FILE = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# ---- files the bake writes beside the weights
FACTORS_FILE = "rope_factors.safetensors"  # long/short factors, inv_freq and base inv_freq (F32)
REPORT_FILE = "dprope_factors.json"  # the method's full result (dprope.DPRoPEResult.to_dict)
PLOT_FILE = "dprope_factors.png"
RECIPE_FILE = "dprope_recipe.yaml"  # the resolved parameters and the command that re-runs them
CARD_FILE = "README.md"  # the model card (convert/card.py owns its sections)
TRACE_JSON = "search_trace.json"  # a searched method's trace
TRACE_PNG = "search_trace.png"

# ---- files later stages add to a checkpoint or an export folder
VERIFY_FILE = "verify.json"
MANIFEST = "manifest.json"  # sha256 of every exported file and of the checkpoint it came from
PORTABLE_DIR = "hf-portable"  # the copy for runtimes that apply their own longrope temperature

# ---- a validation report
VALIDATION_JSON = "validation.json"
VALIDATION_MD = "validation.md"
VALIDATION_PNG = "validation.png"

# ---- a run directory (`dprope run`)
RUN_HF = "hf"
RUN_TRAINED = "trained"
RUN_VALIDATION = "validation"
RUN_EXPORT = "export"
RUN_FACTORS = "factors.json"
RUN_STAGES = ".stages"
RUN_SEARCH = "search"


def gguf_file_name(name: str, kind: str) -> str:
    """The file ``export_outputs`` writes for a GGUF type, or for ``base-quant``."""
    return f"{name}-{kind}.gguf"
