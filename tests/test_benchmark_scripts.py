"""The pure parts of the benchmark scripts, against values computed by hand."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent.parent / "benchmarks"


def script(name: str):
    """Import benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prediction_geometry_by_hand():
    geometry = script("hypernet_prediction_geometry").geometry
    predicted = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    fitted = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    refitted = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    g = geometry(predicted, fitted, refitted)
    half = 2**-0.5
    assert g["norm_predicted"] == pytest.approx((1 + 2**0.5) / 2)
    assert g["norm_fitted"] == pytest.approx(2.0)
    assert g["cosine_predicted_vs_own_fit"] == pytest.approx([0.0, half])
    assert g["cosine_between_identities_predicted"] == pytest.approx(half)
    assert g["cosine_between_identities_fitted"] == pytest.approx(0.0)
    assert g["cosine_fit_vs_refit"] == pytest.approx([1.0, 1.0])
    # identity parts (row 0, row 1 = -row 0): predicted (0, -0.5), fitted (-1, 1), refitted (-1.5, 0.5)
    assert g["norm_identity_part_predicted"] == pytest.approx(0.5)
    assert g["norm_identity_part_fitted"] == pytest.approx(2**0.5)
    assert g["cosine_identity_parts"] == pytest.approx([-half, -half])
    cos = (1.5 + 0.5) / (2**0.5 * (1.5**2 + 0.5**2) ** 0.5)
    assert g["cosine_identity_parts_fit_vs_refit"] == pytest.approx([cos, cos])


def test_the_judge_encoder_script_names_the_judge_and_judge_format_folders():
    from hyperbooth.hypernet.model import HyperNetConfig, HyperNetwork, build_encoder
    from hyperbooth.miniworld.judges import DEFAULT_JUDGE
    from hyperbooth.miniworld.trait_encoder import TraitEncoder

    module = script("hypernet_judge_encoder")
    module.register()
    import hyperbooth.hypernet.model as model

    try:
        for name in (module.NAME, f"judge:{DEFAULT_JUDGE}"):
            config = HyperNetConfig(encoder=name, width=32, heads=2)
            net = HyperNetwork(config, {"unet.layer": (8, 8)})
            assert isinstance(net.encoder, TraitEncoder) and not net.trains_encoder()
            assert net.config.encoder == name  # the name is what the saved file records
    finally:
        model.build_encoder = build_encoder
    with pytest.raises(SystemExit, match="train` or `evaluate"):
        module.main(["fit"])
