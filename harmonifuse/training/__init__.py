"""Training: configuration, data wiring, the trainer and its checkpoints."""
