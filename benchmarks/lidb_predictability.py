"""How much of the pre-optimised LiDBs can be predicted from the image at all?

A ceiling check for the hypernetwork's weight-space loss: ridge regression from the identity
image (downsampled to 16x16 RGB) to the flattened LiDB of each identity, fitted on the first
7/8 of the identities and scored on the rest, against predicting the training mean. Also the
share of the LiDBs' variance in their top principal components. `--space product` probes each
layer's B_train @ A_train instead of the two factors: the factors are defined only up to an
invertible r x r mixing, the product is not, so it tells whether that freedom hides a pattern.

    python benchmarks/lidb_predictability.py --images runs/hdb/images --precomputed runs/hdb/pre \
        --out docs/mini_lidb_predictability.json
    python benchmarks/lidb_predictability.py --images runs/hdb/images --precomputed runs/hdb/pre \
        --space product --out docs/mini_lidb_predictability_product.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file


def _flatten(tensors: dict[str, np.ndarray], space: str) -> np.ndarray:
    """One identity's LiDB as one vector: its factors, or each layer's B_train @ A_train."""
    if space == "factors":
        return np.concatenate([tensors[k].ravel() for k in sorted(tensors)])
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return np.concatenate(
        [(tensors[f"{n}.lidb_b_train"] @ tensors[f"{n}.lidb_a_train"]).ravel() for n in layers]
    )


def main() -> None:
    """Fit the ridge probes and write their test errors."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True)
    parser.add_argument("--precomputed", required=True)
    parser.add_argument("--side", type=int, default=16, help="image side the probe sees")
    parser.add_argument(
        "--space", choices=("factors", "product"), default="factors", help="what is predicted"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    manifest = json.loads((Path(args.precomputed) / "manifest.json").read_text())["identities"]
    targets, pixels = [], []
    for name in sorted(manifest):
        tensors = load_file(str(Path(args.precomputed) / manifest[name]["file"]))
        targets.append(_flatten(tensors, args.space))
        image = Image.open(Path(args.images) / manifest[name]["image"]).convert("RGB")
        side = (args.side, args.side)
        pixels.append(np.asarray(image.resize(side), dtype=np.float32).ravel() / 255)
    y, x = np.stack(targets).astype(np.float64), np.stack(pixels).astype(np.float64)
    split = len(y) * 7 // 8
    mean = y[:split].mean(0)
    x = x - x[:split].mean(0)
    report = {
        "space": args.space,
        "identities": len(y),
        "numbers_per_identity": int(y.shape[1]),
        "test_identities": len(y) - split,
        "mse_predicting_zero": float((y[split:] ** 2).mean()),
        "mse_predicting_the_mean": float(((y[split:] - mean) ** 2).mean()),
        "ridge": {},
    }
    for lam in (1.0, 10.0, 100.0, 1000.0):
        a = x[:split]
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[:split] - mean))
        report["ridge"][str(lam)] = {
            "test_mse": float(((y[split:] - (x[split:] @ w + mean)) ** 2).mean()),
            "train_mse": float(((y[:split] - (a @ w + mean)) ** 2).mean()),
        }
    s = np.linalg.svd(y[:split] - mean, compute_uv=False)
    share = np.cumsum(s**2) / (s**2).sum()
    report["variance_in_top_components"] = {str(k): float(share[k - 1]) for k in (10, 50, 200)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
