"""Shared diffusion building blocks: loading diffusers folders, latents, prompts, precision, noise schedules, the
denoiser interface (with classifier-free guidance and latent tiling written once) and the samplers.

Engines and training recipes are built from these parts; nothing here imports `srkit.engines`, `srkit.train`,
`srkit.api` or `srkit.cli` (a test checks the import graph).
"""
