"""Textual Inversion: only the new rows train, diffusers' loader reads our file, bad words fail."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.methods import SubjectConfig, TextualInversionConfig, personalise
from hyperbooth.methods.textual_inversion import LEARNED_EMBEDS, load_textual_inversion
from hyperbooth.training import TrainConfig
from test_export import _pipeline  # a plain diffusers pipeline, no hyperbooth code

EMBEDDING = "embeddings.token_embedding.weight"  # in CLIPTextModel's state dict (transformers 5)


def _fit(base, tmp_path, vectors: int = 1, token: str = "<me>", initializer: str = "face"):
    return personalise(
        base,
        [Image.new("RGB", (32, 32), (190, 90, 40))],
        tmp_path / "ti",
        "textual-inversion",
        SubjectConfig(token=token, class_name="face"),
        train_config=TrainConfig(steps=3, learning_rate=0.1, device="cpu"),
        progress=False,
        textual_inversion=TextualInversionConfig(initializer, vectors),
    )


def test_only_the_new_rows_train_and_every_other_weight_is_bit_identical(tiny_base, tmp_path):
    before = {k: v.clone() for k, v in tiny_base.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    rows = len(tiny_base.tokenizer)
    initial = before[EMBEDDING][tiny_base.tokenizer("face", add_special_tokens=False).input_ids[0]]
    result = _fit(tiny_base, tmp_path, vectors=2)
    after = tiny_base.text_encoder.state_dict()
    embedding = after[EMBEDDING]
    assert embedding.shape[0] == rows + 2
    assert torch.equal(embedding[:rows], before[EMBEDDING])
    assert all(torch.equal(after[k], v) for k, v in before.items() if "token_embedding" not in k)
    assert all(torch.equal(tiny_base.unet.state_dict()[k], v) for k, v in unet_before.items())
    stored = load_file(str(result.output))
    assert result.output.name == LEARNED_EMBEDS and stored["<me>"].shape == (2, initial.shape[0])
    assert not torch.equal(stored["<me>"][0], initial)  # it trained
    assert torch.equal(embedding[rows:], stored["<me>"])


def test_diffusers_loads_our_file_and_encodes_prompts_as_we_do(tiny_base, tmp_path):
    fresh = copy.deepcopy(tiny_base)
    result = _fit(tiny_base, tmp_path, vectors=2)
    pipe = _pipeline(copy.deepcopy(fresh))
    pipe.load_textual_inversion(str(result.output))
    ours = copy.deepcopy(fresh)
    assert load_textual_inversion(result.output, ours) == ["<me>"]

    def encode(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids)[0]

    # diffusers expands "<me>" into "<me> <me>_1" when it tokenises a prompt.
    theirs = encode(
        pipe.tokenizer, pipe.text_encoder, pipe.maybe_convert_prompt("a <me> face", pipe.tokenizer)
    )
    mine = encode(ours.tokenizer, ours.text_encoder, "a <me> <me>_1 face")
    torch.testing.assert_close(theirs, mine, atol=0, rtol=0)


def test_words_already_known_and_long_initializers_are_one_line_errors(tiny_base, tmp_path):
    with pytest.raises(HyperboothError, match="already in the vocabulary"):
        _fit(copy.deepcopy(tiny_base), tmp_path, token="sks")
    with pytest.raises(HyperboothError, match="3 tokens, one vector each"):
        _fit(copy.deepcopy(tiny_base), tmp_path, vectors=2, initializer="a red face")


def test_embedding_files_of_other_formats_load_or_fail_in_one_line(tiny_base, tmp_path):
    from safetensors.torch import save_file

    dim = tiny_base.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.randn(2, dim)}, tmp_path / "myface.safetensors")  # A1111's
    base = copy.deepcopy(tiny_base)
    assert load_textual_inversion(tmp_path / "myface.safetensors", base) == ["myface"]
    assert "myface" in base.tokenizer.get_vocab()
    save_file({"unet.x.lora_down.weight": torch.zeros(1, 4)}, tmp_path / "lora.safetensors")
    (tmp_path / "text.safetensors").write_text("not tensors")
    for name, match in (("lora", "holds model weights"), ("text", "not a readable"),
                        ("missing", "not found")):  # fmt: skip
        with pytest.raises(HyperboothError, match=match):
            load_textual_inversion(tmp_path / f"{name}.safetensors", copy.deepcopy(tiny_base))


def test_a_phrase_initialises_one_vector_per_token(tiny_base, tmp_path):
    from hyperbooth.methods import TextualInversion, prepare_subject

    phrase = "a face with red hair"
    tokens = tiny_base.tokenizer(phrase, add_special_tokens=False).input_ids
    rows = tiny_base.text_encoder.get_input_embeddings().weight.detach().clone()
    subject = SubjectConfig(token="<me>")
    image = Image.new("RGB", (32, 32), (190, 90, 40))
    data = prepare_subject(tiny_base, subject, [image], torch.device("cpu"), tmp_path, False)
    method = TextualInversion(tiny_base, subject, data, TextualInversionConfig(phrase))
    assert len(tokens) == 5 and torch.equal(method.vectors.detach(), rows[tokens])
    # The prompt names every vector ("a <me> <me>_1 ... <me>_4 face"), in order.
    names = ["<me>"] + [f"<me>_{i}" for i in range(1, 5)]
    ids = tiny_base.tokenizer.convert_tokens_to_ids(names)
    row = data.instance_ids[0].tolist()
    assert row[row.index(ids[0]) : row.index(ids[0]) + 5] == ids


def test_the_cli_trains_and_generates_with_the_new_word(tmp_path, capsys):
    Image.new("RGB", (32, 32), (20, 160, 90)).save(tmp_path / "me.png")
    out = tmp_path / "run"
    args = ["train", "--method", "textual-inversion", "--base", "tiny-random", "--device", "cpu"]
    args += ["--images", str(tmp_path / "me.png"), "--token", "<me>", "--steps", "2"]
    assert cli([*args, "--out", str(out)]) == 0
    grid = tmp_path / "grid.png"
    generate = [
        "generate",
        "--base",
        "tiny-random",
        "--textual-inversion",
        str(out / LEARNED_EMBEDS),
    ]
    generate += ["--prompt", "a <me> face", "--n", "1", "--steps", "2", "--out", str(grid)]
    assert cli(generate) == 0 and grid.is_file()
    # Without its file the word is unknown: a one-line error, and no grid.
    capsys.readouterr()
    unknown = [*generate[:3], *generate[5:-1], str(tmp_path / "unknown.png")]
    assert cli(unknown) == 2
    err = capsys.readouterr().err.strip()
    assert "names <me>, which this base does not know" in err and "\n" not in err
    assert not (tmp_path / "unknown.png").exists()


def test_prompt_templates_train_the_word_in_every_template(tiny_base, tmp_path):
    from hyperbooth.methods import TextualInversion, prepare_subject
    from hyperbooth.methods.textual_inversion import MINI_TEMPLATES, read_templates

    subject = SubjectConfig(token="<me>")
    image = Image.new("RGB", (32, 32), (190, 90, 40))
    data = prepare_subject(tiny_base, subject, [image], torch.device("cpu"), tmp_path, False)
    config = TextualInversionConfig(templates=read_templates("mini"))
    method = TextualInversion(tiny_base, subject, data, config)
    assert data.instance_ids.shape[0] == len(MINI_TEMPLATES)
    word = tiny_base.tokenizer.convert_tokens_to_ids("<me>")
    assert all(word in row.tolist() for row in data.instance_ids)
    from hyperbooth.training import StepBatch

    loss = method.loss(StepBatch(torch.Generator().manual_seed(0), 3))
    loss.backward()
    assert method.vectors.grad is not None and method.vectors.grad.abs().sum() > 0
    with pytest.raises(HyperboothError, match="exactly one"):
        TextualInversionConfig(templates=("a photo of a face",))
    with pytest.raises(HyperboothError, match="templates"):
        read_templates(str(tmp_path / "missing.txt"))


def test_pivotal_lora_trains_the_word_and_the_adapter_and_generate_reads_both(tmp_path, capsys):
    Image.new("RGB", (32, 32), (20, 160, 90)).save(tmp_path / "me.png")
    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--base", "tiny-random", "--device", "cpu", "--pivotal"]
    args += ["--images", str(tmp_path / "me.png"), "--token", "<me>", "--steps", "3"]
    args += ["--no-text-encoder", "--lr", "0.1", "--rank", "2", "--json"]
    assert cli([*args, "--out", str(out)]) == 0
    from hyperbooth.adapters.files import read_adapter
    from hyperbooth.bases import load_base

    base = load_base("tiny-random")
    face = base.text_encoder.get_input_embeddings().weight[
        base.tokenizer("face", add_special_tokens=False).input_ids[0]
    ]
    word = load_file(str(out / LEARNED_EMBEDS))["<me>"]
    assert word.shape == (1, face.shape[0]) and not torch.equal(word[0], face)  # it trained
    adapter = read_adapter(out / "adapter.safetensors")
    assert adapter.info["new_word"] == {"token": "<me>", "file": LEARNED_EMBEDS}
    assert any(v.abs().sum() > 0 for k, v in adapter.tensors.items() if k.endswith("up"))
    assert all(k.startswith("unet.") for k in adapter.tensors)  # the text encoder stays frozen
    grid = tmp_path / "grid.png"
    generate = ["generate", "--base", "tiny-random", "--adapter", str(out / "adapter.safetensors")]
    generate += ["--prompt", "a <me> face", "--n", "1", "--steps", "2"]
    # The word loads from the file beside the adapter, or from --textual-inversion as given.
    assert cli([*generate, "--out", str(grid)]) == 0 and grid.is_file()
    record = json.loads(grid.with_suffix(".json").read_text())["textual_inversion"]
    assert record == {"files": [str(out / LEARNED_EMBEDS)], "tokens": ["<me>"]}  # reproducible
    explicit = [*generate, "--textual-inversion", str(out / LEARNED_EMBEDS)]
    assert cli([*explicit, "--out", str(tmp_path / "explicit.png")]) == 0
    (out / LEARNED_EMBEDS).rename(tmp_path / "moved.safetensors")
    capsys.readouterr()
    assert cli([*generate, "--out", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not beside it; pass it with --textual-inversion" in err and "\n" not in err
    assert not (tmp_path / "missing.png").exists()


def test_pivotal_needs_a_new_word_a_frozen_text_encoder_and_an_adapter_method(tmp_path, capsys):
    Image.new("RGB", (32, 32), (20, 160, 90)).save(tmp_path / "me.png")
    args = ["train", "--base", "tiny-random", "--device", "cpu", "--pivotal", "--steps", "1"]
    args += ["--images", str(tmp_path / "me.png"), "--out", str(tmp_path / "run")]
    cases = [
        (["--method", "lora", "--no-text-encoder"], "already in the vocabulary"),
        (["--method", "lora", "--token", "<me>"], "--no-text-encoder"),
        (["--method", "dreambooth", "--token", "<me>"], "--pivotal is for lora and lidb"),
        (["--method", "lora", "--token", "<me>", "--no-text-encoder", "--word-steps", "2"],
         "--word-steps 2 must be in 0..1 (--steps)"),
        (["--method", "lora", "--token", "<me>", "--no-text-encoder", "--word-steps", "-1"],
         "--word-steps -1 must be in 0..1 (--steps)"),
        (["--method", "lora", "--token", "<me>", "--no-text-encoder", "--word-lr", "-1"],
         "--word-lr must be >= 0"),
    ]  # fmt: skip
    for extra, message in cases:
        capsys.readouterr()
        assert cli([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def _pivotal_fit(base, out, steps: int, **options) -> None:
    """A 2-rank pivotal LoRA on one flat image, the UNet only, at lr 0.05."""
    from hyperbooth.adapters.config import AdapterConfig

    personalise(
        copy.deepcopy(base),
        [Image.new("RGB", (32, 32), (190, 90, 40))],
        out,
        "lora",
        SubjectConfig(token="<me>", class_name="face"),
        AdapterConfig(rank=2, text_encoder_targets=()),
        TrainConfig(steps=steps, learning_rate=0.05, device="cpu"),
        train_text_encoder=False,
        progress=False,
        pivotal=True,
        **options,
    )


def test_pivotal_word_steps_train_the_word_first_then_the_adapter_with_the_word_fixed(
    tiny_base, tmp_path
):
    from hyperbooth.adapters.files import read_adapter

    def fit(steps: int, out: str):
        _pivotal_fit(tiny_base, tmp_path / out, steps, word_steps=2)
        word = load_file(str(tmp_path / out / LEARNED_EMBEDS))["<me>"]
        tensors = read_adapter(tmp_path / out / "adapter.safetensors").tensors.values()
        return word, [v for v in tensors if not v.abs().sum() > 0]  # LoRA's up starts at zero

    word_first, zero_first = fit(2, "first")
    word_all, zero_all = fit(4, "all")
    initial = tiny_base.text_encoder.get_input_embeddings().weight[
        tiny_base.tokenizer("face", add_special_tokens=False).input_ids[0]
    ]
    assert not torch.equal(word_first[0], initial)  # the word trained in its phase
    assert torch.equal(word_first, word_all)  # and stayed fixed after it
    assert len(zero_first) > 0  # the adapter's up factors were still zero after phase 1
    assert len(zero_all) == 0  # and all moved in phase 2


def test_the_pivotal_word_trains_at_its_own_learning_rate(tiny_base, tmp_path):
    from hyperbooth.adapters.config import AdapterConfig
    from hyperbooth.methods import make_method, prepare_subject
    from hyperbooth.training import param_groups

    def fit(word_lr: float | None, out: str) -> torch.Tensor:
        phrase = TextualInversionConfig("face with red hair")
        _pivotal_fit(
            tiny_base, tmp_path / out, 2, textual_inversion=phrase, word_learning_rate=word_lr
        )
        return load_file(str(tmp_path / out / LEARNED_EMBEDS))["<me>"]

    tokens = tiny_base.tokenizer("face with red hair", add_special_tokens=False).input_ids
    initial = tiny_base.text_encoder.get_input_embeddings().weight[tokens].detach()
    assert torch.equal(fit(0.0, "fixed"), initial)  # at rate 0 the word keeps its start
    assert not torch.equal(fit(None, "run_rate"), initial)  # at the run's rate it moves
    # The groups: the adapter at the run's rate, the word at its own.
    base = copy.deepcopy(tiny_base)
    subject = SubjectConfig(token="<me>", class_name="face")
    image = Image.new("RGB", (32, 32), (190, 90, 40))
    data = prepare_subject(base, subject, [image], torch.device("cpu"), tmp_path / "g", False)
    method = make_method(
        "lora", base, subject, data, AdapterConfig(rank=2, text_encoder_targets=()), False,
        TextualInversionConfig(), pivotal=True, word_learning_rate=1e-4,
    )  # fmt: skip
    groups = param_groups(method.trainable(), 0.05, method.learning_rates)
    assert [g["lr"] for g in groups] == [0.05, 1e-4]
    assert groups[1]["params"] == [method.word.vectors]
    assert len(groups[0]["params"]) == len(method.trainable()) - 1
    with pytest.raises(HyperboothError, match="--word-lr is for --pivotal"):
        make_method("lora", base, subject, data, word_learning_rate=1e-4)
