"""Training: objectives, optimizers, the sharded trainer."""
