"""Training configs (ml_collections); `base.py` holds every default."""
