"""Training: one run's config, the SGD loop, the trainer, checkpoints and the stack engines."""
