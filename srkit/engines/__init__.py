"""Engines, one module per published method; each registers the model names users pass to `--model`.

Modules are declared here by name and imported on first use, so the GAN default never imports diffusers.
"""

from srkit.engines.base import declare

declare(
    "srkit.engines.gan",
    "realesrgan-x4plus",
    "realesrnet-x4plus",
    "realesrgan-x4plus-anime-6b",
    "realesrgan-x2plus",
    "realesr-animevideov3",
    "realesr-general-x4v3",
)
declare("srkit.engines.osediff", "osediff", "naosd", "gdpo")
declare("srkit.engines.gendr", "gendr")
declare("srkit.engines.s3diff", "s3diff")
declare("srkit.engines.consissr", "consissr")
declare("srkit.engines.seesr", "seesr")
