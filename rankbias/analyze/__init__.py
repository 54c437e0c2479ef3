"""Analysis of saved models and checkpoints."""
