"""Defaults shared by the library and the command line (no torch import here)."""

DEFAULT_BINS = 360
# The paper's candidate set, in tie-break order.
DEFAULT_CANDIDATES: tuple[str, ...] = ("extrapolation", "interpolation")
BUILTIN_CANDIDATES: tuple[str, ...] = ("extrapolation", "interpolation", "ntk", "yarn", "llama3")
# The reference implementation starts every bin at float16's smallest normal number.
PSEUDO_COUNT = 2.0**-14
