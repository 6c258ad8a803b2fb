"""The pipeline's stages in the order they run (one list: the recipe schema, the run planner and the command line
read it)."""

STAGES = ("source", "factors", "bake", "train", "validate", "export", "verify")
