"""The metrics: backbones load by path, preprocessing and cosines match a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.evaluation import (
    ClipScorer,
    DinoScorer,
    diversity,
    evaluate,
    kid,
    read_generated,
)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Randomly initialised CLIP and DINO (ViT) models of the real classes, saved to folders."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from hyperbooth.bases import clip_tokenizer

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 49408},
            vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
    )  # fmt: skip
    clip.save_pretrained(root / "clip")
    clip_tokenizer().save_pretrained(root / "clip")
    dino = ViTModel(
        ViTConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        add_pooling_layer=False,
    )  # fmt: skip
    dino.save_pretrained(root / "dino")
    return root


def _images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)
    ]


def _by_hand(image: Image.Image, size: int, resize: int, mean, std) -> torch.Tensor:
    """Short side to `resize`, centre crop `size`, [0, 1], normalise: written out independently."""
    w, h = image.size
    if w < h:
        new = (resize, round(h * resize / w))
    else:
        new = (round(w * resize / h), resize)
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size))).astype(np.float32) / 255
    array = (array - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_clip_scores_equal_a_hand_computation(backbones):
    scorer = ClipScorer(str(backbones / "clip"))
    model = scorer.model
    images, texts = _images(3), ["a face", "a red face wearing a hat"]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    with torch.no_grad():
        pixels = torch.cat([_by_hand(im, 32, 32, mean, std) for im in images])
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(scorer.images(images), image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.texts(texts), text, atol=1e-5, rtol=1e-5)


def test_dino_uses_the_cls_token_after_resize_and_crop(backbones):
    scorer = DinoScorer(str(backbones / "dino"))
    images = _images(2, seed=1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        pixels = torch.cat([_by_hand(im, 32, round(32 * 256 / 224), mean, std) for im in images])
        cls = scorer.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(
        scorer.images(images), cls / cls.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5
    )


def test_report_matches_its_definitions(backbones, tmp_path):
    clip, dino = ClipScorer(str(backbones / "clip")), DinoScorer(str(backbones / "dino"))
    prompts = ["a sks face", "a sks face wearing a hat"]
    for i, image in enumerate(_images(4, seed=2)):
        image.save(tmp_path / f"{i % 2}_{i}.png")
    generated = read_generated(tmp_path, prompts)
    references = _images(2, seed=3)
    report = evaluate(generated, references, prompts, clip, dino, token="sks")
    image_e, ref_e = clip.images(generated.images), clip.images(references)
    text_e = clip.texts(["a face", "a face wearing a hat"])
    expected_t = np.mean(
        [float(image_e[k] @ text_e[p]) for k, p in enumerate(generated.prompt_index)]
    )
    assert report["clip_t"] == pytest.approx(expected_t, abs=1e-6)
    assert report["clip_i"] == pytest.approx(float((image_e @ ref_e.T).mean()), abs=1e-6)
    d, r = dino.images(generated.images), dino.images(references)
    assert report["dino"] == pytest.approx(float((d @ r.T).mean()), abs=1e-6)
    index = np.array(generated.prompt_index)
    pairs = [1 - float(d[i] @ d[j]) for p in (0, 1) for i, j in [np.nonzero(index == p)[0]]]
    assert report["div"] == pytest.approx(np.mean(pairs), abs=1e-6)


def test_kid_is_zero_in_expectation_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    assert abs(kid(x, y)) < 0.02
    assert kid(x, y + 1.0) > 0.1
    assert diversity([torch.eye(3)]) == pytest.approx(1.0)


def test_missing_backbones_and_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(HyperboothError, match="--clip .*nowhere: no such folder"):
        ClipScorer(str(tmp_path / "nowhere"))
    with pytest.raises(HyperboothError, match="--dino"):
        DinoScorer(str(tmp_path / "nowhere"))
    _images(1)[0].save(tmp_path / "picture.png")
    with pytest.raises(HyperboothError, match="prompt index"):
        read_generated(tmp_path, ["a", "b"])
    from hyperbooth.evaluation import judge_scores

    with pytest.raises(HyperboothError, match="not a miniature-world reference"):
        judge_scores(read_generated(tmp_path, ["a"]), tmp_path / "none.json", ["a"], None)
    (tmp_path / "picture.png").write_bytes(b"not a png")  # a damaged image: one line
    with pytest.raises(HyperboothError, match="not a readable image"):
        read_generated(tmp_path, ["a"])


def test_cli_eval_writes_a_report(backbones, tmp_path):
    generated, references = tmp_path / "gen", tmp_path / "ref"
    generated.mkdir()
    references.mkdir()
    for i, image in enumerate(_images(2)):
        image.save(generated / f"0_{i}.png")
        image.save(references / f"r{i}.png")
    (tmp_path / "prompts.txt").write_text("a sks face\n")
    args = ["eval", "--generated", str(generated), "--references", str(references)]
    args += ["--prompts", str(tmp_path / "prompts.txt"), "--token", "sks"]
    args += ["--clip", str(backbones / "clip"), "--dino", str(backbones / "dino")]
    assert cli([*args, "--out", str(tmp_path / "report.json"), "--json"]) == 0

    report = json.loads((tmp_path / "report.json").read_text())
    same = ClipScorer(str(backbones / "clip")).images(_images(2))  # references = generated here
    assert report["clip_i"] == pytest.approx(float((same @ same.T).mean()), abs=1e-6)
    assert report["images"] == 2 and -1 <= report["clip_t"] <= 1
    assert cli([*args[:-2], "--clip", str(tmp_path / "missing")]) == 2


def test_judge_scores_on_renders_of_the_reference_are_near_perfect(tmp_path):
    from dataclasses import replace

    from hyperbooth.demo import REFERENCE_INFO
    from hyperbooth.evaluation import judge_scores
    from hyperbooth.miniworld.evaluate import REFERENCE_CONTEXT, held_out_identities
    from hyperbooth.miniworld.render import render

    identity = held_out_identities(1)[0]  # the demo's reference identity
    hat = replace(REFERENCE_CONTEXT, headwear=1)
    for seed in range(4):
        render(identity, hat, seed).save(tmp_path / f"0_{seed}.png")
    prompts = ["a sks face wearing a hat"]
    scores = judge_scores(read_generated(tmp_path, prompts), REFERENCE_INFO, prompts, "sks")
    assert scores["judge_identity"] >= 0.9 and scores["judge_prompt"] == 1.0


def test_pres_and_kid_come_from_dino_features(backbones, tmp_path):
    dino = DinoScorer(str(backbones / "dino"))
    for i, image in enumerate(_images(3, seed=4)):
        image.save(tmp_path / f"0_{i}.png")
    generated = read_generated(tmp_path, ["a sks face"])
    references, class_images, real = _images(2, seed=5), _images(3, seed=6), _images(4, seed=7)
    report = evaluate(generated, references, ["a sks face"], None, dino, "sks", class_images, real)
    expected = float((dino.images(class_images) @ dino.images(references).T).mean())
    assert report["pres"] == pytest.approx(expected, abs=1e-6)
    assert report["kid"] == pytest.approx(kid(dino.images(generated.images), dino.images(real)))
    with pytest.raises(HyperboothError, match="DINO"):
        evaluate(generated, references, ["a sks face"], None, None, "sks", class_images)


def test_mini_real_images_are_renders_of_held_out_identities():
    from hyperbooth.evaluation import mini_real_images

    images = mini_real_images(3)
    assert len(images) == 3 and images[0].size == (64, 64)
    assert [np.asarray(a).tolist() for a in images] == [
        np.asarray(b).tolist() for b in mini_real_images(3)
    ]
