"""hyperbooth: personalise Stable Diffusion-family models from one photo."""

__version__ = "0.1.0"
