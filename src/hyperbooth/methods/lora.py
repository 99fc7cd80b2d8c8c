"""LoRA-DreamBooth and Lightweight DreamBooth: train an adapter, save one small file.

LiDB (METHOD 3.1) is a LoRA whose factors pass through frozen random bases; here it is the
same method with an AdapterConfig of kind "lidb".

With `new_word` set, a new word trains with the adapter (pivotal tuning): Textual Inversion's
vectors and the LoRA in one loss, as in diffusers' advanced DreamBooth-LoRA script, or with
`word_steps` N in two phases, as in the original pivotal tuning: the word alone for the first N
steps (the adapter off), then the adapter alone with the word fixed. The word is saved in
diffusers' `learned_embeds.safetensors` beside the adapter file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.files import save_adapter
from hyperbooth.adapters.inject import add_adapter, disable_adapters
from hyperbooth.errors import HyperboothError
from hyperbooth.methods.common import SubjectConfig, SubjectData, SubjectMethod
from hyperbooth.methods.textual_inversion import (
    LEARNED_EMBEDS,
    TextualInversion,
    TextualInversionConfig,
)
from hyperbooth.training import StepBatch

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class AdapterMethodConfig:
    """Which adapter to train; train_text_encoder=False drops the text-encoder layers."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train_text_encoder: bool = True
    new_word: TextualInversionConfig | None = None  # pivotal tuning: the token is a new word
    word_steps: int = 0  # pivotal: the word trains alone for these first steps, then stays fixed
    word_learning_rate: float | None = None  # pivotal: the word's own rate (None: the run's)

    def effective_adapter(self) -> AdapterConfig:
        """The adapter config actually injected."""
        if self.train_text_encoder:
            return self.adapter
        return replace(self.adapter, text_encoder_targets=())


class AdapterDreamBooth(SubjectMethod):
    """DreamBooth loss, only the adapter's tensors train."""

    def __init__(
        self, base: object, subject: SubjectConfig, data: SubjectData, config: AdapterMethodConfig
    ) -> None:
        super().__init__(base, subject, data)
        self.config = config
        self.name = config.adapter.kind
        # METHOD: LoRA-DreamBooth commonly 1e-4; LiDB trains 150 numbers a layer, 1e-3 (re-implementations).
        self.default_learning_rate = 1e-3 if config.adapter.kind == "lidb" else 1e-4
        self.word = None
        self.step = 0
        if config.word_steps and config.new_word is None:
            raise HyperboothError("--word-steps is for --pivotal (a new word to train first)")
        if config.word_learning_rate is not None and config.new_word is None:
            raise HyperboothError("--word-lr is for --pivotal (the new word's own learning rate)")
        if config.word_learning_rate is not None and config.word_learning_rate < 0:
            raise HyperboothError(f"--word-lr must be >= 0, got {config.word_learning_rate}")
        if config.new_word is not None:
            if config.train_text_encoder and config.adapter.text_encoder_targets:
                raise HyperboothError(
                    "--pivotal trains a new word through the frozen text encoder; add "
                    "--no-text-encoder"
                )
            self.word = TextualInversion(base, subject, data, config.new_word)
        self.adapter = add_adapter(base, config.effective_adapter(), name="default")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The adapter's tensors, keyed '<component>.<path>.<parameter>' (and the new word's)."""
        tensors = dict(self.adapter.named_parameters())
        if self.word is not None:
            tensors |= self.word.trainable()
        return tensors

    @property
    def learning_rates(self) -> dict[str, float]:
        """The new word's own learning rate, when it has one."""
        if self.word is None or self.config.word_learning_rate is None:
            return {}
        return dict.fromkeys(self.word.trainable(), self.config.word_learning_rate)

    def word_phase(self) -> bool:
        """Whether the current step trains the new word alone (pivotal, first word_steps steps)."""
        return self.word is not None and self.step < self.config.word_steps

    def encode_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states, with the new word's current vectors when it trains."""
        if self.word is None:
            return super().encode_prompt(ids)
        if self.config.word_steps and not self.word_phase():  # the word is fixed now
            key = f"fixed word {ids.tolist()}"
            if key not in self.data.hidden_cache:
                with torch.no_grad():
                    self.data.hidden_cache[key] = self.word.encode_prompt(ids)
            return self.data.hidden_cache[key]
        return self.word.encode_prompt(ids)

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """The subject's diffusion loss; in the word's phase, with the adapter switched off."""
        self.step = batch.step
        if self.word_phase():
            with disable_adapters(self.base):
                return super().loss(batch)
        return super().loss(batch)

    def save(self, out_dir: Path) -> Path:
        """Save <out>/adapter.safetensors with config, base fingerprint and subject."""
        path = out_dir / ADAPTER_FILE
        info = {"method": self.name, "subject": asdict(self.subject), "prompt": self.subject.prompt}
        if self.word is not None:
            info["new_word"] = {"token": self.subject.token, "file": LEARNED_EMBEDS}
            self.word.save(out_dir)  # first: the adapter file names it
        save_adapter(self.adapter, path, base_name=getattr(self.base, "name", ""), info=info)
        return path
