"""`get_config()` files for `train/main.py` (big_vision style)."""
