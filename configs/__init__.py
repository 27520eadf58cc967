"""`get_config()` files for `train/main.py` (big_vision style).

litv2_digits  LITv2-tiny (HiLo) on the bundled digits: the README's main job.
"""
