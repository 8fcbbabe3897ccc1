"""The model: `ModelConfig`, layers, MoDA attention, blocks, the depth stream and the one block loop.

Knows nothing of data, training or evaluation (import-linter holds it to that: pyproject.toml).
"""
