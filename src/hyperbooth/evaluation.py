"""The papers' metrics on generated images (METHOD section 4), with backbones loaded by name or path.

- CLIP-T: cosine between each image's and its prompt's CLIP embeddings (raw, not x100 or x2.5).
- CLIP-I: mean cosine between generated and reference images' CLIP image embeddings.
- DINO: the same with a DINO ViT's CLS token (default ViT-S/16).
- DIV: mean pairwise DINO distance (1 - cosine) among samples of one prompt (DreamBooth's
  diversity, with DINO in place of LPIPS, which would need torchvision).
- PRES: mean DINO similarity of class images drawn after fine-tuning to the subject's
  references (DreamBooth's prior preservation: higher means the class drifted to the subject).
- KID: kernel inception distance, on DINO features, against a folder of real images (on `mini`,
  fresh renders of held-out identities).
- Face similarity: mean cosine between FaceNet embeddings (InceptionResnetV1, facenet-pytorch) of
  the faces MTCNN finds in generated and reference images, with the detection rate beside it: an
  image with no face found is left out of the mean and counted as a miss, never scored 0.
- On the miniature world the judges add identity, hidden-trait and prompt scores.

Backbones come from transformers (`CLIPModel`, `ViTModel`): a hub id in the local cache or a
local folder. Preprocessing is written out here (resize the short side, centre crop, scale,
normalise), so no image-processor backend (which would want torchvision) is involved.
FaceNet is the exception: facenet-pytorch needs torchvision, so it lives outside the core install
(`make faces-venv`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hyperbooth.errors import HyperboothError
from hyperbooth.images import open_image

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
FACENET_WEIGHTS = ("vggface2", "casia-webface")  # facenet-pytorch's own downloads
FACE_SIZE = 160  # InceptionResnetV1's input
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: int | None = None,
) -> torch.Tensor:
    """(N, 3, size, size): short side to `resize` (default size) bicubic, centre crop, normalise."""
    resize = resize or size
    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        width, height = (max(resize, round(d * scale)) for d in image.size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        batch.append((array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def _from_pretrained(kind: str, flag: str, cls, name: str, **kwargs):
    """cls.from_pretrained(name), or a one-line error naming the weights to provide."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not Path(name).expanduser().is_dir():
        raise HyperboothError(
            f"{flag} {name}: no such folder; pass {flag} with a local folder holding the {kind} "
            "weights (a save_pretrained folder) or a hub id"
        )
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise HyperboothError(
            f"cannot load the {kind} backbone {name!r} ({str(error).splitlines()[0][:120]}); "
            f"pass {flag} with a local folder holding its weights (e.g. a download of {name})"
        ) from None


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, float32."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClipScorer:
    """CLIP image and text embeddings (unit length) from a transformers CLIPModel."""

    def __init__(self, name: str = DEFAULT_CLIP, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.model = _from_pretrained("CLIP", "--clip", CLIPModel, name).eval().to(device)
        self.tokenizer = _from_pretrained("CLIP tokenizer", "--clip", CLIPTokenizer, name)
        self.size = self.model.config.vision_config.image_size
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        """(N, D) unit image embeddings."""
        out = []
        for start in range(0, len(images), batch):
            pixels = preprocess(images[start : start + batch], self.size, CLIP_MEAN, CLIP_STD)
            features = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_unit(getattr(features, "pooler_output", features)))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit text embeddings."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(**tokens)
        return _unit(getattr(features, "pooler_output", features)).cpu()


class DinoScorer:
    """DINO CLS-token embeddings (unit length) from a transformers ViTModel."""

    def __init__(self, name: str = DEFAULT_DINO, device: str = "cpu") -> None:
        from transformers import ViTModel

        self.model = (
            _from_pretrained("DINO", "--dino", ViTModel, name, add_pooling_layer=False)
            .eval()
            .to(device)
        )
        self.size = self.model.config.image_size
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        """(N, D) unit CLS embeddings (short side to 256/224 of the input size, then crop)."""
        out = []
        resize = round(self.size * 256 / 224)
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            pixels = preprocess(chunk, self.size, IMAGENET_MEAN, IMAGENET_STD, resize)
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
            out.append(_unit(hidden[:, 0]))
        return torch.cat(out).cpu()


def _facenet(weights: str):
    """facenet-pytorch's InceptionResnetV1 with named weights or a local safetensors state dict."""
    from facenet_pytorch import InceptionResnetV1

    if weights in FACENET_WEIGHTS:
        try:
            return InceptionResnetV1(pretrained=weights)
        except (OSError, RuntimeError) as error:
            raise HyperboothError(
                f"cannot load FaceNet weights {weights!r} ({str(error).splitlines()[0][:120]}); "
                "pass --face with a local .safetensors file of InceptionResnetV1's state dict "
                "(docs/EVALUATION.md says how to make one)"
            ) from None
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        raise HyperboothError(
            f"--face {weights!r}: give {' or '.join(FACENET_WEIGHTS)} (downloaded by "
            "facenet-pytorch) or an existing .safetensors file of InceptionResnetV1's state dict"
        )
    from hyperbooth.atomic import load_tensors

    tensors = load_tensors(path, "pass --face with InceptionResnetV1's state dict")
    state = {k: v for k, v in tensors.items() if not k.startswith("logits.")}
    model = InceptionResnetV1()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise HyperboothError(
            f"{path} is not an InceptionResnetV1 state dict ({str(error).splitlines()[0][:120]})"
        ) from None
    return model


class FaceScorer:
    """FaceNet identity embeddings (unit length) of the face MTCNN finds in each image.

    detect=False takes each image as an already cropped face (resized to 160x160).
    """

    def __init__(self, weights: str = "vggface2", device: str = "cpu", detect: bool = True) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise HyperboothError(
                "face similarity needs facenet-pytorch and torchvision, which the core install "
                "leaves out: run `make faces-venv` and use .faces-venv/bin/hyperbooth "
                "(docs/EVALUATION.md)"
            ) from None
        self.model = _facenet(weights).eval().to(device)
        self.detector = (
            MTCNN(image_size=FACE_SIZE, margin=0, post_process=False, device=device)
            if detect
            else None
        )
        self.device = device

    def crop(self, image: Image.Image) -> torch.Tensor | None:
        """(3, 160, 160) float pixels in [0, 255] of the largest face, or None if none is found."""
        image = image.convert("RGB")
        if self.detector is None:
            resized = image.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(resized, np.float32).copy()).permute(2, 0, 1)
        with torch.no_grad():
            face = self.detector(image)
        return None if face is None else face.float().cpu()

    @torch.no_grad()
    def faces(
        self, images: Sequence[Image.Image], batch: int = 32
    ) -> tuple[torch.Tensor, list[bool]]:
        """(M, 512) unit embeddings of the faces found, and for each image whether one was."""
        crops = [self.crop(image) for image in images]
        found = [c is not None for c in crops]
        pixels = [c for c in crops if c is not None]
        if not pixels:
            return torch.zeros(0, 512), found
        standard = (torch.stack(pixels) - 127.5) / 128.0  # facenet-pytorch's fixed standardisation
        out = [
            _unit(self.model(standard[start : start + batch].to(self.device)))
            for start in range(0, len(standard), batch)
        ]
        return torch.cat(out).cpu(), found


def mean_cross_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (row of a, row of b) pair of unit embeddings."""
    return float((a @ b.T).mean())


def diversity(groups: Sequence[torch.Tensor]) -> float | None:
    """Mean pairwise distance (1 - cosine) within each group of unit embeddings, averaged."""
    values = []
    for e in groups:
        if len(e) < 2:
            continue
        cos = e @ e.T
        off = ~torch.eye(len(e), dtype=torch.bool)
        values.append(float((1 - cos[off]).mean()))
    return float(np.mean(values)) if values else None


def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (Binkowski et al. 2018), float64."""
    x, y = x.double(), y.double()
    if len(x) < 2 or len(y) < 2:
        raise HyperboothError("KID needs at least two generated and two real images")
    d = x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


# --- Folders -------------------------------------------------------------------------------------

_INDEX = re.compile(r"^(?:p)?(\d+)[_-]")


@dataclass
class Generated:
    """Generated images with the index of the prompt each one answers."""

    images: list[Image.Image]
    prompt_index: list[int]
    paths: list[Path]


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: one prompt per line, blank lines ignored."""
    from hyperbooth.atomic import read_lines

    return read_lines(path, "prompts")


def read_generated(folder: str | Path, prompts: Sequence[str]) -> Generated:
    """Images named '<prompt index>_<anything>.png' (or all for a single prompt)."""
    from hyperbooth.images import collect_images

    paths = collect_images(folder)
    indices = []
    for path in paths:
        match = _INDEX.match(path.name)
        if match:
            indices.append(int(match.group(1)))
        elif len(prompts) == 1:
            indices.append(0)
        else:
            raise HyperboothError(
                f"{path.name}: name generated images '<prompt index>_<n>.png' (0-based line of "
                "--prompts) so each is scored against its prompt"
            )
    if max(indices) >= len(prompts):
        raise HyperboothError(
            f"an image names prompt {max(indices)}, but --prompts has {len(prompts)} lines"
        )
    images = [open_image(p) for p in paths]
    return Generated(images, indices, paths)


def evaluate(
    generated: Generated,
    references: Sequence[Image.Image],
    prompts: Sequence[str],
    clip: ClipScorer | None = None,
    dino: DinoScorer | None = None,
    token: str | None = None,
    class_images: Sequence[Image.Image] | None = None,
    real_images: Sequence[Image.Image] | None = None,
    face: FaceScorer | None = None,
) -> dict:
    """CLIP-T, CLIP-I, DINO, DIV and face similarity of generated images against references.

    token: the subject's identifier, removed from prompts before CLIP-T (CLIP has never seen it).
    class_images (drawn after fine-tuning from the class prompt) add PRES; real_images add KID
    (both on DINO features). Face similarity averages over the images with a face found, and
    face_detection_rate says what share that was.
    """
    report: dict = {"images": len(generated.images), "references": len(references)}
    texts = [" ".join(w for w in p.split() if w != token) if token else p for p in prompts]
    if clip is not None:
        image_embeddings = clip.images(generated.images)
        text_embeddings = clip.texts(texts)
        per_image = (image_embeddings * text_embeddings[generated.prompt_index]).sum(1)
        report["clip_t"] = float(per_image.mean())
        report["clip_i"] = mean_cross_cosine(image_embeddings, clip.images(list(references)))
    if dino is not None:
        embeddings = dino.images(generated.images)
        references_e = dino.images(list(references))
        report["dino"] = mean_cross_cosine(embeddings, references_e)
        index = torch.tensor(generated.prompt_index)
        report["div"] = diversity([embeddings[index == p] for p in range(len(prompts))])
        if class_images:
            report["pres"] = mean_cross_cosine(dino.images(list(class_images)), references_e)
        if real_images:
            report["kid"] = kid(embeddings, dino.images(list(real_images)))
    elif class_images or real_images:
        raise HyperboothError("PRES and KID use DINO features: drop --no-dino")
    if face is not None:
        report |= face_similarity(face, generated.images, references)
    return report


def face_similarity(
    face: FaceScorer, images: Sequence[Image.Image], references: Sequence[Image.Image]
) -> dict:
    """Mean FaceNet cosine of generated to reference faces, with the detection rates."""
    references_e, references_found = face.faces(list(references))
    if not any(references_found):
        raise HyperboothError(
            "no face found in any reference image: pass references that show a face, or "
            "--face-no-detect if every image is already a cropped face"
        )
    embeddings, found = face.faces(list(images))
    return {
        "face": mean_cross_cosine(embeddings, references_e) if len(embeddings) else None,
        "face_detection_rate": float(np.mean(found)) if found else None,
        "face_references_detected": int(sum(references_found)),
    }


def mini_real_images(count: int, seed: int = 0) -> list[Image.Image]:
    """count fresh single-face renders of held-out identities: KID's real set on `mini`."""
    from hyperbooth.miniworld.render import held_out, random_context, random_identity, render

    rng = np.random.default_rng([seed, 0x6B6964])  # "kid"
    images = []
    while len(images) < count:
        identity = random_identity(rng)
        if held_out(identity):
            images.append(render(identity, random_context(rng), int(rng.integers(2**31))))
    return images


def judge_scores(
    generated: Generated,
    reference_json: str | Path,
    prompts: Sequence[str],
    token: str | None,
    judge: object | None = None,
) -> dict:
    """Miniature-world judge scores: identity, hidden traits (vs the reference), prompt score."""
    from hyperbooth.miniworld.captions import parse_prompt
    from hyperbooth.miniworld.judges import Judge, identity_score, prompt_score
    from hyperbooth.miniworld.render import CONTEXT_ATTRIBUTES, TRAITS, Identity

    try:
        traits = json.loads(Path(reference_json).read_text())["traits"]
        reference = Identity(**{name: TRAITS[name].index(value) for name, value in traits.items()})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyperboothError(
            f"{reference_json} is not a miniature-world reference ({type(error).__name__}): "
            "pass the traits JSON written beside it, e.g. a benchmark subject's traits.json"
        ) from None
    judge = judge or Judge.load()
    identity, hidden, prompt = [], [], []
    for reading, index in zip(judge.read(generated.images), generated.prompt_index, strict=True):
        total, hidden_share = identity_score(reference, reading.identity)
        identity.append(total)
        hidden.append(hidden_share)
        text = prompts[index].replace(token, "") if token else prompts[index]
        asked = {k: v for k, v in parse_prompt(text).items() if k in CONTEXT_ATTRIBUTES}
        if asked:
            prompt.append(prompt_score(asked, reading.context))
    return {
        "judge_identity": float(np.mean(identity)),
        "judge_hidden": float(np.mean(hidden)),
        "judge_prompt": float(np.mean(prompt)) if prompt else None,
    }
