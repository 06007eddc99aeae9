"""srkit: one CLI and Python API for GAN and diffusion super-resolution.

`from srkit import load_engine` is resolved lazily so that `import srkit` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["load_engine", "upscale_paths"]


def __getattr__(name: str):
    if name in __all__:
        from srkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'srkit' has no attribute '{name}'")
