"""Tests of the VDNA pipeline: extractors (layers, neurons, normalisation, seeds, weight files), sources,
streaming equalities, calibration cache, and comparisons. Tiny images (32 px), the tiny classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.vdna import emd, fd, nfd, save_vdna
from testing.vdna.pipeline import calibrate, compare_vdnas, find_calibration, make_vdna, summarize
from testing.vdna.plots import write_comparison
from testing.vdna.sources import Preprocess, resolve_source

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def save_tiny_classifier(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny classifier checkpoint (8 classes, 32 px), as training writes it."""
    from core.checkpoint import save_weights
    from models.classifiers import Classifier

    torch.manual_seed(seed)
    model = Classifier("tiny", 8)
    meta = {"kind": "classifier", "model": model.config, "image_size": 32}
    return save_weights(path, model.state_dict(), meta)


def world_images(root: Path) -> dict[int, list[Path]]:
    """The small world's image files by species index."""
    folders = sorted(p for p in (root / "images").iterdir() if p.is_dir())
    return {i: sorted(f.glob("*.png")) for i, f in enumerate(folders)}


def copy_images(files: list[Path], dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second intra-op thread, and on a shared 2-core machine OpenMP
    barriers with a descheduled thread make them tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("clf") / "tiny.safetensors")


@pytest.fixture(scope="module")
def species(small_world) -> dict[int, list[Path]]:
    return world_images(small_world)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BIOVIS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vdna-ranges"


def extractor_spec(checkpoint: Path, blocks: bool = True) -> str:
    return f"classifier:{checkpoint}" + (":blocks" if blocks else "")


# ----- extractors -----


@pytest.fixture(scope="module")
def rand50():
    from models.extractors import build_extractor

    return build_extractor("rand_resnet50")


def test_rand_resnet50_layers_neurons_and_seed(rand50):
    from models.extractors import build_extractor

    expected = {f"layer{s}_{i}": w for s, (w, n) in enumerate([(256, 3), (512, 4), (1024, 6), (2048, 3)], 1)
                for i in range(n)}  # fmt: skip
    assert rand50.neurons == expected and sum(rand50.neurons.values()) == 15_104
    assert rand50.name == "rand_resnet50" and rand50.image_size == 224
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        out = rand50(x)
    assert list(out) == list(expected)
    assert all(out[k].shape[:2] == (2, c) for k, c in expected.items())
    assert out["layer1_0"].shape[2:] == (16, 16) and out["layer4_2"].shape[2:] == (2, 2)
    again = build_extractor("rand_resnet50")
    other = build_extractor("rand_resnet50-seed1")
    assert again.identity == rand50.identity and other.identity != rand50.identity
    assert other.name == "rand_resnet50-seed1"
    with torch.inference_mode():
        assert torch.equal(again(x)["layer4_2"], out["layer4_2"])
        assert not torch.equal(other(x)["layer4_2"], out["layer4_2"])


def test_rand_resnet50_is_torchvision_init_and_weights_files_load(tmp_path, monkeypatch, rand50):
    """rand_resnet50 = torchvision's resnet50 initialised under seed 0; its state dict loads as --weights
    in vdna's {"model_state_dict": ...} layout without the head; offline names the three remedies."""
    import torchvision

    from models import classifiers
    from models.extractors import build_extractor

    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    torch.save({"model_state_dict": {k: v for k, v in state.items() if not k.startswith("fc.")}},
               tmp_path / "weights.pth")  # fmt: skip
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    loaded = build_extractor("resnet50", weights=tmp_path / "weights.pth")
    assert loaded.name.startswith("resnet50-") and loaded.identity.startswith("file-")
    with torch.inference_mode():
        reference, out = rand50(x), loaded(x)
    assert all(torch.equal(out[k], reference[k]) for k in reference)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not fit"):
        build_extractor("resnet50", weights=tmp_path / "bad.pth")

    def offline(arch):
        raise UserError(f"weights for {arch} are not cached; run `python main.py prefetch weights {arch}`")

    monkeypatch.setattr(classifiers, "imagenet_state_dict", offline)
    with pytest.raises(UserError, match=r"prefetch weights vgg16.*rand_vgg16"):
        build_extractor("vgg16")
    with pytest.raises(UserError, match="unknown extractor"):
        build_extractor("resnet51")


@pytest.mark.parametrize(
    "spec, size, layers, neurons, last_shape",
    [
        ("rand_vgg16", 32, 13, 4_224, (512, 2, 2)),
        ("rand_inception_v3", 80, 4, 3_072, (2048, 1, 1)),
        ("rand_vit_b_16", 32, 13, 9_984, (768, 5, 1)),
    ],
)
def test_torchvision_extractor_layers_and_input_normalisation(spec, size, layers, neurons, last_shape):
    """Layer names and widths; [-1, 1] pixels reach the network ImageNet-normalised (Inception's Google
    weights take [-1, 1] unchanged)."""
    from models.extractors import build_extractor

    model = build_extractor(spec, image_size=size)
    assert len(model.neurons) == layers and sum(model.neurons.values()) == neurons
    seen = []
    model.steps[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.inference_mode():
        out = model(x)
    assert list(out) == list(model.neurons)
    assert tuple(out[list(out)[-1]].shape) == (2, *last_shape)
    assert all(out[k].shape[1] == c and out[k].ndim == 4 for k, c in model.neurons.items())
    expected = x if spec == "rand_inception_v3" else ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


def test_classifier_extractor_matches_the_classifier(checkpoint, rand50):
    """Stages equal the classifier's own feature maps (ImageNet normalisation inside, as the classifier
    does); rand_resnet50 normalises the same way."""
    from models.classifiers import load_classifier
    from models.extractors import build_extractor

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    classifier, _ = load_classifier(checkpoint)
    stages = build_extractor(extractor_spec(checkpoint, blocks=False))
    blocks = build_extractor(extractor_spec(checkpoint))
    with torch.inference_mode():
        _, maps = classifier.eval()(x)
        out = stages(x)
        every = blocks(x)
    assert list(out) == ["layer2", "layer3", "layer4"] and list(every) == [f"layer{i}_0" for i in range(1, 5)]
    assert all(torch.equal(out[k], m) for k, m in zip(out, maps, strict=True))
    assert torch.equal(every["layer4_0"], out["layer4"])
    assert (
        stages.image_size == 32 and stages.name.startswith("classifier-") and blocks.name.endswith("-blocks")
    )
    seen = []
    rand50.steps[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.inference_mode():
        rand50(x)
    torch.testing.assert_close(seen[0], ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD, rtol=0, atol=1e-6)


# ----- sources and streaming -----


def test_folder_list_and_batch_size_give_identical_vdnas(tmp_path, checkpoint, species, cache):
    """One streaming pass: a folder, a .txt list of the same files and other batch sizes give the same
    histogram counts, which equal a per-neuron torch.histc reference of all images at once."""
    from models.extractors import build_extractor

    files = species[0][:6] + species[1][:6]
    folder = copy_images(files, tmp_path / "imgs")
    (tmp_path / "list.txt").write_text("\n".join(f"imgs/{f.name}" for f in reversed(files)) + "\n")
    model = build_extractor(extractor_spec(checkpoint))
    ranges = calibrate(folder, model, device="cpu", quiet=True)[0]
    opts = dict(ranges=ranges, quiet=True, device="cpu")  # the reference below runs on the CPU
    by_folder = make_vdna(folder, model, "histogram-50", batch_size=5, **opts)
    by_list = make_vdna(tmp_path / "list.txt", model, "histogram-50", batch_size=12, **opts)
    by_one = make_vdna(folder, model, "histogram-50", batch_size=1, **opts)
    for layer in model.neurons:
        assert torch.equal(by_folder.data[layer], by_list.data[layer])
        assert torch.equal(by_folder.data[layer], by_one.data[layer])
    # reference: all images in one batch, vdna's float64 normalisation and one histc per neuron
    batch = torch.stack([Preprocess(32)(__import__("PIL.Image").Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        features = model(batch)
    for layer in ("layer1_0", "layer4_0"):
        lo, hi = (v.double() * 1.2 for v in ranges.as_ranges()[layer])
        mean, std = ((lo + hi) / 2).view(1, -1, 1, 1), ((hi - lo) / 2 + 1e-8).view(1, -1, 1, 1)
        normed = ((features[layer] - mean) / std).clamp(-1, 1)
        expected = torch.stack(
            [torch.histc(normed[:, c].flatten(), 50, -1, 1) for c in range(normed.shape[1])]
        )
        assert torch.equal(by_folder.data[layer], expected.long())
        h, w = features[layer].shape[2:]
        assert (by_folder.data[layer].sum(1) == len(files) * h * w).all()
    gaussians = [
        make_vdna(folder, model, "gaussian", batch_size=b, device="cpu", quiet=True) for b in (5, 12)
    ]
    for layer in model.neurons:
        torch.testing.assert_close(gaussians[0].data[layer]["mu"], gaussians[1].data[layer]["mu"])
        torch.testing.assert_close(gaussians[0].data[layer]["var"], gaussians[1].data[layer]["var"])
    assert by_folder.num_images == 12 and by_folder.extraction_settings["activation_ranges_id"]


def test_cpu_forward_batches_are_capped_by_feature_memory(tmp_path, checkpoint, species, cache, monkeypatch):
    """On the CPU the extractor runs on as many images as keep the features within CPU_FEATURE_BYTES; the
    loader batch shrinks with it and the VDNA is the same."""
    import testing.vdna.pipeline as pipeline
    from models.extractors import build_extractor

    folder = copy_images(species[0][:5], tmp_path / "imgs")
    model = build_extractor(extractor_spec(checkpoint))
    ranges = calibrate(folder, model, device="cpu", quiet=True)[0]
    opts = dict(ranges=ranges, device="cpu", quiet=True)
    whole = make_vdna(folder, model, "histogram-50", batch_size=8, **opts)
    with torch.inference_mode():
        per_image = sum(v.numel() * v.element_size() for v in model(torch.zeros(1, 3, 32, 32)).values())
    monkeypatch.setattr(pipeline, "CPU_FEATURE_BYTES", 2 * per_image + 1)
    capped = make_vdna(folder, model, "histogram-50", batch_size=8, **opts)
    assert whole.extraction_settings["forward_batch_size"] == 8
    assert capped.extraction_settings["forward_batch_size"] == 2
    assert capped.num_images == whole.num_images == 5
    for layer in model.neurons:
        assert torch.equal(capped.data[layer], whole.data[layer])


def test_uint8_shipping_equals_the_float_preprocessing(species):
    """The workers ship center-crop images as uint8; the device's conversion gives `Preprocess`'s tensor."""
    from PIL import Image

    from datasets.gpu_transforms import to_model_images
    from testing.vdna.sources import ImageFiles, collate_images

    files = species[0][:3]
    preprocess = Preprocess(24)
    shipped, bad = collate_images([ImageFiles(files, preprocess)[i] for i in range(3)])
    assert shipped.dtype == torch.uint8 and bad == []
    expected = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(to_model_images(shipped, torch.device("cpu"), train=False), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_make_vdna_leaves_a_lent_model_where_it_is(tmp_path, checkpoint, species):
    from models.extractors import build_extractor

    folder = copy_images(species[0][:4], tmp_path / "imgs")
    model = build_extractor(extractor_spec(checkpoint))
    on_gpu = make_vdna(folder, model, "gaussian", batch_size=4, device="cuda", quiet=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert on_gpu.extraction_settings["device"].startswith("cuda")


def test_fd_is_zero_for_identical_sets_and_positive_across_species(tmp_path, checkpoint, species):
    from models.extractors import build_extractor

    model = build_extractor(extractor_spec(checkpoint, blocks=False))
    a = copy_images(species[0] + species[1], tmp_path / "a")
    a_copy = copy_images(species[0] + species[1], tmp_path / "a_copy")
    b = copy_images(species[5] + species[6], tmp_path / "b")
    va, va2, vb = (make_vdna(s, model, "layer-gaussian", batch_size=8, quiet=True) for s in (a, a_copy, b))
    same, different = fd(va, va2, layer="layer4"), fd(va, vb, layer="layer4")
    assert abs(same) < 1e-6 * different and different > 0
    assert nfd(va, va2) == 0.0 and nfd(va, vb) > 0
    assert abs(fd(va, va2)) < 1e-6 * fd(va, vb)
    assert va.data_settings["source_kind"] == "folder" and va.num_images == 32
    result = compare_vdnas(va, vb, distance="fd", layer="layer4", top_k=3)
    assert result.value == pytest.approx(different) and result.neuron_metric == "nfd"
    assert list(result.per_layer["distance"]) == pytest.approx(list(fd(va, vb, layer_wise=True).values()))
    paths = write_comparison(result, va, vb, ("a", "b"), tmp_path / "cmp", "layer4")
    numbers = json.loads(paths["top_json"].read_text())
    assert [n["layer"] for n in numbers] == ["layer4"] * 3 and set(numbers[0]["a"]) == {"mu", "var"}
    assert all(p.is_file() for p in paths.values())


def test_sources_skip_and_count(tmp_path, species, checkpoint):
    folder = copy_images(species[2][:3], tmp_path / "mixed" / "nested")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = resolve_source(tmp_path / "mixed")
    assert len(source) == 4 and source.non_images == 1
    vdna = make_vdna(source, extractor_spec(checkpoint), "gaussian", quiet=True)
    assert vdna.num_images == 3 and vdna.data_settings["unreadable_images_skipped"] == 1
    assert vdna.data_settings["non_image_files_skipped"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing")
    with pytest.raises(UserError, match=f"no image files in {empty}"):
        resolve_source(empty)
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"no readable image in {only_broken}"):
        make_vdna(only_broken, extractor_spec(checkpoint), "gaussian", quiet=True)
    generated = copy_images(species[3][:2], tmp_path / "gen" / "images")
    (generated.parent / "manifest.jsonl").write_text("{}\n")
    shutil.copy2(species[3][0], generated.parent / "grid_all.png")
    gen = resolve_source(generated.parent)
    assert gen.kind == "generated" and len(gen) == 2
    test_split = resolve_source("world:small:test")
    from datasets.registry import DataSpec, build_dataset

    dataset = build_dataset(DataSpec(world="small", image_size=32), "test", train_transform=False)
    assert [str(p) for p in test_split.paths] == [str(dataset.image_path(i)) for i in range(len(dataset))]
    assert len(resolve_source("world:small")) == sum(len(v) for v in species.values())
    subset = source.subset(2, seed=3)
    assert len(subset) == 2 and subset.paths == source.subset(2, seed=3).paths
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(tmp_path / "nowhere")


def test_calibration_cache(tmp_path, checkpoint, species, cache):
    """Cached by extractor + source + options, reused by histogram makes, --force recomputes; vdna's
    activation_ranges.json gives the same histograms."""
    from models.extractors import build_extractor

    model = build_extractor(extractor_spec(checkpoint))
    folder = copy_images(species[4][:8], tmp_path / "imgs")
    with pytest.raises(UserError, match="vdna calibrate"):
        make_vdna(folder, model, "histogram-20", quiet=True)
    first, path, cached = calibrate(folder, model, quiet=True)
    assert not cached and path.parent.parent.name == model.name and path.with_suffix(".npz").is_file()
    again, path2, cached2 = calibrate(folder, model, quiet=True)
    assert cached2 and path2 == path
    _, path3, cached3 = calibrate(folder, model, quiet=True, force=True)
    assert not cached3 and path3 == path
    _, other, _ = calibrate(folder, model, image_size=40, quiet=True)
    assert other != path
    auto = make_vdna(folder, model, "histogram-20", quiet=True)
    assert auto.extraction_settings["activation_ranges_origin"] == str(path)
    ranges_json = {
        "mins_per_neuron": {
            k: {str(i): float(v) for i, v in enumerate(d["min"])} for k, d in first.data.items()
        },
        "maxs_per_neuron": {
            k: {str(i): float(v) for i, v in enumerate(d["max"])} for k, d in first.data.items()
        },
    }
    (tmp_path / "activation_ranges.json").write_text(json.dumps(ranges_json))
    given = make_vdna(folder, model, "histogram-20", ranges=tmp_path / "activation_ranges.json", quiet=True)
    assert all(torch.equal(given.data[k], auto.data[k]) for k in model.neurons)
    assert (
        given.extraction_settings["activation_ranges_id"] == auto.extraction_settings["activation_ranges_id"]
    )
    found = find_calibration(
        model, 32, "center-crop", wanted_id=auto.extraction_settings["activation_ranges_id"]
    )
    assert found is not None and found.origin == str(path)


# ----- comparisons and summaries -----


def test_compare_selection_and_refusals(tmp_path, checkpoint, species, cache):
    from models.extractors import build_extractor

    model = build_extractor(extractor_spec(checkpoint))
    a = copy_images(species[0][:8], tmp_path / "a")
    b = copy_images(species[7][:8], tmp_path / "b")
    calibrate(a, model, quiet=True)
    va, vb = (make_vdna(s, model, "histogram-30", quiet=True) for s in (a, b))
    whole = compare_vdnas(va, vb, top_k=5)
    assert whole.distance == "emd" and whole.value == pytest.approx(emd(va, vb), rel=1e-12)
    per_layer = emd(va, vb, neuron_wise=True)
    assert list(whole.per_layer["layer"]) == list(model.neurons)
    np.testing.assert_allclose(whole.per_layer["distance"], [float(v.mean()) for v in per_layer.values()])
    assert list(whole.top["emd"]) == sorted(whole.top["emd"], reverse=True) and len(whole.top) == 5
    top = whole.top.iloc[0]
    assert float(per_layer[top.layer][top.neuron]) == pytest.approx(top.emd)
    assert top.emd == pytest.approx(max(float(v.max()) for v in per_layer.values()))
    one_layer = compare_vdnas(va, vb, layer="layer3_0")
    assert one_layer.value == pytest.approx(emd(va, vb, layer="layer3_0")) and set(one_layer.top.layer) == {
        "layer3_0"
    }
    one = compare_vdnas(va, vb, layer="layer2_0", neuron=3)
    assert one.value == pytest.approx(emd(va, vb, layer="layer2_0", neuron=3))
    with pytest.raises(UserError, match="unknown layer"):
        compare_vdnas(va, vb, layer="nope")
    with pytest.raises(UserError, match="out of range"):
        compare_vdnas(va, vb, layer="layer2_0", neuron=10_000)
    with pytest.raises(UserError, match="bin counts"):
        compare_vdnas(va, make_vdna(b, model, "histogram-31", quiet=True))
    shifted = make_vdna(b, model, "histogram-30", ranges={k: (lo - 1, hi + 1) for k, (lo, hi) in
                                                        _ranges(va, cache, model).items()}, quiet=True)  # fmt: skip
    with pytest.raises(UserError, match="different activation ranges"):
        compare_vdnas(va, shifted)
    summary = summarize(va)
    assert list(summary["layer"]) == list(model.neurons)
    first = va.data["layer1_0"].double().sum(0)
    assert summary["first_bin_share"][0] == pytest.approx(float(first[0] / first.sum()))
    save_vdna(va, tmp_path / "saved")
    assert (tmp_path / "saved.npz").is_file()


def _ranges(v, cache, model):
    found = find_calibration(model, 32, "center-crop", v.extraction_settings["activation_ranges_id"])
    return found.ranges
