"""Data: document sources, tokenizers and packed Grain pipelines. Knows nothing of the model."""
