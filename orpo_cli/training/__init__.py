"""Training: the setup from a recipe, the loop, the ORPO loss and head, batch layouts, checkpoints, distributed plumbing."""
