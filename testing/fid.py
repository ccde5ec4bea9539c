"""FID as papers report it: the TF-ported Inception network of pytorch-fid, its weights, its resize and its
Fréchet distance, with the weights read through the project's verified loader.

`fid-inception` (default) is pytorch-fid's `InceptionV3` (the 2015-12-05 TF graph ported to PyTorch, the
network pytorch-fid, torch-fidelity and clean-fid share), 2048-d pool3 features. Images in [-1, 1] are first
quantised to 8 bits, as a PNG on disk would be, then handed to the library in [0, 1]; the library resizes
them bilinearly to 299 x 299 (`F.interpolate`, align_corners=False) and scales them to [-1, 1]. The mean
and covariance are numpy's (`np.mean`, `np.cov`, as `calculate_activation_statistics`) and the distance is
the library's `calculate_frechet_distance`. pytorch-fid's own loader (`load_state_dict_from_url`) is
bypassed: the file comes from `core.weights` (sha256 checked, `weights_only=True`), `prefetch weights
fid-inception` caches it for offline nodes.

`torchvision` is torchvision's ImageNet Inception-v3 (other weights and blocks: its FIDs are not comparable
with published ones), kept only as an explicit choice. It is built with `transform_input=False`, so it is fed
[-1, 1] pixels, the range its ported weights expect.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError

NETWORKS = ("fid-inception", "torchvision")
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PREFETCH_HINT = "run `python main.py prefetch weights fid-inception` on a machine with internet, or pass --fid-weights PATH"


def _library():
    """pytorch-fid's modules, or a one-line error saying how to install it."""
    try:
        from pytorch_fid import fid_score, inception
    except ImportError:
        raise UserError(
            "FID needs the pytorch-fid package: pip install pytorch-fid (or --fid-weights none)"
        ) from None
    return inception, fid_score


def fid_inception_state() -> dict:
    """pytorch-fid's Inception weights from the verified cache (downloaded when online and missing)."""
    from core.weights import load_url_state_dict

    return load_url_state_dict(FID_WEIGHTS_URL, "FID Inception weights", PREFETCH_HINT, FID_WEIGHTS_SHA256)


def _random_state(seed: int) -> dict:
    """Seeded random weights of the FID Inception's layout (tests and smoke runs; no download)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(
            weights=None, num_classes=1008, aux_logits=False, init_weights=False
        )
    return net.state_dict()


def _weights_state(weights: str, seed: int) -> dict:
    if weights == "pretrained":
        return fid_inception_state()
    if weights == "random":
        return _random_state(seed)
    from core.checkpoint import load_foreign_state_dict

    return load_foreign_state_dict(weights)


class FIDInception(torch.nn.Module):
    """pytorch-fid's InceptionV3 pool3 features (2048-d) of [-1, 1] images; see the module docstring."""

    network = "fid-inception"
    resize = "uint8 quantisation, then bilinear to 299x299 (pytorch-fid's F.interpolate, align_corners=False)"

    def __init__(self, weights: str = "pretrained", seed: int = 0):
        super().__init__()
        from unittest import mock

        inception, _ = _library()
        state = _weights_state(weights, seed)

        def verified(url, *args, **kwargs):  # the library's download-and-unpickle, replaced by our file
            return state

        try:
            with mock.patch.object(inception, "load_state_dict_from_url", verified):
                net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
            raise UserError(
                f"--fid-weights {weights} does not fit the FID Inception: {str(err)[:200]}"
            ) from None
        self.weights = weights
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255  # what a saved PNG holds
            features = self.net(pixels)[0]
        return features.flatten(1)


class TorchvisionInception(torch.nn.Module):
    """torchvision's Inception-v3 pool features (2048-d) of [-1, 1] images, bilinear resize to 299."""

    network = "torchvision"
    resize = "bilinear to 299x299 (F.interpolate, align_corners=False), [-1, 1] input"

    def __init__(self, weights: str = "pretrained", seed: int = 0):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.inception_v3(
                weights=None, aux_logits=True, init_weights=False, transform_input=False
            )
        if weights == "pretrained":
            from models.classifiers import imagenet_state_dict

            net.load_state_dict(imagenet_state_dict("inception_v3", option="--fid-weights"))
        elif weights != "random":
            from core.checkpoint import load_foreign_state_dict, load_state_dict_checked

            load_state_dict_checked(net, load_foreign_state_dict(weights), weights)
        net.fc = torch.nn.Identity()
        net.aux_logits, net.AuxLogits = False, None
        self.weights = weights
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's ported weights expect [-1, 1]: with transform_input=False nothing rescales the input
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            return self.net(x)


def check_fid_options(network: str, weights: str) -> str:
    """The weights name in canonical form (`imagenet` is accepted for `pretrained`); UserError otherwise."""
    if network not in NETWORKS:
        raise UserError(f"--fid-network must be one of {', '.join(NETWORKS)}, got {network!r}")
    return "pretrained" if weights == "imagenet" else weights


def build_fid_network(network: str, weights: str, device) -> torch.nn.Module | None:
    """The FID feature network, or None for `--fid-weights none`."""
    weights = check_fid_options(network, weights)
    if weights == "none":
        return None
    cls = FIDInception if network == "fid-inception" else TorchvisionInception
    return cls(weights).to(device)


def frechet_inception_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two (N, 2048) feature sets: numpy statistics, pytorch-fid's `calculate_frechet_distance`."""
    from scipy.linalg import LinAlgWarning

    calculate_frechet_distance = _library()[1].calculate_frechet_distance

    if len(real) < 2 or len(fake) < 2:
        raise UserError("FID needs at least 2 images on each side")
    a, b = real.double().cpu().numpy(), fake.double().cpu().numpy()
    with warnings.catch_warnings():  # fewer images than dimensions: singular covariances, said by `fid_line`
        warnings.simplefilter("ignore", category=LinAlgWarning)
        warnings.simplefilter(
            "ignore", category=DeprecationWarning
        )  # scipy's `disp` argument, the library's call
        return float(
            calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        )


def describe(net: torch.nn.Module, n_real: int, n_fake: int) -> dict:
    """What every FID is printed and saved beside: network, weights, resize and image counts."""
    return {
        "fid_network": net.network,
        "fid_weights": net.weights,
        "fid_resize": net.resize,
        "fid_images_real": n_real,
        "fid_images_fake": n_fake,
    }


def fid_line(metrics: dict) -> str:
    """One line: the score and everything it depends on."""
    note = "" if metrics["fid_network"] == "fid-inception" else "; not comparable with published FIDs"
    if min(metrics["fid_images_real"], metrics["fid_images_fake"]) <= 2048:
        note += "; fewer images than the 2048 feature dimensions: FID is biased upward, compare at equal counts only"
    return (
        f"FID {metrics['fid']:.2f}  [{metrics['fid_network']} ({metrics['fid_weights']} weights), "
        f"{metrics['fid_images_real']} real vs {metrics['fid_images_fake']} reconstructed images, "
        f"{metrics['fid_resize']}{note}]"
    )
