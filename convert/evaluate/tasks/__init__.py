"""lm-eval task files of this project (registered with TaskManager(include_path=this folder))."""
