"""User-facing pipeline errors: one message naming the problem and the fix."""


class ConvertError(Exception):
    """A checkpoint, recipe or option the pipeline cannot use; the message says why and what to do."""
