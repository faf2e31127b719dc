"""The DeepSpeed JSON configs, installed as `dalle_ds.ds_configs` (package data; see setup.py)."""
