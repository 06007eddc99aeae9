"""Training recipes, one module per paper: each defines the trainable parameters, the losses of one batch and the
export in the format its engine loads (see srkit/train/trainer.py for the contract)."""
