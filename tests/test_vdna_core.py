"""Tests of core.vdna: accumulators against whole-set and per-neuron references, distances against
analytic values, and the vdna-package file layout (round trips, hand-built files, corrupt files)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.vdna import (
    VDNA,
    ActivationRangeAccumulator,
    GaussianAccumulator,
    HistogramAccumulator,
    LayerGaussianAccumulator,
    emd,
    emd_rows,
    fd,
    frechet_distance,
    load_activation_ranges_json,
    load_vdna,
    native,
    nfd,
    save_vdna,
)
from core.vdna.io import VDNA_EXTRACTION_SETTINGS_KEYS

NEURONS = {"conv": 3, "tokens": 5}
UNPICKLED: list[str] = []


class Tripwire:
    """Records being unpickled: loading a VDNA must never run pickle."""

    def __init__(self) -> None:
        self.armed = True

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append("tripwire")


def make_features(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv": torch.randn(n, 3, 6, 5, generator=g) * scale + shift,
        "tokens": torch.randn(n, 5, 7, 1, generator=g) * scale + shift,
    }


def wide_ranges(neurons: dict[str, int] = NEURONS, half_width: float = 5.0) -> dict[str, tuple]:
    return {
        layer: (torch.full((c,), -half_width), torch.full((c,), half_width)) for layer, c in neurons.items()
    }


def accumulate(acc, features: dict[str, torch.Tensor], batch: int):
    n = next(iter(features.values())).shape[0]
    for i in range(0, n, batch):
        acc.update({k: v[i : i + batch] for k, v in features.items()})
    return acc.result(feature_extractor_name="toy")


def all_accumulators(neurons: dict[str, int] = NEURONS, bins: int = 50):
    return {
        "histogram": lambda: HistogramAccumulator(neurons, bins, wide_ranges(neurons)),
        "gaussian": lambda: GaussianAccumulator(neurons),
        "layer-gaussian": lambda: LayerGaussianAccumulator(neurons),
        "activation-ranges": lambda: ActivationRangeAccumulator(neurons),
    }


def vdna_normalisation(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vdna's float64 (mean, std) of per-neuron ranges: widened by 1.2, then mapped onto [-1, 1]."""
    lo, hi = lo.double() * 1.2, hi.double() * 1.2
    return (lo + hi) / 2, (hi - lo) / 2 + 1e-8


def histc_reference(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """vdna's path, one neuron at a time: float64 normalisation, clamp, torch.histc."""
    mean, std = vdna_normalisation(lo, hi)
    out = torch.zeros(x.shape[1], bins, dtype=torch.int64)
    for c in range(x.shape[1]):
        normed = ((x[:, c].double() - mean[c]) / std[c]).clamp(-1, 1).flatten()
        out[c] = torch.histc(normed, bins=bins, min=-1, max=1).long()
    return out


# ---------------------------------------------------------------- histogram binning


def require_c_kernel() -> native.BinningKernel:
    """The compiled kernel; skip where no C compiler is installed, fail where one is and the build failed."""
    if native._compiler() is None:
        pytest.skip("no C compiler: the C binning kernel cannot be built here")
    kernel = native.binning_kernel()
    assert kernel is not None, "a C compiler is installed but the binning kernel did not build"
    return kernel


@pytest.fixture(params=["c-kernel", "torch"])
def binning(request, monkeypatch):
    """Run a test with the compiled C binning kernel and with the torch path (which CUDA uses)."""
    if request.param == "torch":
        monkeypatch.setattr(native, "binning_kernel", lambda: None)
    else:
        require_c_kernel()
    return request.param


def test_histogram_equals_per_neuron_histc_including_edges_and_out_of_range():
    bins = 20
    lo, hi = torch.tensor([-2.0, 0.0, -0.5]), torch.tensor([3.0, 1.5, 0.25])
    mean, std = vdna_normalisation(lo, hi)
    edges = torch.linspace(-1, 1, bins + 1, dtype=torch.float64)
    cols = []
    for c in range(3):
        exact = edges * std[c] + mean[c]  # activations whose normalised value is (nearly) a bin edge
        near = torch.cat([torch.nextafter(exact, exact + 1), torch.nextafter(exact, exact - 1)])
        outside = torch.tensor([-1e6, 1e6, float("inf"), float("-inf")], dtype=torch.float64) + mean[c]
        random = torch.randn(300, dtype=torch.float64) * 2 * std[c] + mean[c]
        cols.append(torch.cat([exact, near, outside, random]))
    x = torch.stack(cols, dim=1).reshape(-1, 3, 1, 1)  # one "image" per value
    normed = (x.squeeze(-1).squeeze(-1) - mean) / std
    assert torch.isin(normed, edges[1:-1]).sum() >= 10, "the fixture must hit interior edges exactly"
    ref = histc_reference(x, lo, hi, bins)
    for chunk in (None, 1, 7):  # chunks smaller than, and not aligned with, a row of neurons
        acc = HistogramAccumulator({"l": 3}, bins, {"l": (lo, hi)}, chunk_elements=chunk)
        acc.update({"l": x})
        assert torch.equal(acc.result().data["l"], ref)


def float32_edge_features(lo: torch.Tensor, hi: torch.Tensor, bins: int, images: int = 3) -> torch.Tensor:
    """float32 features [images, C, H, W] that sit on, and one or two float32 steps around, every bin edge of
    every neuron, plus zeros, out-of-range values, infinities, NaN and random values, shuffled."""
    gen = torch.Generator().manual_seed(3)
    mean, std = vdna_normalisation(lo, hi)
    edges = torch.linspace(-1, 1, bins + 1, dtype=torch.float64)
    cols = []
    for c in range(len(lo)):
        on = (edges * std[c] + mean[c]).float()
        up, down = torch.nextafter(on, on + 1), torch.nextafter(on, on - 1)
        around = torch.cat([on, up, down, torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)])
        special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
        outside = torch.tensor([-1e6, 1e6, 3e38]) + mean[c].float()
        random = (torch.randn(400, generator=gen, dtype=torch.float64) * std[c] + mean[c]).float()
        cols.append(torch.cat([around, special, outside, random]))
    values = torch.stack(cols)  # [C, V]
    per_image = values.shape[1] // images
    values = values[:, torch.randperm(values.shape[1], generator=gen)[: per_image * images]]
    return values.view(len(lo), images, per_image, 1).transpose(0, 1).contiguous()


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_float32_fast_binning_equals_float64_histc_on_edges(chunk, binning):
    """The float32 paths (C kernel; torch with its near-edge re-check) must give vdna's float64 bins: ordinary
    ranges, a dead ReLU unit (min = max = 0, every zero on the middle edge), a range far from 0 (float64
    throughout), a tiny range, and negative ranges."""
    bins = 50
    lo = torch.tensor([-2.0, 0.0, 0.0, 1000.0, 1e-4, -3.0, -7.5])
    hi = torch.tensor([3.0, 1.5, 0.0, 1000.5, 2e-4, -1.0, 2.5])
    x = float32_edge_features(lo, hi, bins)
    ref = histc_reference(x, lo, hi, bins)
    assert x.dtype == torch.float32 and ref.sum() < x.numel()  # NaNs are not counted
    acc = HistogramAccumulator({"l": len(lo)}, bins, {"l": (lo, hi)}, chunk_elements=chunk)
    acc.update({"l": x[:2]})
    acc.update({"l": x[2:]})
    assert torch.equal(acc.result().data["l"], ref)


def test_histogram_int32_counts_are_flushed_before_they_could_overflow(binning, monkeypatch):
    import core.vdna.accumulators as accumulators

    monkeypatch.setattr(accumulators, "INT32_MAX", 40)  # conv flushes every update, tokens every third
    feats = make_features(12, seed=4)
    ranges = wide_ranges()
    small = accumulate(HistogramAccumulator(NEURONS, 30, ranges), feats, batch=2)
    monkeypatch.undo()
    whole = accumulate(HistogramAccumulator(NEURONS, 30, ranges), feats, batch=12)
    for layer in NEURONS:
        assert torch.equal(small.data[layer], whole.data[layer])


def test_histogram_bin_rule_on_exact_normalised_values(binning):
    # Ranges (-1/1.2, 1/1.2) scaled by 1.2 give mean 0 and std 1 + 1e-8, so x' = x / (1 + 1e-8).
    bins = 4
    values = [-7.0, -1.0, -0.75, 0.0, 0.5000001, 0.99, 1.0, 1.5, float("nan")]
    for dtype in (torch.float32, torch.float64):  # the C kernel bins float32, the torch path float64
        acc = HistogramAccumulator({"l": 1}, bins, {"l": ([-1 / 1.2], [1 / 1.2])})
        acc.update({"l": torch.tensor(values, dtype=dtype).reshape(-1, 1, 1, 1)})
        counts = acc.result().data["l"][0].tolist()
        # -7, -1 -> bin 0 (clamped / left edge); -0.75 -> 0; 0 -> 2 (edge goes right); 0.5000001 -> 3;
        # 0.99, 1.0, 1.5 -> 3 (right-most bin closed, clamp); NaN is not counted.
        assert counts == [3, 0, 1, 4], dtype
        # These ranges give mean 0 and std exactly 1: every value below sits exactly on an edge, 1.0 on the
        # right-most one (u = N, which the clamp puts into the last bin).
        acc = HistogramAccumulator({"l": 1}, bins, {"l": ([-0.833333325], [0.833333325])})
        acc.update({"l": torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=dtype).reshape(-1, 1, 1, 1)})
        assert acc.result().data["l"][0].tolist() == [1, 1, 1, 2], dtype


def test_histogram_matches_numpy_histogram_off_edges_and_torch_histc_on_4d_conv_features(binning):
    bins = 1000
    feats = make_features(9, seed=1, scale=2.0)  # values beyond the +-5 range occur at scale 2 rarely
    feats["conv"][0, 0, 0, 0] = 40.0  # out of range: into the last bin
    acc = HistogramAccumulator(NEURONS, bins, wide_ranges())
    acc.update(feats)
    result = acc.result().data
    lo, hi = wide_ranges()["conv"]
    assert torch.equal(result["conv"], histc_reference(feats["conv"], lo, hi, bins))
    mean, std = 0.0, 6.0 + 1e-8
    normed = np.clip((feats["tokens"].double().numpy() - mean) / std, -1, 1)
    for c in range(5):
        expected, _ = np.histogram(normed[:, c].ravel(), bins=bins, range=(-1, 1))
        assert np.array_equal(result["tokens"][c].numpy(), expected)
    assert result["conv"][0, -1] >= 1 and result["conv"].sum() == 9 * 3 * 30


def test_c_kernel_splits_rows_among_threads_and_takes_strided_features(monkeypatch):
    """Rows handed to 3 threads, features given as a non-contiguous view: vdna's counts."""
    require_c_kernel()
    lo = torch.tensor([-2.0, 0.0, 0.0, 1000.0, 1e-4, -3.0, -7.5])
    hi = torch.tensor([3.0, 1.5, 0.0, 1000.5, 2e-4, -1.0, 2.5])
    x = float32_edge_features(lo, hi, 40)
    strided = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, channels last
    assert not strided.is_contiguous()
    ref = histc_reference(x, lo, hi, 40)
    monkeypatch.setattr(native, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(native.torch, "get_num_threads", lambda: 3)
    acc = HistogramAccumulator({"l": len(lo)}, 40, {"l": (lo, hi)})
    acc.update({"l": strided})
    assert torch.equal(acc.result().data["l"], ref)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`native.binning_kernel()` built from nothing in an empty cache (restored afterwards)."""
    monkeypatch.setenv("BIOVIS_CACHE", str(tmp_path / "cache"))
    native.binning_kernel.cache_clear()
    yield native.binning_kernel
    native.binning_kernel.cache_clear()


def test_c_kernel_is_built_once_into_the_cache_then_loaded(fresh_kernel, tmp_path):
    kernel = require_c_kernel()  # built in the empty cache
    assert kernel.path.is_file()
    assert kernel.path.is_relative_to(tmp_path / "cache" / "native")
    names = sorted(p.name for p in kernel.path.parent.iterdir())  # no temporary left over
    assert names == [kernel.path.name, kernel.path.name + ".sha256"]
    built = kernel.path.stat().st_mtime_ns
    fresh_kernel.cache_clear()
    assert fresh_kernel().path == kernel.path and kernel.path.stat().st_mtime_ns == built


def test_without_a_working_compiler_the_torch_path_is_used_with_one_warning(
    fresh_kernel, monkeypatch, tmp_path
):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    failing.chmod(0o755)
    for cc, reason in ((str(tmp_path / "missing-cc"), "no C compiler"), (str(failing), "failed")):
        monkeypatch.setenv("CC", cc)
        fresh_kernel.cache_clear()
        with pytest.warns(UserWarning, match=reason):
            assert fresh_kernel() is None
        acc = HistogramAccumulator({"l": 2}, 10, {"l": (torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0]))})
        acc.update({"l": torch.rand(2, 2, 3, 3)})
        assert int(acc.result().data["l"].sum()) == 2 * 2 * 9
    monkeypatch.setenv("BIOVIS_NATIVE", "0")
    fresh_kernel.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert fresh_kernel() is None


# ---------------------------------------------------------------- streaming == whole set


@pytest.mark.parametrize("kind", ["histogram", "gaussian", "layer-gaussian", "activation-ranges"])
def test_streaming_equals_one_batch(kind):
    feats = make_features(23, seed=2, shift=300.0, scale=0.5)  # |mean| >> std stresses the merge
    whole = accumulate(all_accumulators()[kind](), feats, batch=23)
    streamed = accumulate(all_accumulators()[kind](), feats, batch=4)
    assert whole.num_images == streamed.num_images == 23
    for layer in NEURONS:
        a, b = whole.data[layer], streamed.data[layer]
        if kind == "histogram":
            assert a.dtype == torch.int64 and torch.equal(a, b)
        else:
            for key in a:
                assert torch.allclose(a[key], b[key], rtol=0, atol=1e-10), (layer, key)


def test_gaussians_match_torch_var_and_cov_of_spatial_means():
    feats = make_features(17, seed=3, shift=2.0)
    g = accumulate(GaussianAccumulator(NEURONS), feats, batch=5)
    lg = accumulate(LayerGaussianAccumulator(NEURONS), feats, batch=6)
    r = accumulate(ActivationRangeAccumulator(NEURONS), feats, batch=7)
    for layer, x in feats.items():
        s = x.mean(dim=(2, 3)).double()  # vdna's spatial mean is taken in the features' float32
        assert torch.allclose(g.data[layer]["mu"], s.mean(0), atol=1e-10)
        assert torch.allclose(g.data[layer]["var"], s.var(0, correction=1), atol=1e-10)
        assert torch.allclose(lg.data[layer]["mu"], s.mean(0), atol=1e-10)
        assert torch.allclose(lg.data[layer]["sigma"], torch.cov(s.T), atol=1e-10)
        assert torch.equal(r.data[layer]["min"], x.double().amin(dim=(0, 2, 3)))
        assert torch.equal(r.data[layer]["max"], x.double().amax(dim=(0, 2, 3)))


def test_single_image_gaussian_has_zero_variance_and_empty_accumulator_is_an_error():
    with pytest.warns(UserWarning, match="one image"):
        v = accumulate(GaussianAccumulator(NEURONS), make_features(1, seed=4), batch=1)
    assert torch.equal(v.data["conv"]["var"], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(UserError, match="no images"):
        GaussianAccumulator(NEURONS).result()


def test_accumulator_rejects_wrong_layers_and_shapes():
    acc = GaussianAccumulator(NEURONS)
    with pytest.raises(UserError, match="missing \\['tokens'\\]"):
        acc.update({"conv": torch.zeros(2, 3, 4, 4)})
    with pytest.raises(UserError, match="expected features \\[B, 5, H, W\\]"):
        acc.update({"conv": torch.zeros(2, 3, 4, 4), "tokens": torch.zeros(2, 4, 4, 1)})
    with pytest.raises(UserError, match="no activation range for layer 'tokens'"):
        HistogramAccumulator(NEURONS, 10, {"conv": ([0.0] * 3, [1.0] * 3)})


# ---------------------------------------------------------------- distances: known answers


def test_identical_sets_have_zero_distances():
    feats = make_features(12, seed=5)
    kinds = all_accumulators()
    h, g, lg = (accumulate(kinds[k](), feats, batch=5) for k in ("histogram", "gaussian", "layer-gaussian"))
    assert emd(h, h) == 0.0
    assert nfd(g, g) == 0.0
    assert abs(fd(lg, lg)) < 1e-9


def test_shifted_gaussian_gives_analytic_nfd_fd_and_emd():
    d, n, bins = 0.5, 400, 1000
    neurons = {"a": 4, "b": 6}
    g = torch.Generator().manual_seed(6)
    base = {"a": torch.randn(n, 4, 32, 32, generator=g), "b": torch.randn(n, 6, 16, 16, generator=g)}
    other = {"a": torch.randn(n, 4, 32, 32, generator=g), "b": torch.randn(n, 6, 16, 16, generator=g)}
    shifted = {k: v + d for k, v in base.items()}

    ga, gb = (accumulate(GaussianAccumulator(neurons), f, batch=64) for f in (base, shifted))
    per_neuron = nfd(ga, gb, neuron_wise=True)
    for layer in neurons:
        assert torch.allclose(
            per_neuron[layer], torch.full((neurons[layer],), d**2, dtype=torch.float64), atol=1e-9
        )
    assert nfd(ga, gb) == pytest.approx(d**2, abs=1e-9)

    la, lb = (accumulate(LayerGaussianAccumulator(neurons), f, batch=64) for f in (base, shifted))
    assert fd(la, lb, layer="b") == pytest.approx(6 * d**2, abs=1e-8)
    assert fd(la, lb, layer_wise=True) == pytest.approx({"a": 4 * d**2, "b": 6 * d**2}, abs=1e-8)
    assert fd(la, lb) == pytest.approx(5 * d**2, abs=1e-8)  # mean of the per-layer FDs

    # EMD: independent samples of N(0, 1) and N(d, 1); W1 = d, i.e. d / std / (2 / bins) bins.
    ranges = wide_ranges(neurons)
    ha = accumulate(HistogramAccumulator(neurons, bins, ranges), other, batch=64)
    hb = accumulate(HistogramAccumulator(neurons, bins, ranges), shifted, batch=64)
    expected = d / (6.0 + 1e-8) / (2 / bins)  # ranges +-5 widened by 1.2: std = 6
    per_neuron = torch.cat(list(emd(ha, hb, neuron_wise=True).values()))
    assert torch.allclose(per_neuron, torch.full_like(per_neuron, expected), atol=1.5)  # 1e5+ samples/neuron
    assert emd(ha, hb) == pytest.approx(expected, abs=0.5)


def _layer_gauss(mu: torch.Tensor, sigma: torch.Tensor, name: str = "toy") -> VDNA:
    c = mu.numel()
    return VDNA("layer-gaussian", "layer-gaussian", {"l": {"mu": mu, "sigma": sigma}}, 10, name, {"l": c})


def test_fd_identity_covariances_and_against_eigvals_of_the_product():
    c, d = 8, 0.3
    eye = torch.eye(c, dtype=torch.float64)
    v1, v2 = (
        _layer_gauss(torch.zeros(c, dtype=torch.float64), eye),
        _layer_gauss(torch.full((c,), d, dtype=torch.float64), eye),
    )
    assert fd(v1, v2) == pytest.approx(c * d**2, abs=1e-12)
    assert fd(v1, _layer_gauss(torch.zeros(c), 4 * eye)) == pytest.approx(c * (2 - 1) ** 2, abs=1e-10)

    g = torch.Generator().manual_seed(7)
    a = torch.randn(c, c, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(2, c, generator=g, dtype=torch.float64)
    # Full-rank and singular second covariance; near-zero eigenvalues cost precision through the square root.
    for rank, tol in ((c + 2, 1e-9), (c - 3, 1e-5)):
        b = torch.randn(c, rank, generator=g, dtype=torch.float64)
        s1, s2 = a @ a.T, b @ b.T
        eig = np.linalg.eigvals(s1.numpy() @ s2.numpy())  # independent route: eigenvalues of the product
        trace_terms = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace())
        expected = trace_terms - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum()
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=tol, abs=tol)
        # Swapped, a singular first covariance takes the eigh square root instead of Cholesky.
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=tol, abs=tol)


def test_emd_of_point_masses_is_the_bin_distance():
    h1 = torch.zeros(4, 10, dtype=torch.int64)
    h2 = torch.zeros(4, 10, dtype=torch.int64)
    h1[0, 2], h2[0, 7] = 5, 1  # |2 - 7| = 5, regardless of mass
    h1[1, 0], h2[1, 9] = 1, 3
    h1[2, 4] = h2[2, 4] = 2
    h1[3, 0], h1[3, 9], h2[3, 5] = 1, 1, 4  # halves at 0 and 9 vs all at 5: 0.5 * 5 + 0.5 * 4
    assert emd_rows(h1, h2).tolist() == [5.0, 9.0, 0.0, 4.5]


def test_nfd_accepts_layer_gaussian_through_its_diagonal():
    feats, shifted = make_features(30, seed=8), make_features(30, seed=9, shift=1.0, scale=2.0)
    g = [accumulate(GaussianAccumulator(NEURONS), f, batch=8) for f in (feats, shifted)]
    lg = [accumulate(LayerGaussianAccumulator(NEURONS), f, batch=8) for f in (feats, shifted)]
    assert nfd(lg[0], lg[1]) == pytest.approx(nfd(g[0], g[1]), rel=1e-10)
    assert nfd(g[0], lg[1]) == pytest.approx(nfd(g[0], g[1]), rel=1e-10)
    mu1, var1 = g[0].data["conv"]["mu"], g[0].data["conv"]["var"]
    mu2, var2 = g[1].data["conv"]["mu"], g[1].data["conv"]["var"]
    vdna_formula = (mu1 - mu2) ** 2 + var1 + var2 - 2 * torch.sqrt(var1 * var2)
    assert torch.allclose(nfd(g[0], g[1], layer="conv", neuron_wise=True)["conv"], vdna_formula, atol=1e-12)


# ---------------------------------------------------------------- selection and errors


@pytest.fixture(scope="module")
def hist_pair() -> tuple[VDNA, VDNA]:
    kinds = all_accumulators()
    return (
        accumulate(kinds["histogram"](), make_features(10, seed=10), batch=4),
        accumulate(kinds["histogram"](), make_features(10, seed=11, shift=0.7), batch=4),
    )


def test_layer_neuron_selection_and_neuron_wise(hist_pair):
    v1, v2 = hist_pair
    wise = emd(v1, v2, neuron_wise=True)
    assert list(wise) == ["conv", "tokens"] and wise["conv"].shape == (3,) and wise["tokens"].shape == (5,)
    assert emd(v1, v2) == pytest.approx(float(torch.cat([wise["conv"], wise["tokens"]]).mean()), rel=1e-12)
    assert emd(v1, v2, layer="tokens") == pytest.approx(float(wise["tokens"].mean()), rel=1e-12)
    assert emd(v1, v2, layer="tokens", neuron=4) == pytest.approx(float(wise["tokens"][4]), rel=1e-12)
    only = emd(v1, v2, layer="conv", neuron_wise=True)
    assert list(only) == ["conv"] and torch.equal(only["conv"], wise["conv"])
    assert wise["conv"].min() > 0
    assert v1.get_neuron_dist("tokens", 2).shape == (1, 50)
    assert torch.equal(v1.get_all_neurons_dists()[3:], v1.get_all_neurons_in_layer_dist("tokens"))


def test_bad_layer_and_neuron_are_user_errors(hist_pair):
    v1, v2 = hist_pair
    with pytest.raises(UserError, match="unknown layer 'nope'; valid layers: conv, tokens"):
        emd(v1, v2, layer="nope")
    with pytest.raises(UserError, match=r"out of range for layer 'conv' \(valid: 0..2\)"):
        emd(v1, v2, layer="conv", neuron=3)
    with pytest.raises(UserError, match="out of range"):
        v1.get_neuron_dist("conv", -1)
    with pytest.raises(UserError, match="needs a layer"):
        emd(v1, v2, neuron=0)
    with pytest.raises(UserError, match="cannot be combined"):
        emd(v1, v2, layer="conv", neuron=0, neuron_wise=True)


def test_incompatible_vdnas_are_user_errors(hist_pair):
    v1, _ = hist_pair
    feats = make_features(6, seed=12)
    other_bins = accumulate(HistogramAccumulator(NEURONS, 40, wide_ranges()), feats, batch=3)
    with pytest.raises(UserError, match="different bin counts: 50 vs 40"):
        emd(v1, other_bins)
    other_net = HistogramAccumulator(NEURONS, 50, wide_ranges())
    other_net.update(feats)
    with pytest.raises(UserError, match="different feature extractors: 'toy' vs 'resnet'"):
        emd(v1, other_net.result(feature_extractor_name="resnet"))
    narrow = {"conv": 3, "tokens": 4}
    fewer = HistogramAccumulator(narrow, 50, wide_ranges(narrow))
    fewer.update({"conv": feats["conv"], "tokens": feats["tokens"][:, :4]})
    with pytest.raises(UserError, match="layer 'tokens' has 5 neurons in the first VDNA but 4 in the second"):
        emd(v1, fewer.result(feature_extractor_name="toy"))
    gauss = accumulate(GaussianAccumulator(NEURONS), feats, batch=3)
    with pytest.raises(UserError, match="EMD needs histogram VDNAs; the second one is 'gaussian'"):
        emd(v1, gauss)
    with pytest.raises(UserError, match="FD needs layer-gaussian"):
        fd(gauss, gauss)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["histogram", "gaussian", "layer-gaussian", "activation-ranges"])
def test_save_load_round_trip(tmp_path, kind):
    v = accumulate(all_accumulators()[kind](), make_features(9, seed=13), batch=4)
    v.data_settings = {"source": tmp_path / "imgs", "num_images": 9, "dataset_hash": "abc"}
    json_path, npz_path = save_vdna(v, tmp_path / "sub" / "x")
    assert (json_path.name, npz_path.name) == ("x.json", "x.npz")
    meta = json.loads(json_path.read_text())
    assert meta["data_settings"] == {"source": str(tmp_path / "imgs"), "num_images": 9}
    assert meta["extra_data_settings"] == {"dataset_hash": "abc"}
    # vdna rebuilds its settings dataclasses with **kwargs: only their field names may appear there.
    assert set(meta["extraction_settings"]) <= VDNA_EXTRACTION_SETTINGS_KEYS and meta["extraction_settings"]
    assert meta["vdna_version"] == "0.1.1" and meta["distribution"] == (
        {"hist_nb_bins": 50} if v.hist_nb_bins else {}
    )
    expected_keys = {
        "histogram": {"conv": np.int32, "tokens": np.int32},
        "gaussian": {f"{k}-{layer}": np.float32 for k in ("mu", "var") for layer in NEURONS},
        "layer-gaussian": {f"{k}-{layer}": np.float64 for k in ("mu", "sigma") for layer in NEURONS},
        "activation-ranges": {f"{k}-{layer}": np.float32 for k in ("min", "max") for layer in NEURONS},
    }[kind]
    with np.load(npz_path, allow_pickle=False) as npz:
        assert {k: npz[k].dtype for k in npz.files} == {k: np.dtype(t) for k, t in expected_keys.items()}
    for path in (tmp_path / "sub" / "x", json_path, npz_path):
        back = load_vdna(path)
        assert (back.type, back.name, back.num_images, back.neurons_list) == (v.type, v.name, 9, NEURONS)
        assert back.data_settings["dataset_hash"] == "abc" and back.hist_nb_bins == v.hist_nb_bins
        for layer in NEURONS:
            a, b = v.data[layer], back.data[layer]
            if kind == "histogram":
                assert torch.equal(a, b)
                continue
            for key in a:
                stored = a[key] if kind == "layer-gaussian" else a[key].float().double()
                assert torch.equal(stored, b[key]), (layer, key)


def test_hand_built_vdna_package_files_load(tmp_path):
    """Files written straight from the documented vdna layout, including vdna's stray pickled `{}`
    entries per layer in non-histogram npz files, which must not be read."""
    common = {
        "time_of_compute": "03:15PM on May 02, 2023",
        "vdna_version": "0.1.1",
        "data_settings": {"source": "/data/imgs", "crop_to_square_pre_resize": "none", "num_images": -1},
        "extraction_settings": {"hist_nb_bins": 4, "range_scale_for_norm_params": 1.2, "device": "cuda:0"},
        "num_images": 2,
        "feature_extractor_name": "rand_resnet50",
        "neurons_list": {"layer1_0": 2, "layer4_2": 3},
    }
    hist = {
        "layer1_0": np.array([[1, 2, 3, 0], [0, 0, 6, 0]], np.int32),
        "layer4_2": np.ones((3, 4), np.int32),
    }
    (tmp_path / "h.json").write_text(
        json.dumps(
            {**common, "distribution": {"hist_nb_bins": 4}, "type": "histogram", "name": "histogram-4"}
        )
    )
    np.savez_compressed(tmp_path / "h.npz", **hist)
    v = load_vdna(tmp_path / "h")
    assert v.hist_nb_bins == 4 and v.feature_extractor_name == "rand_resnet50"
    assert (
        v.data["layer1_0"].dtype == torch.int64 and v.data["layer1_0"].tolist() == hist["layer1_0"].tolist()
    )
    assert emd(v, v, layer="layer1_0", neuron=0) == 0.0

    gauss = {"layer1_0": {}, "layer4_2": {}}  # vdna writes these; numpy stores them as pickled objects
    gauss.update(
        {"mu-layer1_0": np.array([0.5, 1.0], np.float32), "var-layer1_0": np.array([1.0, 4.0], np.float32)}
    )
    gauss.update({"mu-layer4_2": np.zeros(3, np.float32), "var-layer4_2": np.ones(3, np.float32)})
    (tmp_path / "g.json").write_text(
        json.dumps({**common, "distribution": {}, "type": "gaussian", "name": "gaussian"})
    )
    np.savez_compressed(tmp_path / "g.npz", **gauss)
    g = load_vdna(tmp_path / "g.json")
    assert {k: float(t) for k, t in g.get_neuron_dist("layer1_0", 1).items()} == {"mu": 1.0, "var": 4.0}
    assert nfd(g, g) == 0.0
    with pytest.raises(ValueError, match="pickle"):  # proves the stray entries are pickles we skipped
        np.load(tmp_path / "g.npz", allow_pickle=False)["layer1_0"]


def test_corrupt_or_incomplete_files_are_user_errors(tmp_path):
    v = accumulate(all_accumulators()["layer-gaussian"](), make_features(9, seed=14), batch=4)
    _, npz_path = save_vdna(v, tmp_path / "x")
    good = npz_path.read_bytes()
    npz_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"x\.npz"):
        load_vdna(tmp_path / "x")
    npz_path.write_bytes(good[:-30])  # central directory damaged only
    with pytest.raises(UserError, match=r"x\.npz"):
        load_vdna(tmp_path / "x")
    np.savez_compressed(npz_path, **{"mu-conv": np.zeros(3)})
    with pytest.raises(UserError, match=r"x\.npz lacks the array 'sigma-conv'"):
        load_vdna(tmp_path / "x")
    np.savez_compressed(
        npz_path,
        **{
            "mu-conv": np.zeros(2),
            "sigma-conv": np.eye(2),
            "mu-tokens": np.zeros(5),
            "sigma-tokens": np.eye(5),
        },
    )
    with pytest.raises(
        UserError, match=r"inconsistent: VDNA layer 'conv' 'mu' has shape \(2,\), expected \(3,\)"
    ):
        load_vdna(tmp_path / "x")
    with pytest.raises(UserError, match="metadata file not found"):
        load_vdna(tmp_path / "missing.npz")
    tripwire = np.empty(3, dtype=object)
    tripwire[:] = [Tripwire(), Tripwire(), Tripwire()]
    np.savez_compressed(
        npz_path,
        **{"mu-conv": tripwire, "sigma-conv": np.eye(3), "mu-tokens": np.zeros(5), "sigma-tokens": np.eye(5)},
    )
    with pytest.raises(UserError, match=r"x\.npz"):
        load_vdna(tmp_path / "x")
    assert UNPICKLED == []


def test_activation_ranges_feed_a_histogram_accumulator(tmp_path):
    feats = make_features(8, seed=15)
    ranges = accumulate(ActivationRangeAccumulator(NEURONS), feats, batch=3)
    acc = HistogramAccumulator(NEURONS, 30, ranges.as_ranges())
    acc.update(feats)
    counts = acc.result().data["conv"]
    # The extremes sit inside the 1.2x widened range, so the end bins stay empty; nothing is lost.
    assert counts[:, 0].sum() == counts[:, -1].sum() == 0 and counts.sum() == 8 * 3 * 30
    (tmp_path / "ranges.json").write_text(
        json.dumps(
            {"mins_per_neuron": {"l": {"1": -2.0, "0": -1.0}}, "maxs_per_neuron": {"l": {"0": 1.0, "1": 3.0}}}
        )
    )
    lo, hi = load_activation_ranges_json(tmp_path / "ranges.json")["l"]
    assert lo.tolist() == [-1.0, -2.0] and hi.tolist() == [1.0, 3.0]
