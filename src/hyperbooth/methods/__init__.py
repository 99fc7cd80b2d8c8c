"""Personalisation methods: each a config + which parameters train + the loss for a batch."""

from hyperbooth.methods.common import SubjectConfig, SubjectData, prepare_subject
from hyperbooth.methods.dreambooth import DreamBooth, DreamBoothConfig
from hyperbooth.methods.lora import AdapterDreamBooth, AdapterMethodConfig

METHODS = ("dreambooth", "lora", "lidb")

__all__ = [
    "METHODS",
    "AdapterDreamBooth",
    "AdapterMethodConfig",
    "DreamBooth",
    "DreamBoothConfig",
    "SubjectConfig",
    "SubjectData",
    "prepare_subject",
]
