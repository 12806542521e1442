"""LoRA from spectra: rank allocation (allocate.py) and the recommendation with its settings (recommend.py)."""
