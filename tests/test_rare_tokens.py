"""Rare identifier words: Custom Diffusion's counting rule and DreamBooth's short rare tokens."""

from __future__ import annotations

from hyperbooth.bases import clip_tokenizer
from hyperbooth.cli import main as cli
from hyperbooth.rare_tokens import custom_diffusion_tokens, dreambooth_tokens


def test_words_seen_five_to_ten_times_and_inside_no_other_word_are_kept():
    # Each of these words is one CLIP token.
    captions = ["a pine"] * 6 + ["a pineapple"] * 7 + ["an owl"] * 4 + ["the tiger"] * 12
    captions += ["a parrot 42"] * 5 + ["a falcon"] * 10
    found = dict(custom_diffusion_tokens(clip_tokenizer(), captions))
    # pine is inside pineapple; owl is too rare; tiger and "a" too common; 42 not alphabetic.
    assert found == {"pineapple": 7, "parrot": 5, "falcon": 10}


def test_dreambooth_tokens_are_short_whole_words_and_fixed_by_the_seed():
    tokenizer = clip_tokenizer()
    first = dreambooth_tokens(tokenizer, 10, seed=3)
    assert first == dreambooth_tokens(tokenizer, 10, seed=3) and len(set(first)) == 10
    assert all(w.isalpha() and len(w) <= 3 for w in first)
    assert all(len(tokenizer.tokenize(w)) == 1 for w in first)  # each stays one token


def test_the_command_reads_a_caption_file_and_fails_cleanly(tmp_path, capsys):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(["a falcon on a hill"] * 6 + ["a dog"] * 20))
    assert cli(["rare-tokens", "--captions", str(corpus), "--json"]) == 0
    assert '"word": "falcon"' in capsys.readouterr().out
    assert cli(["rare-tokens", "--captions", str(tmp_path / "absent.txt")]) == 2
    (tmp_path / "empty.txt").write_text("\n")
    assert cli(["rare-tokens", "--captions", str(tmp_path / "empty.txt")]) == 2
