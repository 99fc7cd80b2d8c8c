"""Textual Inversion (METHOD 2): a new word whose embedding vectors are the only thing that trains.

The token (and `token_1` ... for extra vectors, diffusers' convention) is added to the tokenizer
and the text encoder's embedding matrix grows by as many rows, initialised from a given word.
The loss sees the matrix as `frozen rows` with the new rows replaced by the trainable vectors
(through `torch.func.functional_call`), so every other row is untouched by construction.
The result is diffusers' `learned_embeds.safetensors` ({token: (vectors, dim)}), which
`StableDiffusionPipeline.load_textual_inversion` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from hyperbooth.adapters.files import atomic_save_safetensors
from hyperbooth.errors import HyperboothError
from hyperbooth.methods.common import SubjectConfig, SubjectData, SubjectMethod, token_ids

LEARNED_EMBEDS = "learned_embeds.safetensors"


# The Textual Inversion paper's object templates (its code's imagenet_templates_small).
PHOTO_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
# The same idea in the miniature world's own words (it has never seen "photo").
MINI_TEMPLATES = (
    "a {}",
    "a {} face",
    "a picture of a {}",
    "a close up {}",
    "a portrait of a {}",
    "a {} in a picture",
)
TEMPLATE_SETS = {"photo": PHOTO_TEMPLATES, "mini": MINI_TEMPLATES}


@dataclass
class TextualInversionConfig:
    """The new word: how many vectors, the word they start from, and the prompts it trains in.

    initializer: one word (its embedding starts every vector) or a phrase (one vector per token,
    each starting from its token: a description of the subject).

    templates: None trains on the subject prompt alone; otherwise each sample draws one
    template ("a photo of a {}"; {} becomes the new word, as in the paper).
    """

    initializer: str = "face"
    vectors: int = 1
    templates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.vectors < 1:
            raise HyperboothError(f"--vectors must be >= 1, got {self.vectors}")
        if self.templates is not None:
            bad = [t for t in self.templates if t.count("{}") != 1]
            if bad or not self.templates:
                raise HyperboothError(
                    f"every prompt template needs exactly one {{}} for the word, got {bad[:1]}"
                )


def read_templates(spec: str | None) -> tuple[str, ...] | None:
    """--templates: a built-in set name (photo, mini) or a file with one template per line."""
    if spec is None:
        return None
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise HyperboothError(
            f"--templates {spec!r} is neither {' nor '.join(TEMPLATE_SETS)} nor a file of "
            "templates (one per line, each with {} where the word goes)"
        )
    from hyperbooth.atomic import read_lines

    return tuple(read_lines(path, "templates"))


def token_names(token: str, vectors: int) -> list[str]:
    """The tokenizer entries of a multi-vector token: token, token_1, ... (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def add_new_token(base: object, token: str, vectors: int) -> list[int]:
    """Add the token's entries to the tokenizer and grow the text encoder's embedding matrix."""
    names = token_names(token, vectors)
    vocabulary = base.tokenizer.get_vocab()
    taken = [name for name in names if name in vocabulary or f"{name}</w>" in vocabulary]
    if taken:
        raise HyperboothError(
            f"the token {taken[0]!r} is already in the vocabulary; textual inversion needs a new "
            "word, e.g. --token '<my-subject>'"
        )
    base.tokenizer.add_tokens(names)
    # No mean-resizing: it draws the new rows from the global RNG; they are set explicitly.
    base.text_encoder.resize_token_embeddings(len(base.tokenizer), mean_resizing=False)
    return base.tokenizer.convert_tokens_to_ids(names)


def initial_tokens(base: object, config: TextualInversionConfig) -> list[int]:
    """The token each new vector starts from: a word's, --vectors times, or each of a phrase's."""
    initial = base.tokenizer(config.initializer, add_special_tokens=False).input_ids
    if not initial:
        raise HyperboothError("--initializer is empty; pass a word (e.g. face) or a phrase")
    if len(initial) == 1:
        return initial * config.vectors
    if config.vectors not in (1, len(initial)):
        raise HyperboothError(
            f"--initializer {config.initializer!r} is {len(initial)} tokens, one vector each, "
            f"but --vectors is {config.vectors}; drop --vectors or pass one word"
        )
    return initial


class TextualInversion(SubjectMethod):
    """Only the new token's embedding vectors train; UNet and text encoder stay frozen."""

    name = "textual-inversion"
    default_learning_rate = 5e-3  # diffusers' textual_inversion example

    def __init__(
        self,
        base: object,
        subject: SubjectConfig,
        data: SubjectData,
        config: TextualInversionConfig,
    ) -> None:
        super().__init__(base, subject, data)
        self.config = config
        if subject.per_image_prompts and config.templates:
            raise HyperboothError(
                "--templates draw a prompt per sample, --rescale and --captions give each photo "
                "its own; drop one of them"
            )
        if data.instance_mask is not None and config.templates:
            raise HyperboothError(
                "--masks weigh each photo under its own prompt, --templates draw a prompt per "
                "sample; drop one of them"
            )
        initial = initial_tokens(base, config)
        self.token_ids = torch.tensor(add_new_token(base, subject.token, len(initial)))
        # The prompt was tokenised before the word existed: again, now that it is one token
        # (several vectors: the prompt names token token_1 ... as diffusers writes them).
        word = " ".join(token_names(subject.token, len(initial)))
        if config.templates:
            prompts = [template.format(word) for template in config.templates]
        else:  # one prompt, or each photo's own (--captions, --rescale copies)
            prompts = [prompt.replace(subject.token, word) for prompt in data.prompts]
        data.instance_ids = token_ids(base, prompts).to(data.instance_ids.device)
        embedding = base.text_encoder.get_input_embeddings()
        self.frozen = embedding.weight.detach().clone()
        start = self.frozen[torch.tensor(initial)].clone()
        self.vectors = nn.Parameter(start.to(embedding.weight.device))
        self.weight_name = next(
            name
            for name, parameter in base.text_encoder.named_parameters()
            if parameter is embedding.weight
        )

    def trainable(self) -> dict[str, nn.Parameter]:
        """The new token's vectors."""
        return {"textual_inversion.vectors": self.vectors}

    def embedding_matrix(self) -> torch.Tensor:
        """The frozen matrix with the new rows replaced by the trainable vectors."""
        return self.frozen.index_put((self.token_ids.to(self.frozen.device),), self.vectors)

    def encode_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states with the current vectors (never cached: they train)."""
        replaced = {self.weight_name: self.embedding_matrix()}
        return functional_call(self.base.text_encoder, replaced, (ids,), strict=False)[0]

    def save(self, out_dir: Path) -> Path:
        """Write <out>/learned_embeds.safetensors in diffusers' layout and set the rows in place."""
        path = Path(out_dir) / LEARNED_EMBEDS
        atomic_save_safetensors({self.subject.token: self.vectors.detach()}, path, {"format": "pt"})
        with torch.no_grad():  # the base now draws the subject with the plain text encoder too
            self.base.text_encoder.get_input_embeddings().weight[self.token_ids] = self.vectors
        return path


def load_textual_inversion(path: str | Path, base: object) -> list[str]:
    """Add the tokens of a learned_embeds.safetensors file to a base; returns the tokens.

    Also reads A1111's format, one tensor named emb_params, whose word is the file's stem.
    """
    from hyperbooth.atomic import load_tensors

    path = Path(path)
    if not path.is_file():
        raise HyperboothError(f"embeddings file not found: {path} (check the path)")
    tensors = load_tensors(path, "pass a learned_embeds.safetensors file")
    if set(tensors) == {"emb_params"}:  # A1111 / SD webui: the file's name is the word
        tensors = {path.stem: tensors["emb_params"]}
    if not tensors or any("." in token for token in tensors):
        raise HyperboothError(
            f"{path} holds model weights, not word embeddings (one tensor per token, as in "
            "learned_embeds.safetensors); pass adapters with --adapter"
        )
    added = []
    for token, vectors in tensors.items():
        vectors = vectors.reshape(-1, vectors.shape[-1])
        dim = base.text_encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != dim:
            raise HyperboothError(
                f"{path}: token {token!r} has {vectors.shape[1]}-wide vectors, this text encoder "
                f"needs {dim}; pass the --base it was trained on"
            )
        add_word(base, token, vectors)
        added.append(token)
    return added


def add_word(base: object, token: str, vectors: torch.Tensor) -> list[int]:
    """Add a new word with the given (vectors, dim) embedding rows; returns their ids."""
    ids = add_new_token(base, token, vectors.shape[0])
    with torch.no_grad():
        weight = base.text_encoder.get_input_embeddings().weight
        weight[ids] = vectors.to(weight.device, weight.dtype)
    return ids
