"""Real-ESRGAN second-order degradation: synthesise LR images from HR ones, seeded per sample, CPU or CUDA.

`srkit.degrade.config` (the published settings, no PyTorch) and `srkit.degrade.pipeline` (the synthesis); the
package imports neither, so reading a configuration never loads PyTorch.
"""
