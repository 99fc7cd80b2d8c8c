"""hyperbooth: personalise Stable Diffusion-family models from one photo."""

import logging

__version__ = "0.1.0"


class _TorchvisionNoticeFilter(logging.Filter):
    """Drops transformers' notice that image processors fall back to PIL without torchvision.

    The core install leaves torchvision out on purpose, and diffusers' pipeline imports trigger
    the notice in every command, telling users to install what they must not need.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the fallback notice, True for every other record."""
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNoticeFilter())
