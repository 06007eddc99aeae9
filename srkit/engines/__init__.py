"""Engines, one module per published method; each registers the catalogue's models it runs.

`srkit.engines.catalogue` lists every model without importing PyTorch; an engine module is imported on first use
of one of its models, so the GAN default never imports diffusers.
"""
