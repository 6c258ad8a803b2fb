"""lm-eval task files of this project (registered with TaskManager(include_path=this folder)), and passkey_multi.py,
which the validation engine runs on the runtime interface (its questions share one prefill's KV cache)."""
