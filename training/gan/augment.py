"""Adaptive discriminator augmentation (ADA, Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data"): D sees augmented reals and fakes, each transform applied with probability p, and under
`ada` p follows the overfitting heuristic r_t = E[sign(D(real))] towards a target (0.6).

The transforms are those of NVlabs' `bgc` pipeline (the `--aug ada` default of stylegan2-ada), with NVlabs'
ranges: pixel blitting (x-flip, 90-degree rotations, integer translation up to 1/8 of the size), general
geometry (isotropic scaling 2^N(0, 0.2^2), arbitrary rotation before and after an anisotropic scaling
2^N(0, 0.2^2), fractional translation N(0, 0.125^2) of the size) and colour (brightness N(0, 0.2^2),
contrast 2^N(0, 0.5^2), luma flip, hue rotation up to pi, saturation 2^N(0, 1)). Each transform is drawn
per image with probability p (each rotation with 1 - sqrt(1 - p), so that "either rotation" has p). All
geometric transforms compose into one matrix per image, executed by one bilinear resampling.

Two departures from NVlabs, both on the resampling, and why:
- NVlabs reflect-pads by a margin computed from the transformed corners (a host sync every call) and
  resamples at 2x through a sym6 wavelet filter. Here `grid_sample`'s own reflection padding replaces the
  explicit padding (no sync, any distance), and the output is rendered at 2x and box-filtered down, which
  antialiases minification. Images whose matrix is the identity are passed through untouched.
- R1 differentiates D(augment(x)) twice through the resampling, and `grid_sample`'s backward has no
  derivative in torch (NVlabs' `grid_sample_gradfix` patches it only on torch 1.7-1.9; on torch 2.x its R1
  pass fails with "derivative for aten::grid_sampler_2d_backward is not implemented"). `grid_sample_2x`
  below is a `grid_sample` whose backward is itself differentiable: the sample is linear in the image, so
  the gradient map g -> J^T g is linear in g, and its own derivative is J again, i.e. `grid_sample` of the
  incoming gradient. Only public ops are used (`F.grid_sample` and `torch.autograd.grad` on it), so no
  private aten signature can break it. The sampling grid carries no gradient (the augmentation parameters
  are not learned), as in NVlabs.

p is a device tensor: the sign statistics accumulate on the device and `adjust` moves p every
`ada_interval` steps by sign(r_t - target) * (images since the last adjustment) / (ada_kimg * 1000), with
no host sync (and one all-reduce of two numbers under DDP).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("ada", "fixed", "none")
# the hue rotation's axis, as host numbers with float32's values (reading a device vector would sync)
LUMA_AXIS = tuple((torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)).tolist())
_SAMPLE = {"mode": "bilinear", "padding_mode": "reflection", "align_corners": False}


class _GridSample(torch.autograd.Function):
    """`F.grid_sample(images, grid)` (bilinear, reflection, align_corners=False) with a twice-differentiable
    gradient with respect to `images`; `grid` gets none."""

    @staticmethod
    def forward(ctx, images, grid):
        ctx.save_for_backward(images, grid)
        return F.grid_sample(images, grid, **_SAMPLE)

    @staticmethod
    def backward(ctx, grad_output):
        images, grid = ctx.saved_tensors
        return _GridSampleTranspose.apply(grad_output, images, grid), None


class _GridSampleTranspose(torch.autograd.Function):
    """g -> J^T g, the image gradient of the sampling (linear in g, independent of the image's values)."""

    @staticmethod
    def forward(ctx, grad_output, images, grid):
        ctx.save_for_backward(grid)
        with torch.enable_grad():
            source = images.detach().requires_grad_(True)
            (grad_images,) = torch.autograd.grad(
                F.grid_sample(source, grid.detach(), **_SAMPLE), source, grad_output
            )
        return grad_images

    @staticmethod
    def backward(ctx, grad_grad_images):
        (grid,) = ctx.saved_tensors
        return _GridSample.apply(grad_grad_images, grid), None, None


def grid_sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear `grid_sample` with reflection padding whose image gradient can be differentiated again."""
    if grid.requires_grad:
        raise ValueError("grid_sample here differentiates with respect to the images only")
    return _GridSample.apply(images, grid)


# ----------------------------------------------------------------------------
# Homogeneous matrices, batched: every argument is a (B,) tensor or a number.


def _matrix(rows: list[list], like: torch.Tensor) -> torch.Tensor:
    full = [
        [e if isinstance(e, torch.Tensor) else torch.full_like(like, float(e)) for e in row] for row in rows
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in full], dim=-2)


def translate2d(tx, ty, like):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def scale2d(sx, sy, like):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def rotate2d(theta, like):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], like)


def translate3d(t, like):
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], like)


def scale3d(s, like):
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], like)


def rotate3d(axis: tuple[float, float, float], theta: torch.Tensor, like):
    """Rotation by `theta` about the unit `axis` (three numbers on the host) (Rodrigues), homogeneous 4x4."""
    x, y, z = axis
    c, s = torch.cos(theta), torch.sin(theta)
    cc = 1 - c
    return _matrix([[x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s, 0],
                    [y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s, 0],
                    [z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c, 0],
                    [0, 0, 0, 1]], like)  # fmt: skip


class AugmentPipe(torch.nn.Module):
    """The `bgc` augmentations of [-1, 1] images (B, 3, H, W), each with probability `p` (a buffer)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("sign_sum", torch.zeros(()))  # sum of sign(D(real)) since the last adjustment
        self.register_buffer("sign_count", torch.zeros(()))

    def _draw(self, n: int, prob, value: torch.Tensor, neutral: float) -> torch.Tensor:
        """`value` where a uniform draw falls below `prob` (a tensor or number), `neutral` elsewhere."""
        return torch.where(torch.rand(n, device=value.device) < prob, value, torch.full_like(value, neutral))

    def geometry(self, n: int, height: int, width: int, device) -> torch.Tensor:
        """Inverse transforms (B, 3, 3): output pixel (centred coordinates) -> input pixel."""
        p, like = self.p, torch.zeros(n, device=device)
        rand = lambda: torch.rand(n, device=device)  # noqa: E731
        randn = lambda: torch.randn(n, device=device)  # noqa: E731
        flip = self._draw(n, p, torch.floor(rand() * 2), 0.0)
        G = scale2d(1 - 2 * flip, 1, like)  # x-flip
        quarter = self._draw(n, p, torch.floor(rand() * 4), 0.0)
        G = G @ rotate2d(math.pi / 2 * quarter, like)  # 90-degree rotations (inverse: rotate back)
        move = torch.rand(n, device=device) < p  # one draw for both axes, as NVlabs
        tx, ty = (torch.where(move, (rand() * 2 - 1) * 0.125, like) for _ in range(2))
        G = G @ translate2d(-torch.round(tx * width), -torch.round(ty * height), like)
        s = self._draw(n, p, torch.exp2(randn() * 0.2), 1.0)
        G = G @ scale2d(1 / s, 1 / s, like)
        p_rot = 1 - torch.sqrt((1 - p).clamp(0, 1))
        G = G @ rotate2d(self._draw(n, p_rot, (rand() * 2 - 1) * math.pi, 0.0), like)
        a = self._draw(n, p, torch.exp2(randn() * 0.2), 1.0)
        G = G @ scale2d(1 / a, a, like)
        G = G @ rotate2d(self._draw(n, p_rot, (rand() * 2 - 1) * math.pi, 0.0), like)
        move = torch.rand(n, device=device) < p
        tx, ty = (torch.where(move, randn() * 0.125, like) for _ in range(2))
        return G @ translate2d(-tx * width, -ty * height, like)

    def colour(self, n: int, device) -> torch.Tensor:
        """Colour transforms (B, 4, 4) acting on homogeneous RGB."""
        p, like = self.p, torch.zeros(n, device=device)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)
        outer = torch.outer(luma, luma)
        eye = torch.eye(4, device=device)
        C = translate3d(self._draw(n, p, torch.randn(n, device=device) * 0.2, 0.0), like)  # brightness
        C = (
            scale3d(self._draw(n, p, torch.exp2(torch.randn(n, device=device) * 0.5), 1.0), like) @ C
        )  # contrast
        flip = self._draw(n, p, torch.floor(torch.rand(n, device=device) * 2), 0.0)
        C = (eye - 2 * outer * flip[:, None, None]) @ C  # luma flip (Householder reflection)
        hue = self._draw(n, p, (torch.rand(n, device=device) * 2 - 1) * math.pi, 0.0)
        C = rotate3d(LUMA_AXIS, hue, like) @ C
        sat = self._draw(n, p, torch.exp2(torch.randn(n, device=device)), 1.0)
        return (eye + (eye - outer) * (sat - 1)[:, None, None]) @ C  # = outer + (eye - outer) * sat

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented images, float32 (also inside autocast: the resampling's own gradient runs in float32)."""
        n, c, h, w = images.shape
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images.float(), n, c, h, w)

    def _augment(self, images: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
        G = self.geometry(n, h, w, images.device)
        # normalised coordinates (align_corners=False): pixel units = normalised * size / 2
        to_pixels = scale2d(w / 2, h / 2, G[:, 0, 0])
        theta = torch.linalg.solve_ex(to_pixels, G @ to_pixels).result[:, :2, :]  # solve syncs on CUDA
        grid = F.affine_grid(theta, [n, c, 2 * h, 2 * w], align_corners=False)
        warped = F.avg_pool2d(grid_sample(images, grid), 2)
        identity = (torch.eye(3, device=G.device) == G).flatten(1).all(dim=1)
        images = torch.where(identity[:, None, None, None], images, warped)
        C = self.colour(n, images.device)
        flat = images.reshape(n, c, h * w)
        return (C[:, :3, :3] @ flat + C[:, :3, 3:]).reshape(n, c, h, w)

    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate sign(D(real)) on the device (no host sync)."""
        self.sign_sum += real_logits.detach().float().sign().sum()
        self.sign_count += real_logits.numel()

    @torch.no_grad()
    def adjust(self, target: float, images: int, ada_kimg: float, world: int = 1) -> torch.Tensor:
        """p += sign(r_t - target) * images / (ada_kimg * 1000), clamped to [0, 1]; resets the statistics.

        `images`: real images shown since the last adjustment over all processes. Returns r_t (device).
        """
        stats = torch.stack([self.sign_sum, self.sign_count])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        r_t = stats[0] / stats[1].clamp_min(1)
        step = torch.sign(r_t - target) * images / (ada_kimg * 1000)
        self.p.copy_((self.p + torch.where(stats[1] > 0, step, torch.zeros_like(step))).clamp(0, 1))
        self.sign_sum.zero_()
        self.sign_count.zero_()
        return r_t


def build_augment(mode: str, p: float, device) -> AugmentPipe | None:
    """`ada` starts at p and adapts, `fixed` keeps p, `none` gives no pipe."""
    if mode == "none":
        return None
    return AugmentPipe(p).to(device)
