"""Training: mesh and sharding, optimizer, train step, checkpoints, metrics and the trainer loop."""
