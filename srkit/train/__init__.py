"""Training: rewards, losses (and, as the recipes land, the trainer, data and recipes; see DESIGN.md)."""
