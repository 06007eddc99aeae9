"""Samplers: the update rules that turn a denoiser's predictions into a clean latent, shared by engines (inference)
and recipes (training) so that each formula exists once.  `one_step.py`: the one-step SR updates."""
