"""Real-ESRGAN second-order degradation: synthesise LR images from HR ones, seeded per sample, CPU or CUDA."""

from srkit.degrade.config import DegradationConfig, StageConfig
from srkit.degrade.pipeline import DegradationPipeline

__all__ = ["DegradationConfig", "DegradationPipeline", "StageConfig"]
