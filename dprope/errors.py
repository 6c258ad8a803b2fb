"""The one exception type the library raises for bad input."""


class DPRoPEError(ValueError):
    """Bad input to the DPRoPE computation; the message names the problem and the fix."""
