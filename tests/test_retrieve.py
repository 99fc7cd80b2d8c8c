"""Retrieving a regularisation set by text-encoder similarity of captions to a prompt."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.retrieve import captioned_images, retrieve


def _folder(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for name, caption in [("a", "a face"), ("b", "a red car on a road"), ("c", "a face smiling")]:
        Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    Image.new("RGB", (32, 32)).save(folder / "uncaptioned.png")
    return folder


def test_the_caption_equal_to_the_prompt_ranks_first_at_similarity_one(tiny_base, tmp_path):
    folder = _folder(tmp_path)
    assert [p.name for p, _ in captioned_images(folder)] == ["a.png", "b.png", "c.png"]
    everything = retrieve(tiny_base, folder, "a face", threshold=-1.0)
    assert everything[0].image.name == "a.png"
    assert everything[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [m.similarity for m in everything] == sorted(
        (m.similarity for m in everything), reverse=True
    )
    assert len(retrieve(tiny_base, folder, "a face", threshold=-1.0, limit=2)) == 2
    assert retrieve(tiny_base, folder, "a face", threshold=1.01) == []


def test_empty_folders_and_no_match_are_one_line_errors(tiny_base, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HyperboothError, match="no captioned images"):
        captioned_images(tmp_path / "empty")
    folder = _folder(tmp_path)
    base = ["retrieve", "--base", "tiny-random", "--folder", str(folder), "--prompt", "a face"]
    assert cli([*base, "--threshold", "1.01", "--out", str(tmp_path / "out")]) == 2
    assert cli([*base, "--threshold", "0.99", "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["image"] == "a.png" and (tmp_path / "out" / "a.txt").is_file()
    assert (tmp_path / "out" / "a.png").stat().st_mode & 0o777 == (
        folder / "a.png"
    ).stat().st_mode & 0o777
    for flags, message in (
        (["--limit", "0", "--out", str(tmp_path / "o2")], "--limit must be >= 1"),
        (["--threshold", "0.99", "--out", str(folder)], "is the folder searched"),
    ):
        capsys.readouterr()
        assert cli([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    (folder / "a.txt").write_bytes("un visage \xe9t\xe9".encode("latin-1"))
    with pytest.raises(HyperboothError, match="not UTF-8"):
        captioned_images(folder)
