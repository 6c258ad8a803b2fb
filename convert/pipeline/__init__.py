"""Recipes (one validated schema) and `dprope run`: the run directory, the declarative stage table and the resume
records."""
