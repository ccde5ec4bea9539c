"""FID: our features and distance against pytorch-fid's own pipeline (PNG files -> its loader -> its statistics),
the torchvision option fed the range its weights expect, and the weights read only through the verified cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from datasets.transforms import to_uint8_images
from testing.fid import FIDInception, TorchvisionInception, frechet_inception_distance


@pytest.fixture(scope="module")
def fid_net():
    return FIDInception("random")


def test_features_equal_pytorch_fids_pipeline_on_png_files(fid_net, tmp_path):
    """The library reads the PNGs our images would be saved as; both give the same pool3 features."""
    from pytorch_fid.fid_score import get_activations

    torch.manual_seed(0)
    images = torch.rand(1, 3, 40, 24) * 2 - 1  # not square, not 299: the library's resize is exercised
    files = []
    for i, array in enumerate(to_uint8_images(images)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(files[-1])
    theirs = get_activations(files, fid_net.net, batch_size=1, dims=2048, device="cpu", num_workers=0)
    ours = fid_net(images).double().numpy()
    assert ours.shape == (1, 2048) and np.abs(ours).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


# pytorch-fid passes SciPy's deprecated `disp` argument itself
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_frechet_distance_is_the_librarys_and_agrees_with_an_eigh_version():
    from pytorch_fid.fid_score import calculate_frechet_distance

    from testing.gan_metrics import feature_statistics, frechet_distance

    torch.manual_seed(1)
    real = torch.randn(300, 6) @ torch.randn(6, 6) + 1.0
    fake = torch.randn(200, 6) @ torch.randn(6, 6)
    a, b = real.double().numpy(), fake.double().numpy()
    library = calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert frechet_inception_distance(real, fake) == pytest.approx(library, rel=1e-12)
    assert frechet_inception_distance(real, fake) == pytest.approx(
        frechet_distance(*feature_statistics(real), *feature_statistics(fake)), rel=1e-6
    )
    assert frechet_inception_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="at least 2 images"):
        frechet_inception_distance(real[:1], fake)


def test_torchvision_option_sees_the_range_its_weights_expect():
    """Our [-1, 1] input with transform_input=False equals torchvision's documented use: ImageNet-normalised
    input with transform_input=True (which maps it back to [-1, 1]); the earlier code fed ImageNet-normalised
    pixels to transform_input=False, about 2.2x too large."""
    import torchvision

    ours = TorchvisionInception("random")
    reference = torchvision.models.inception_v3(
        weights=None, aux_logits=True, init_weights=False, transform_input=True
    )
    reference.load_state_dict({**ours.net.state_dict(), **{k: v for k, v in reference.state_dict().items()
                                                          if k.startswith(("fc.", "AuxLogits."))}})  # fmt: skip
    reference.fc = torch.nn.Identity()
    reference.eval()
    torch.manual_seed(2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = reference(((resized + 1) / 2 - mean) / std)
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_weights_only_through_the_verified_cache(tmp_path, monkeypatch):
    """A file planted under pytorch-fid's cached name is refused (its sha256 is checked), never unpickled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    planted = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    planted.parent.mkdir(parents=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, planted)
    with pytest.raises(UserError, match="does not have the content its name promises"):
        FIDInception("pretrained")
