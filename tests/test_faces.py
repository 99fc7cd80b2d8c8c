"""Face similarity: FaceNet by path, MTCNN detection, the detection rate, one-line errors.

facenet-pytorch needs torchvision, which the core install leaves out: `make test` runs this file
in .faces-venv (torch 2.14.1 + torchvision), where it is never skipped.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.evaluation import FaceScorer, face_similarity

HAVE_FACENET = importlib.util.find_spec("facenet_pytorch") is not None
needs_facenet = pytest.mark.skipif(
    not HAVE_FACENET,
    reason="facenet-pytorch is not installed here; make test runs it in .faces-venv",
)


@pytest.mark.skipif(HAVE_FACENET, reason="checks the core install, which has no facenet-pytorch")
def test_missing_facenet_is_a_one_line_error():
    with pytest.raises(HyperboothError, match="make faces-venv") as error:
        FaceScorer("vggface2")
    assert "\n" not in str(error.value)


def _photo() -> Image.Image:
    """A real photograph of a face that ships with matplotlib (Grace Hopper)."""
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _noise(seed: int = 0, size: int = 200) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def facenet(tmp_path_factory):
    """A randomly initialised InceptionResnetV1 (with a classifier head) saved as safetensors."""
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = InceptionResnetV1(classify=True, num_classes=7).eval()
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("facenet") / "facenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@needs_facenet
def test_embeddings_match_a_hand_computation(facenet):
    path, model = facenet
    scorer = FaceScorer(str(path), detect=False)
    images = [_noise(1, 96), _noise(2, 200)]
    got, found = scorer.faces(images)
    assert found == [True, True] and got.shape == (2, 512)
    by_hand = []
    for image in images:
        pixels = np.asarray(image.resize((160, 160), Image.Resampling.BILINEAR), np.float32)
        x = torch.from_numpy((pixels - 127.5) / 128.0).permute(2, 0, 1)[None]
        model.classify = False  # the embedding, not the classifier's logits
        with torch.no_grad():
            e = model(x)[0]
        by_hand.append(e / e.norm())
    by_hand = torch.stack(by_hand)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    report = face_similarity(scorer, images, [images[0]])
    assert report["face"] == pytest.approx(float((by_hand @ by_hand[0]).mean()), abs=1e-5)
    assert report["face_detection_rate"] == 1.0


@needs_facenet
def test_a_missed_face_is_counted_not_scored_zero(facenet):
    path, _ = facenet
    scorer = FaceScorer(str(path))  # MTCNN with facenet-pytorch's shipped detector weights
    photo = _photo()
    crop = scorer.crop(photo)
    assert crop is not None and crop.shape == (3, 160, 160)
    assert scorer.crop(_noise()) is None
    report = face_similarity(scorer, [photo, _noise()], [photo])
    assert report["face_detection_rate"] == 0.5
    assert report["face_references_detected"] == 1
    assert report["face"] == pytest.approx(1.0, abs=1e-5)  # the same face; the miss is left out
    nothing = face_similarity(scorer, [_noise(3)], [photo])
    assert nothing["face"] is None and nothing["face_detection_rate"] == 0.0
    with pytest.raises(HyperboothError, match="no face found in any reference") as error:
        face_similarity(scorer, [photo], [_noise()])
    assert "\n" not in str(error.value)


@needs_facenet
def test_bad_weights_are_one_line_errors(tmp_path, monkeypatch):
    import facenet_pytorch.models.inception_resnet_v1 as irv1
    from safetensors.torch import save_file

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(irv1, "download_url_to_file", offline)
    with pytest.raises(HyperboothError, match="local .safetensors") as error:
        FaceScorer("vggface2")
    messages = [str(error.value)]
    with pytest.raises(HyperboothError, match="existing .safetensors") as error:
        FaceScorer(str(tmp_path / "missing.safetensors"))
    messages.append(str(error.value))
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HyperboothError, match="not an InceptionResnetV1") as error:
        FaceScorer(str(tmp_path / "other.safetensors"))
    messages.append(str(error.value))
    assert all("\n" not in m for m in messages)


@needs_facenet
def test_eval_command_reports_face_similarity(facenet, tmp_path, capsys):
    path, _ = facenet
    photo = _photo().convert("RGB")
    generated = tmp_path / "generated"
    generated.mkdir()
    photo.save(generated / "0_0.png")
    _noise().save(generated / "1_0.png")
    photo.save(tmp_path / "reference.png")
    (tmp_path / "prompts.txt").write_text("a photo of sks person\nsks person in a forest\n")
    cli(
        [
            "eval", "--generated", str(generated), "--references", str(tmp_path / "reference.png"),
            "--prompts", str(tmp_path / "prompts.txt"), "--no-clip", "--no-dino",
            "--face", str(path), "--json",
        ]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["face_model"] == str(path)
    assert report["face_detection_rate"] == 0.5
    assert report["face"] == pytest.approx(1.0, abs=1e-4)  # PNG round trip of the same photo


@needs_facenet
def test_benchmark_scores_faces(facenet, tmp_path):
    path, _ = facenet
    subject = tmp_path / "subjects" / "hopper"
    subject.mkdir(parents=True)
    _photo().convert("RGB").save(subject / "photo.png")
    (subject / "class.txt").write_text("person\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the snow\n")
    out = tmp_path / "bench"
    args = ["benchmark", "--base", "tiny-random", "--device", "cpu", "--methods", "lidb"]
    args += ["--subjects", str(tmp_path / "subjects"), "--prompts", str(prompts), "--seeds", "2"]
    args += ["--method-steps", "lidb=1", "--sampling-steps", "2", "--face", str(path)]
    assert cli([*args, "--out", str(out)]) == 0
    scores = json.loads((out / "cells" / "lidb" / "hopper" / "result.json").read_text())["scores"]
    # tiny-random draws noise: no face is found, which is a detection rate of 0, not a score of 0
    assert scores["face_detection_rate"] == 0.0 and scores["face"] is None
    assert "face_detection_rate" in (out / "table.md").read_text()


@needs_facenet
def test_benchmark_refuses_a_subject_without_a_face_before_fitting(facenet, tmp_path, capsys):
    path, _ = facenet
    subject = tmp_path / "subjects" / "noise"
    subject.mkdir(parents=True)
    _noise().save(subject / "photo.png")
    (tmp_path / "prompts.txt").write_text("a {} in the snow\n")
    args = ["benchmark", "--base", "tiny-random", "--device", "cpu", "--methods", "lidb"]
    args += ["--subjects", str(tmp_path / "subjects"), "--prompts", str(tmp_path / "prompts.txt")]
    args += ["--face", str(path), "--out", str(tmp_path / "bench")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "subject 'noise': no face found" in err and "\n" not in err
    assert not (tmp_path / "bench" / "cells").exists()
