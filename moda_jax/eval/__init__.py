"""Evaluation: loss and multiple-choice tasks on checkpoints, generation and attention analysis."""
