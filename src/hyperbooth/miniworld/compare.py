"""Pool and pair `evaluate personalisation` reports: mean scores, and paired differences.

  python -m hyperbooth.miniworld.compare A.json B.json@3.0 [--vs C.json D.json@3.0] [--json]

Each argument is a report, or a report at one of its `--also-guidance` scales (`@G`, as the
report spells it: `@3.0`); `FILE#KEY` is the report under KEY in a JSON that bundles several.
The identities of every report named are pooled. With `--vs`, the two sides must hold the
same identities in the same order (the same runs' seeds). Then each score's paired difference
is printed: the mean of (left - right) per identity, +- its standard error. That is how
docs/MINIWORLD.md compares settings. `--first N` keeps each report's first N identities, so a
short diagnostic run pairs with a longer run of the same seed. The mean fit time (and, for
hyperdreambooth, each stage's) is printed when the reports hold it; `--by-prompt` also prints
the means per prompt.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from hyperbooth.errors import HyperboothError, run_module
from hyperbooth.miniworld.evaluate import SCORES, mean_scores

Loaded = tuple[str, str, dict, list[dict]]  # path, guidance, report, identity rows


def load(spec: str) -> Loaded:
    """(path, guidance, report, identity rows) of one `report[#KEY][@G]`, read once."""
    path, _, guidance = spec.partition("@")
    path, _, key = path.partition("#")
    try:
        report = json.loads(Path(path).read_text())
        report = report[key] if key else report
        rows = report["identities"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyperboothError(
            f"{path}: not an `evaluate personalisation` report ({error}); pass its --out JSON"
        ) from None
    return path, guidance, report, rows


def _by_prompt(path: str, guidance: str, row: dict) -> list[dict[str, float]] | None:
    """One identity's scores per prompt at the guidance asked for (None if not stored)."""
    if not guidance:
        return row.get("personalised_by_prompt")
    scales = row.get("also_guidance", {})
    if guidance not in scales:
        raise HyperboothError(
            f"{path} has no guidance {guidance!r} (it has {', '.join(scales) or 'none'}); "
            "write it as the report does, e.g. @3.0"
        )
    return scales[guidance]["personalised_by_prompt"]


def identity_scores(loaded: Loaded) -> list[tuple[int, dict[str, float]]]:
    """(identity index, mean scores over its prompts) per identity of one loaded report."""
    path, guidance, _, rows = loaded
    try:
        if not guidance:
            return [(row["identity"], mean_scores([row["personalised"]])) for row in rows]
        return [(row["identity"], mean_scores(_by_prompt(path, guidance, row))) for row in rows]
    except (KeyError, TypeError, AttributeError) as error:
        raise HyperboothError(
            f"{path}: an identity row lacks {error}; pass an `evaluate personalisation` report"
        ) from None


def pooled(
    reports: Sequence[Loaded], first: int | None = None
) -> list[tuple[int, dict[str, float]]]:
    """The identities of several reports (each report's first `first` only), in the order given."""
    return [row for loaded in reports for row in identity_scores(loaded)[:first]]


def details(reports: Sequence[Loaded], first: int | None = None) -> dict:
    """Per-prompt means and mean fit (and stage) seconds over the pooled identities, if stored."""
    prompt_lists = {tuple(report.get("prompts") or ()) for _, _, report, _ in reports}
    texts = prompt_lists.pop() if len(prompt_lists) == 1 else ()  # one prompt list, or none
    rows = [(path, g, row) for path, g, _, rows in reports for row in rows[:first]]
    per_prompt = [_by_prompt(path, g, row) for path, g, row in rows]
    fits = [row.get("fit_seconds") for _, _, row in rows]
    stages = [row.get("stage_seconds") for _, _, row in rows]
    out: dict = {}
    if texts and all(scores is not None and len(scores) == len(texts) for scores in per_prompt):
        out["by_prompt"] = [
            {"text": text, **mean_scores([scores[k] for scores in per_prompt])}
            for k, text in enumerate(texts)
        ]
    if fits and None not in fits:
        out["fit_seconds"] = sum(fits) / len(fits)
    if stages and None not in stages:
        out["stage_seconds"] = {
            name: sum(stage[name] for stage in stages) / len(stages) for name in stages[0]
        }
    return out


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def compare(left: Sequence[str], right: Sequence[str] = (), first: int | None = None) -> dict:
    """Mean scores of the pooled left side, and with a right side the paired differences."""
    if first is not None and first < 1:
        raise HyperboothError(f"--first must be >= 1, got {first}")
    reports = [load(spec) for spec in left]
    rows = pooled(reports, first)
    if not rows:
        raise HyperboothError("the reports hold no identities")
    result: dict = {
        "identities": len(rows),
        "mean": {s: mean_and_error([r[s] for _, r in rows]) for s in SCORES},
        **details(reports, first),
    }
    if right:
        other = pooled([load(spec) for spec in right], first)
        if [i for i, _ in rows] != [i for i, _ in other]:
            raise HyperboothError(
                f"the two sides hold different identities ({len(rows)} against {len(other)}, "
                "or another order); pair reports of the same --seed in the same order"
            )
        result["paired"] = {
            s: mean_and_error([a[s] - b[s] for (_, a), (_, b) in zip(rows, other, strict=True)])
            for s in SCORES
        }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Print pooled means and paired differences of personalisation reports."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "reports", nargs="+", help="report.json, report.json@G or bundle.json#KEY[@G]"
    )
    parser.add_argument("--vs", nargs="+", default=[], help="the reports to pair them with")
    parser.add_argument(
        "--first", type=int, default=None, metavar="N", help="only each report's first N identities"
    )
    parser.add_argument(
        "--by-prompt", action="store_true", help="also print the left side's means per prompt"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = compare(args.reports, args.vs, args.first)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['identities']} identities")
    for score, (mean, error) in result["mean"].items():
        line = f"{score:>8}: {mean:.3f} +- {error:.3f}"
        if "paired" in result:
            diff, diff_error = result["paired"][score]
            line += f"   paired: {diff:+.3f} +- {diff_error:.3f}"
        print(line)
    if "fit_seconds" in result:
        stages = result.get("stage_seconds", {})
        parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in stages.items())
        print(
            f"     fit: {result['fit_seconds']:.2f} s per identity"
            + (f" ({parts})" if parts else "")
        )
    if args.by_prompt:
        if "by_prompt" not in result:
            raise HyperboothError("the reports hold no per-prompt rows for the same prompts")
        for row in result["by_prompt"]:
            scores = "  ".join(f"{score} {row[score]:.3f}" for score in SCORES)
            print(f"  {row['text'][:50]:<50}  {scores}")


if __name__ == "__main__":
    run_module(main, "hyperbooth.miniworld.compare")
