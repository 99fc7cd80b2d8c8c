"""Custom Diffusion's closed-form merge of separately tuned concepts (METHOD 2).

For every cross-attention K/V weight, find the W closest to the base's W0 on the features of
regularisation captions while mapping each concept's target-caption features exactly as that
concept's own fine-tuned weight does:

    minimise ||C_reg W^T - C_reg W0^T||_F   subject to   W C_tgt^T = V_tgt^T

solved in float64 with Lagrange multipliers (the paper's eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperbooth.errors import HyperboothError
from hyperbooth.methods.common import token_ids
from hyperbooth.methods.custom_diffusion import (
    QO_SUFFIXES,
    check_layers,
    read_custom_diffusion,
    save_custom_diffusion,
)
from hyperbooth.methods.textual_inversion import add_word


def closed_form_merge(
    w0: torch.Tensor,
    c_reg: torch.Tensor,
    c_tgt: torch.Tensor,
    v_tgt: torch.Tensor,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """The constrained least-squares W (out x d), in float64.

    w0: (out, d) base weight; c_reg: (N, d) regularisation features; c_tgt: (m, d) target
    features; v_tgt: (m, out) what each target row must map to. `ridge` (relative to the mean
    eigenvalue of C_reg^T C_reg) also penalises ||W - W0||: text-encoder features end in a
    LayerNorm, so they nearly fill only a hyperplane, and without it W moves without bound
    along the direction the captions never show. The constraint still holds exactly.
    """
    w0, c_reg, c_tgt, v_tgt = (x.double() for x in (w0, c_reg, c_tgt, v_tgt))
    gram = c_reg.T @ c_reg
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    try:
        d = torch.linalg.solve(gram, c_tgt.T).T  # (m, d) = (C^-1 C_tgt^T)^T
        correction = torch.linalg.solve(d @ c_tgt.T, d)  # (d C_tgt^T)^-1 d
    except torch.linalg.LinAlgError:
        raise HyperboothError(
            "the merge is singular: give more regularisation captions (--captions) or fewer, "
            "more distinct target prompts"
        ) from None
    return w0 + (v_tgt.T - w0 @ c_tgt.T) @ correction


def residuals(
    w: torch.Tensor, w0: torch.Tensor, c_reg: torch.Tensor, c_tgt: torch.Tensor, v_tgt: torch.Tensor
) -> tuple[float, float]:
    """Relative residuals (target constraint, regularisation drift) of a merged weight."""
    w, w0, c_reg, c_tgt, v_tgt = (x.double() for x in (w, w0, c_reg, c_tgt, v_tgt))
    target = torch.linalg.norm(w @ c_tgt.T - v_tgt.T) / torch.linalg.norm(v_tgt).clamp(min=1e-30)
    drift = torch.linalg.norm(c_reg @ (w - w0).T) / torch.linalg.norm(c_reg @ w0.T)
    return float(target), float(drift)


@dataclass
class MergeReport:
    """Where the merged file went and how well each layer met its two goals."""

    output: Path
    tokens: list[str]
    layers: int
    target_residual_max: float
    target_residual_mean: float
    regularisation_drift_mean: float
    regularisation_drift_max: float
    seconds: float


@torch.no_grad()
def caption_features(
    base: object, captions: list[str], from_token: list[int] | None = None
) -> torch.Tensor:
    """Text-encoder features of captions as rows (N*positions, d), all 77 positions by default.

    With from_token, caption i keeps only positions from its first token in that list
    through its end-of-text token (the rows that tell concepts apart).
    """
    rows = []
    device = next(base.text_encoder.parameters()).device
    eos = base.tokenizer.eos_token_id
    for start in range(0, len(captions), 64):
        ids = token_ids(base, captions[start : start + 64]).to(device)
        hidden = base.text_encoder(ids)[0].double()
        for text, row_ids, row in zip(captions[start : start + 64], ids, hidden, strict=True):
            if from_token is None:
                rows.append(row)
                continue
            listed = row_ids.tolist()
            first = next((i for i, t in enumerate(listed) if t in from_token), None)
            if first is None:
                raise HyperboothError(f"target caption {text!r} uses no modifier token")
            rows.append(row[first : listed.index(eos, first) + 1])
    return torch.cat(rows)


@torch.no_grad()
def merge_custom_diffusion(
    paths: list[str | Path], base: object, out: str | Path, captions: list[str] | None = None
) -> MergeReport:
    """Merge Custom Diffusion files into one whose concepts all keep their K/V mapping."""
    import time

    started = time.perf_counter()
    if len(paths) < 2:
        raise HyperboothError("merge needs at least two Custom Diffusion files")
    files = [(path, *read_custom_diffusion(path)) for path in paths]
    tokens: list[str] = []
    for path, meta, deltas, vectors in files:
        check_layers(meta, deltas, base, path)
        if any(key.rsplit(".", 1)[0].endswith(QO_SUFFIXES) for key in deltas):
            raise HyperboothError(
                f"{path} was trained with --train-q-out; the closed-form merge solves only the "
                "cross-attention K/V weights, so train these concepts jointly instead (several "
                "--concept flags in one train run)"
            )
        clash = set(tokens) & set(vectors)
        if clash:
            raise HyperboothError(f"{path} reuses the token {sorted(clash)[0]!r}; retrain it apart")
        tokens += list(vectors)
    if captions is None:
        from hyperbooth.miniworld.captions import mini_captions

        captions = mini_captions(1000)
    if not captions:
        raise HyperboothError("no regularisation captions: pass a --captions file with lines")
    c_reg = caption_features(base, captions)
    ids = []
    for token, vector in ((t, v) for _, _, _, vectors in files for t, v in vectors.items()):
        ids += add_word(base, token, vector)
    concepts = [c for _, meta, _, _ in files for c in meta.get("concepts", [])]
    targets = [
        caption_features(base, [c["prompt"] for c in meta.get("concepts", [])], ids)
        for _, meta, _, _ in files
    ]
    keys = sorted({key for _, _, deltas, _ in files for key in deltas})
    merged, target_res, drift = {}, [], []
    for key in keys:
        parameter = base.unet.get_parameter(key.removeprefix("unet."))
        w0 = parameter.detach().double().cpu()
        v_tgt = torch.cat(
            [
                target.cpu() @ (w0 + f[2].get(key, torch.zeros_like(w0)).double()).T
                for target, f in zip(targets, files, strict=True)
            ]
        )
        c_tgt = torch.cat([t.cpu() for t in targets])
        w = closed_form_merge(w0, c_reg.cpu(), c_tgt, v_tgt)
        t_res, d_res = residuals(w, w0, c_reg.cpu(), c_tgt, v_tgt)
        target_res.append(t_res)
        drift.append(d_res)
        merged[key] = (w - w0).float()
    embeddings = {t: v for _, _, _, vectors in files for t, v in vectors.items()}
    report = {
        "merged_from": [str(p) for p in paths],
        "captions": len(captions),
        "target_residual_max": max(target_res),
        "regularisation_drift_mean": float(np.mean(drift)),
    }
    save_custom_diffusion(out, merged, embeddings, base, concepts, {"merge": report})
    return MergeReport(
        Path(out),
        tokens,
        len(target_res),
        max(target_res),
        float(np.mean(target_res)),
        float(np.mean(drift)),
        max(drift),
        time.perf_counter() - started,
    )
