"""DreamBooth: fine-tune every UNet weight (optionally the text encoder); saves a whole model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hyperbooth.atomic import write_text
from hyperbooth.methods.common import SubjectConfig, SubjectData, SubjectMethod


@dataclass
class DreamBoothConfig:
    """DreamBooth settings beyond the subject: whether the text encoder trains too."""

    train_text_encoder: bool = False


class DreamBooth(SubjectMethod):
    """Full fine-tuning; the result is a diffusers pipeline folder."""

    name = "dreambooth"
    default_learning_rate = 5e-6

    def __init__(
        self, base: object, subject: SubjectConfig, data: SubjectData, config: DreamBoothConfig
    ) -> None:
        super().__init__(base, subject, data)
        self.config = config
        base.unet.requires_grad_(True)
        base.text_encoder.requires_grad_(config.train_text_encoder)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every UNet parameter (and text-encoder parameter if it trains), keyed by path."""
        out = {f"unet.{k}": p for k, p in self.base.unet.named_parameters()}
        if self.config.train_text_encoder:
            out |= {f"text_encoder.{k}": p for k, p in self.base.text_encoder.named_parameters()}
        return out

    def save(self, out_dir: Path) -> Path:
        """Save the fine-tuned model as a diffusers folder <out>/model."""
        from hyperbooth.bases import save_base

        folder = out_dir / "model"
        save_base(self.base, folder)
        info = {
            "method": self.name,
            "base_name": getattr(self.base, "name", ""),  # the base it was fine-tuned from
            "subject": asdict(self.subject),
            "config": asdict(self.config),
        }
        write_text(folder / "hyperbooth.json", json.dumps(info, indent=2))
        return folder
