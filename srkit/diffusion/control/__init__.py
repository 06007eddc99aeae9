"""ControlNet-style conditioning of a UNet: ldm.py (DiffBIR-v1 latent hint, ConsisSR), diffusers.py (pixel-space hint, SeeSR)."""
