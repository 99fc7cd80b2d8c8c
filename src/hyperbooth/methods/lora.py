"""LoRA-DreamBooth and Lightweight DreamBooth: train an adapter, save one small file.

LiDB (METHOD 3.1) is a LoRA whose factors pass through frozen random bases; here it is the
same method with an AdapterConfig of kind "lidb".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.files import save_adapter
from hyperbooth.adapters.inject import add_adapter
from hyperbooth.methods.common import SubjectConfig, SubjectData, SubjectMethod

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class AdapterMethodConfig:
    """Which adapter to train; train_text_encoder=False drops the text-encoder layers."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train_text_encoder: bool = True

    def effective_adapter(self) -> AdapterConfig:
        """The adapter config actually injected."""
        if self.train_text_encoder:
            return self.adapter
        return replace(self.adapter, text_encoder_targets=())


class AdapterDreamBooth(SubjectMethod):
    """DreamBooth loss, only the adapter's tensors train."""

    def __init__(
        self, base: object, subject: SubjectConfig, data: SubjectData, config: AdapterMethodConfig
    ):
        super().__init__(base, subject, data)
        self.config = config
        self.name = config.adapter.kind
        # METHOD: LoRA-DreamBooth commonly 1e-4; LiDB trains 150 numbers a layer, 1e-3 (re-implementations).
        self.default_learning_rate = 1e-3 if config.adapter.kind == "lidb" else 1e-4
        self.adapter = add_adapter(base, config.effective_adapter(), name="default")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The adapter's tensors, keyed '<component>.<path>.<parameter>'."""
        return dict(self.adapter.named_parameters())

    def save(self, out_dir: Path) -> Path:
        """Save <out>/adapter.safetensors with config, base fingerprint and subject."""
        path = out_dir / ADAPTER_FILE
        info = {"method": self.name, "subject": asdict(self.subject), "prompt": self.subject.prompt}
        save_adapter(self.adapter, path, base_name=getattr(self.base, "name", ""), info=info)
        return path
