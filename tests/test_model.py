"""Encoder architecture (spender-compatible), head, bundle round trip, and head calibration on synthetic data."""
import numpy as np
import pytest
import torch

from catalogpred.errors import BundleError
from catalogpred.model.bundle import ModelCard, encode, infer, load_bundle, read_bundle_info, save_bundle
from catalogpred.model.encoder import SpectrumEncoder, encoder_flops
from catalogpred.model.head import IRHead
from catalogpred.model.train import evaluate_head, fit_head
from catalogpred.spectra import DESI_GRID, SDSS_GRID

# spender 0.3 SpectrumEncoder parameter names (encoder.* in a checkpoint, prefix stripped)
SPENDER_KEYS = {
    "conv1.0.weight": (128, 1, 5), "conv1.0.bias": (128,), "conv1.2.weight": (128,),
    "conv2.0.weight": (256, 128, 11), "conv2.0.bias": (256,), "conv2.2.weight": (256,),
    "conv3.0.weight": (512, 256, 21), "conv3.0.bias": (512,), "conv3.2.weight": (512,),
    "mlp.0.weight": (128, 256), "mlp.0.bias": (128,), "mlp.1.weight": (128,),
    "mlp.3.weight": (64, 128), "mlp.3.bias": (64,), "mlp.4.weight": (64,),
    "mlp.6.weight": (32, 64), "mlp.6.bias": (32,), "mlp.7.weight": (32,),
    "mlp.9.weight": (6, 32), "mlp.9.bias": (6,),
}


def test_encoder_state_dict_layout_matches_spender():
    sd = SpectrumEncoder().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == SPENDER_KEYS
    assert sum(v.numel() for v in sd.values()) == pytest.approx(3.16e6, rel=0.01)


@pytest.mark.parametrize("grid", [SDSS_GRID, DESI_GRID])
def test_encoder_shapes_and_flops(grid):
    enc = SpectrumEncoder(n_pix=grid.n_pix).eval()
    x = torch.randn(3, grid.n_pix)
    with torch.inference_mode():
        h = enc.pool1(enc.conv1(x.unsqueeze(1)))
        assert h.shape[-1] == (785 if grid is SDSS_GRID else 1557)
        h = enc.pool2(enc.conv2(h))
        if grid is SDSS_GRID:
            assert h.shape[-1] == 72
        assert enc(x).shape == (3, 6)
    expected = 0.97e9 if grid is SDSS_GRID else 1.91e9
    assert encoder_flops(grid.n_pix) == pytest.approx(expected, rel=0.01)


def test_encoder_deterministic_and_batch_independent():
    torch.manual_seed(3)
    a = SpectrumEncoder().eval()
    torch.manual_seed(3)
    b = SpectrumEncoder().eval()
    x = np.random.default_rng(0).normal(1, 0.2, (5, SDSS_GRID.n_pix)).astype(np.float32)
    la, lb = encode(a, x), encode(b, x)
    np.testing.assert_array_equal(la, lb)
    one_by_one = np.concatenate([encode(a, x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, la, rtol=1e-5, atol=1e-6)
    # InstanceNorm makes latents independent of an overall flux scale
    np.testing.assert_allclose(encode(a, 3 * x), la, rtol=1e-4, atol=1e-5)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    enc = SpectrumEncoder().eval()
    x = np.random.default_rng(1).normal(1, 0.3, (4, SDSS_GRID.n_pix)).astype(np.float32)
    l32, l16 = encode(enc, x), encode(enc, x, precision="bf16")
    assert np.max(np.abs(l16 - l32)) / np.max(np.abs(l32)) < 0.05


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(1)
    enc, head = SpectrumEncoder().eval(), IRHead().eval()
    info = save_bundle(tmp_path / "m", enc, head, name="t", version="2", grid=SDSS_GRID,
                       card=ModelCard(kind="demo", summary="s"))
    assert info.model_id.startswith("t-2+") and (tmp_path / "m" / "MODEL_CARD.md").exists()
    assert read_bundle_info(tmp_path / "m").model_id == info.model_id
    model = load_bundle(tmp_path / "m")
    x = np.random.default_rng(0).normal(1, 0.1, (4, SDSS_GRID.n_pix)).astype(np.float32)
    lat, mean, sigma = infer(model, x, np.full(4, 0.1), np.full(4, 10.0))
    np.testing.assert_array_equal(lat, encode(enc, x))
    assert mean.shape == (4, 4) and (sigma > 0).all()
    with pytest.raises(BundleError, match="not empty"):
        save_bundle(tmp_path / "m", enc, head, name="t", version="2", grid=SDSS_GRID, card=ModelCard(kind="demo", summary="s"))
    with pytest.raises(BundleError, match="no bundle.json"):
        read_bundle_info(tmp_path)
    with pytest.raises(BundleError, match="expects"):
        infer(model, np.zeros((2, 100), np.float32), np.zeros(2), np.ones(2))


def test_infer_calls_after_batch_once_per_batch_and_changes_nothing(tmp_path):
    """CPU blocks trim freed memory after each encoder batch through this hook (catalogpred.tasks.infer_block)."""
    from catalogpred.tasks import _trim_freed_memory

    torch.manual_seed(2)
    save_bundle(tmp_path / "m", SpectrumEncoder().eval(), IRHead().eval(), name="t", version="1", grid=SDSS_GRID,
                card=ModelCard(kind="demo", summary="s"))
    model = load_bundle(tmp_path / "m")
    x = np.random.default_rng(3).normal(1, 0.1, (5, SDSS_GRID.n_pix)).astype(np.float32)
    z, norm = np.full(5, 0.1), np.full(5, 10.0)
    calls = []

    def hook():
        calls.append(1)
        _trim_freed_memory()

    got = infer(model, x, z, norm, batch_size=2, after_batch=hook)
    assert len(calls) == 3  # batches of 2, 2 and 1 rows
    for a, b in zip(got, infer(model, x, z, norm, batch_size=2)):
        np.testing.assert_array_equal(a, b)


def test_head_fit_is_calibrated_on_heteroscedastic_synthetic_data():
    rng = np.random.default_rng(0)
    n = 12000
    x = rng.normal(size=(n, 8)).astype(np.float32)
    true = np.stack([14 + x[:, 0], 13.5 + 0.5 * x[:, 1], 10 + x[:, 2] - 0.5 * x[:, 0], 8 + 0.7 * x[:, 3]], 1)
    intrinsic = 0.1 + 0.1 * np.abs(x[:, 4:5])  # heteroscedastic scatter the head must learn
    obs_err = np.tile([0.03, 0.04, 0.1, 0.3], (n, 1))
    mag = true + rng.normal(size=true.shape) * np.sqrt(intrinsic**2 + obs_err**2)
    mag[::50, 3] = np.nan
    obs_err[1::50, 2] = 9999.0  # non-detection  # missing band
    head, metrics = fit_head(x, mag, obs_err, n_hidden=(32, 32), seed=0)
    for b in ("w1", "w2", "w3", "w4"):
        assert metrics[b]["chi2_n"] == pytest.approx(1.0, abs=0.1)
        assert metrics[b]["coverage_68"] == pytest.approx(0.68, abs=0.03)
        assert metrics[b]["coverage_95"] == pytest.approx(0.95, abs=0.03)
    assert metrics["w4"]["n"] < metrics["w1"]["n"]


def test_evaluate_head_chi2_convention():
    pred = np.array([[10.0, 10, 10, 10]])
    sig = np.array([[0.3, 0.3, 0.3, 0.3]])
    obs = np.array([[10.5, 10, 10, 10]])
    err = np.array([[0.4, 0.4, 0.4, 9999.0]])
    m = evaluate_head(pred, sig, obs, err)
    assert m["w1"]["chi2_n"] == pytest.approx(0.5**2 / (0.3**2 + 0.4**2))  # χ = Δ / sqrt(σp² + σo²)
    assert m["w4"] == {"n": 0}  # σ = 9999 is a non-detection


def test_model_id_depends_on_the_grid(tmp_path):
    """The same weights saved as an SDSS-grid and a DESI-grid encoder are two models with two ids."""
    from catalogpred.model.bundle import ModelCard, save_bundle
    from catalogpred.model.encoder import SpectrumEncoder
    from catalogpred.spectra import DESI_GRID, SDSS_GRID

    torch.manual_seed(0)
    enc = SpectrumEncoder()
    card = ModelCard(kind="demo", summary="test")
    a = save_bundle(tmp_path / "a", enc, None, name="x", version="1", grid=SDSS_GRID, card=card)
    enc_desi = SpectrumEncoder(n_pix=DESI_GRID.n_pix)
    enc_desi.load_state_dict(enc.state_dict())  # the same weights (the encoder's do not depend on the length)
    b = save_bundle(tmp_path / "b", enc_desi, None, name="x", version="1", grid=DESI_GRID, card=card)
    c = save_bundle(tmp_path / "c", enc, None, name="x", version="1", grid=SDSS_GRID, card=card)
    assert a.model_id != b.model_id and a.model_id == c.model_id
