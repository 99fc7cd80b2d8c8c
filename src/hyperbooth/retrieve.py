"""A regularisation set from a local captioned image folder, by text-encoder similarity.

Custom Diffusion keeps the real images whose captions are close to the target prompt (cosine
similarity of CLIP text features >= 0.85). Here a captioned folder holds `name.png` beside
`name.txt`; captions and the prompt are embedded with the base's own text encoder (its pooled
output, the end-of-text token's state), and images above the threshold are returned, best first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperbooth.errors import HyperboothError
from hyperbooth.images import IMAGE_SUFFIXES
from hyperbooth.methods.common import token_ids

DEFAULT_THRESHOLD = 0.85  # Custom Diffusion's value


@dataclass(frozen=True)
class Match:
    """One retrieved image, its caption and its similarity to the prompt."""

    image: Path
    caption: str
    similarity: float


def captioned_images(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image in folder with a same-stem .txt beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HyperboothError(
            f"not a folder: {folder} (pass a folder of images with .txt captions)"
        )
    pairs = []
    for image in sorted(folder.iterdir()):
        caption = image.with_suffix(".txt")
        if image.suffix.lower() in IMAGE_SUFFIXES and caption.is_file():
            try:
                pairs.append((image, caption.read_text(encoding="utf-8").strip()))
            except UnicodeDecodeError:
                raise HyperboothError(f"{caption} is not UTF-8 text; save it as UTF-8") from None
    if not pairs:
        raise HyperboothError(
            f"{folder} has no captioned images: put name.txt (its caption) beside each name.png"
        )
    return pairs


@torch.no_grad()
def text_features(base: object, texts: list[str], batch: int = 64) -> torch.Tensor:
    """Unit-length pooled text-encoder features, (N, hidden)."""
    device = next(base.text_encoder.parameters()).device
    features = []
    for start in range(0, len(texts), batch):
        ids = token_ids(base, texts[start : start + batch]).to(device)
        pooled = base.text_encoder(ids).pooler_output.float()
        features.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(features)


def retrieve(
    base: object,
    folder: str | Path,
    prompt: str,
    threshold: float = DEFAULT_THRESHOLD,
    limit: int | None = None,
) -> list[Match]:
    """The captioned images whose caption's similarity to the prompt is >= threshold, best first."""
    if limit is not None and limit < 1:
        raise HyperboothError(f"--limit must be >= 1, got {limit}")
    pairs = captioned_images(folder)
    scores = (
        text_features(base, [caption for _, caption in pairs]) @ text_features(base, [prompt])[0]
    )
    matches = [
        Match(image, caption, float(score))
        for (image, caption), score in zip(pairs, scores, strict=True)
        if score >= threshold
    ]
    matches.sort(key=lambda match: -match.similarity)
    return matches[:limit] if limit else matches


def copy_matches(matches: list[Match], out: str | Path) -> Path:
    """Copy the retrieved images and their captions into out (a class-images folder)."""
    from hyperbooth.atomic import atomic_file

    out = Path(out)
    for match in matches:
        for source in (match.image, match.image.with_suffix(".txt")):
            target = out / source.name
            if target.exists() and target.resolve() == source.resolve():
                raise HyperboothError(f"--out {out} is the folder searched; give another folder")
            with atomic_file(target) as temporary:
                shutil.copy2(source, temporary)
    return out
