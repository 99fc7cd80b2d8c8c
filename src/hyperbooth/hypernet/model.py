"""The HyperDreamBooth hypernetwork (METHOD 3.2): one image -> a LiDB for every adapted layer.

    image --encoder--> features (B, T, D) --project--> (B, T, W)            encoded once
    theta_0 = 0                                                              (B, L, W), L layers
    repeat K times: theta_k = theta_{k-1} + decoder([features ; theta_{k-1} + position])[T:]
    per-layer heads: theta_K[:, l] -> A_train (r, a) and B_train (b, r) of layer l

The encoder is any transformers vision model given by name or local path (ViT, CLIP vision,
DINOv2...: its last_hidden_state tokens; a convolutional net's feature map, one token per
cell), frozen by default, or a network of the miniature world's judge format; for `mini`, the
trait encoder `mini-traits` (shipped, frozen), a small ViT trained from scratch with the rest,
or the contrastive identity encoder `mini-encoder`, which its recipe writes. The predicted
tensors are keyed exactly as the adapter's own (`<component>.<path>.lidb_a_train`), so they
load, save and export like any fitted LiDB.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.atomic import file_sha256, load_tensors
from hyperbooth.errors import HyperboothError

SCRATCH_VIT = "scratch-vit"  # a small ViT with random weights, trained with the hypernetwork
_MINI_WEIGHTS = Path(__file__).parents[1] / "miniworld" / "weights"
# Encoders known by name: folder and the command that writes it. `mini-traits` (shipped) reads
# traits like the judge, trained on its own renders (hyperbooth.miniworld.trait_encoder);
# `mini-encoder` (a transformers ResNet trained contrastively, not shipped: it did not beat the
# scratch ViT, docs/HYPERDREAMBOOTH.md).
BUILT_IN_ENCODERS = {
    "mini-traits": _MINI_WEIGHTS / "mini-traits",
    "mini-encoder": _MINI_WEIGHTS / "mini-encoder",
}
_ENCODER_COMMANDS = {
    "mini-traits": "reinstall hyperbooth (it ships), or retrain it with "
    "`python -m hyperbooth.miniworld.train_hypernet --work runs/hdb`",
    "mini-encoder": "train it with `python -m hyperbooth.miniworld.train_encoder --work runs/encoder`",
}


def local_encoder(encoder: str) -> str:
    """An encoder as a config should record it: a local folder by absolute path, else as given."""
    if encoder in BUILT_IN_ENCODERS or encoder == SCRATCH_VIT or not Path(encoder).is_dir():
        return encoder
    return str(Path(encoder).resolve())


def encoder_fingerprint(encoder: str) -> str | None:
    """A hash of a judge-format encoder's weights, which names the network; None for others."""
    from hyperbooth.miniworld.judges import WEIGHTS_FILE
    from hyperbooth.miniworld.trait_encoder import is_trait_encoder

    source = Path(BUILT_IN_ENCODERS.get(encoder, encoder))
    if not is_trait_encoder(source):
        return None
    return file_sha256(source / WEIGHTS_FILE)[:16]


def _lidb() -> AdapterConfig:
    return AdapterConfig(kind="lidb")


@dataclass
class HyperNetConfig:
    """Sizes of the hypernetwork and its encoder; saved beside its weights."""

    adapter: AdapterConfig = field(default_factory=_lidb)
    encoder: str = SCRATCH_VIT  # or a transformers model name / local path
    train_encoder: bool = False  # a scratch ViT always trains
    image_size: int = 64  # the encoder's input side in pixels
    # scratch-vit only
    patch_size: int = 8
    encoder_width: int = 192
    encoder_layers: int = 4
    encoder_heads: int = 4
    # the decoder over [image features ; weight tokens]
    width: int = 256
    decoder_layers: int = 2  # METHOD 3.2: 2
    heads: int = 4
    iterations: int = 4  # K refinement steps (METHOD: 4-5 in re-implementations; 1 is worse)
    head_init_std: float = 1e-3  # the heads start near zero: the first prediction ~ "no change"

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig.from_json(self.adapter)
        if self.adapter.kind != "lidb":
            raise HyperboothError(
                "the hypernetwork predicts LiDB weights; use an adapter of kind lidb"
            )
        if self.iterations < 1 or self.decoder_layers < 1:
            raise HyperboothError("--iterations and decoder layers must be >= 1")
        if self.width % self.heads:
            raise HyperboothError(f"width {self.width} is not divisible by {self.heads} heads")

    def to_json(self) -> str:
        """Serialise to JSON."""
        data = asdict(self)
        data["adapter"] = json.loads(self.adapter.to_json())
        return json.dumps(data, indent=2, sort_keys=True)


def build_encoder(config: HyperNetConfig) -> tuple[nn.Module, int]:
    """The image encoder and its feature width; pretrained models load by name or path."""
    from transformers import AutoModel, ViTConfig, ViTModel

    if config.encoder == SCRATCH_VIT:
        vit = ViTConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=config.encoder_width,
            num_hidden_layers=config.encoder_layers,
            num_attention_heads=config.encoder_heads,
            intermediate_size=4 * config.encoder_width,
        )
        return ViTModel(vit, add_pooling_layer=False), config.encoder_width
    from hyperbooth.miniworld.trait_encoder import TraitEncoder, is_trait_encoder

    source = BUILT_IN_ENCODERS.get(config.encoder, config.encoder)
    if is_trait_encoder(source):  # a network of the judge's format (mini-traits)
        encoder = TraitEncoder(source)
        return encoder, encoder.width
    if config.encoder in BUILT_IN_ENCODERS and not Path(source, "config.json").is_file():
        raise HyperboothError(
            f"the {config.encoder} encoder is not installed in {source}; "
            f"{_ENCODER_COMMANDS[config.encoder]}"
        )
    if Path(config.encoder).is_absolute() and not Path(source).is_dir():
        raise HyperboothError(
            f"the image encoder folder {source} is missing; put the encoder there or retrain"
        )
    try:
        model = AutoModel.from_pretrained(source, use_safetensors=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HyperboothError(
            f"cannot load the image encoder {config.encoder!r} ({first}); pass a local folder "
            "with a transformers vision model (config.json + model.safetensors) or a cached hub id"
        ) from error
    vision = getattr(model, "vision_model", model).float()  # CLIPModel -> its vision tower
    width = getattr(vision.config, "hidden_size", None)
    sizes = getattr(vision.config, "hidden_sizes", None)  # convolutional nets (ResNet, ConvNeXt)
    width = width if width is not None else (sizes[-1] if sizes else None)
    if width is None:
        raise HyperboothError(
            f"{config.encoder!r} is not a vision model with hidden_size or hidden_sizes"
        )
    return vision, width


class HyperNetwork(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> LiDB tensors for every layer, keyed like the adapter's."""

    def __init__(self, config: HyperNetConfig, layers: dict[str, tuple[int, int]]) -> None:
        """`layers`: adapted layer key -> (out, in), in the adapter's key order."""
        super().__init__()
        self.config = config
        self.keys = list(layers)
        self.layer_shapes = {key: list(shape) for key, shape in layers.items()}
        r, a, b = config.adapter.rank, config.adapter.lidb_a, config.adapter.lidb_b
        self.split = (r * a, b * r)
        self.encoder, feature_width = build_encoder(config)
        # A pretrained ViT or CLIP tower takes images of its own size (its position embeddings);
        # other encoders take config.image_size.
        declared = getattr(getattr(self.encoder, "config", None), "image_size", None)
        self.input_size = declared if isinstance(declared, int) else config.image_size
        if config.encoder != SCRATCH_VIT and not config.train_encoder:
            self.encoder.requires_grad_(False).eval()
        self.project = nn.Linear(feature_width, config.width)
        count, width = len(self.keys), config.width
        self.position = nn.Parameter(torch.randn(count, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, config.heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerEncoder(
            block, config.decoder_layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(width)
        # One linear head per layer, stored stacked: (L, W, r*a + b*r).
        outputs = sum(self.split)
        self.head_weight = nn.Parameter(torch.randn(count, width, outputs) * config.head_init_std)
        self.head_bias = nn.Parameter(torch.zeros(count, outputs))

    def train(self, mode: bool = True) -> HyperNetwork:
        """Set training mode; a frozen encoder stays in eval mode (its BatchNorm statistics fixed)."""
        super().train(mode)
        if not self.trains_encoder():
            self.encoder.eval()
        return self

    def trains_encoder(self) -> bool:
        """Whether the encoder's weights receive gradients."""
        return any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image features (B, T, W); computed once per image."""
        if images.shape[-1] != self.input_size:
            images = nn.functional.interpolate(
                images, size=(self.input_size,) * 2, mode="bilinear", antialias=True
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_encoder()):
            features = self.encoder(pixel_values=images).last_hidden_state
        if features.ndim == 4:  # a convolutional feature map (B, C, h, w): one token per cell
            features = features.flatten(2).transpose(1, 2)
        return self.project(features)

    def tokens(self, features: torch.Tensor, iterations: int | None = None) -> list[torch.Tensor]:
        """theta_1 .. theta_K (each (B, L, W)) from projected features."""
        theta = features.new_zeros(features.shape[0], len(self.keys), self.config.width)
        steps = []
        for _ in range(iterations or self.config.iterations):
            sequence = torch.cat([features, theta + self.position], dim=1)
            theta = theta + self.decoder(sequence)[:, features.shape[1] :]
            steps.append(theta)
        return steps

    def weights(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer heads: (B, L, W) tokens -> {key.lidb_a_train: (B, r, a), key.lidb_b_train: (B, b, r)}."""
        out = torch.einsum("blw,lwo->blo", self.norm(theta), self.head_weight) + self.head_bias
        a_part, b_part = out.split(self.split, dim=-1)
        r, a, b = self.config.adapter.rank, self.config.adapter.lidb_a, self.config.adapter.lidb_b
        batch = theta.shape[0]
        a_train = a_part.reshape(batch, len(self.keys), r, a)
        b_train = b_part.reshape(batch, len(self.keys), b, r)
        tensors = {}
        for index, key in enumerate(self.keys):
            tensors[f"{key}.lidb_a_train"] = a_train[:, index]
            tensors[f"{key}.lidb_b_train"] = b_train[:, index]
        return tensors

    def forward(
        self, images: torch.Tensor, iterations: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The final prediction for a batch of images."""
        return self.weights(self.tokens(self.encode(images), iterations)[-1])


def _stores_encoder(model: HyperNetwork) -> bool:
    """A frozen pretrained encoder is referenced by name, not copied into every file."""
    return model.config.encoder == SCRATCH_VIT or model.config.train_encoder


def _own_tensors(model: HyperNetwork) -> dict[str, torch.Tensor]:
    """The tensors a hypernetwork file holds."""
    tensors = model.state_dict()
    if not _stores_encoder(model):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    return tensors


def save_hypernet(model: HyperNetwork, folder: str | Path, info: dict | None = None) -> None:
    """Write hypernet.safetensors (+ config JSON with the layer keys and shapes) into folder.

    A frozen judge-format encoder's weights hash goes into info as `encoder_fingerprint`.
    """
    from hyperbooth.adapters.files import atomic_save_safetensors
    from hyperbooth.atomic import write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(_own_tensors(model), folder / "hypernet.safetensors")
    info = dict(info or {})
    if not _stores_encoder(model):  # name the frozen encoder's weights: load_hypernet checks them
        fingerprint = encoder_fingerprint(_encoder_in(folder, model.config.encoder))
        if fingerprint is not None:
            info["encoder_fingerprint"] = fingerprint
    meta = {
        "config": json.loads(model.config.to_json()),
        "layers": model.layer_shapes,
        "info": info,
    }
    write_text(folder / "hypernet.json", json.dumps(meta, indent=2))


BUILT_IN = {"mini": Path(__file__).parents[1] / "miniworld" / "weights" / "mini-hypernet"}


def _encoder_in(folder: Path, encoder: str) -> str:
    """The encoder a hypernetwork folder records, with a folder beside it named relative to it."""
    if encoder in BUILT_IN_ENCODERS or Path(encoder).is_absolute():
        return encoder
    return str((folder / encoder).resolve()) if (folder / encoder).is_dir() else encoder


def load_hypernet(folder: str | Path) -> HyperNetwork:
    """Read a hypernetwork written by save_hypernet (safetensors + JSON only); "mini" is built in."""
    name_or_folder = folder
    folder = BUILT_IN.get(str(folder), Path(folder))
    if not (folder / "hypernet.json").is_file() or not (folder / "hypernet.safetensors").is_file():
        raise HyperboothError(
            f"no hypernetwork in {folder} (need hypernet.json and hypernet.safetensors); "
            "train one with `hyperbooth train-hypernet`"
        )
    try:
        meta = json.loads((folder / "hypernet.json").read_text())
        settings = dict(meta["config"])
        layers = {k: tuple(v) for k, v in meta["layers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HyperboothError(
            f"{folder / 'hypernet.json'} is damaged ({type(error).__name__}: {error}); "
            "restore it beside its hypernet.safetensors or retrain"
        ) from None
    encoder = settings.setdefault("encoder", SCRATCH_VIT)
    settings["encoder"] = _encoder_in(folder, encoder)
    expected = meta.get("info", {}).get("encoder_fingerprint")
    found = encoder_fingerprint(settings["encoder"]) if expected else None
    if found is not None and found != expected:
        raise HyperboothError(
            f"{folder} was trained with another {encoder} encoder (weights {expected}, "
            f"installed {found}); restore the encoder it was trained with or retrain it"
        )
    try:
        config = HyperNetConfig(**settings)
    except TypeError as error:
        raise HyperboothError(
            f"{folder / 'hypernet.json'}: {error}; it may come from a newer hyperbooth (upgrade)"
        ) from None
    model = HyperNetwork(config, layers)
    tensors = load_tensors(folder / "hypernet.safetensors", "restore it or retrain")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A frozen pretrained encoder is not in the file (it loaded from its own folder above).
    missing = [k for k in missing if _stores_encoder(model) or not k.startswith("encoder.")]
    if unexpected or missing:
        raise HyperboothError(
            f"{folder / 'hypernet.safetensors'} does not match its hypernet.json "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    # where it came from, for the files it predicts (a built-in by name, a folder by path)
    weights = file_sha256(folder / "hypernet.safetensors")[:16]
    name = name_or_folder if str(name_or_folder) in BUILT_IN else str(Path(folder).resolve())
    model.source = {"hypernet": str(name), "weights_sha256": weights}
    return model
