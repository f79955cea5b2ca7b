"""The embedded inference server (``asft infer``): HTTP glue over ``asft_core.serving``."""
