"""Image transforms producing the project's one pixel convention: float32 RGB in [-1, 1], CHW.

Augmentation is applied at every fetch (nothing transformed is cached), so every epoch sees new crops.
"""

from __future__ import annotations


def to_tensor_pm1():
    """PIL -> float tensor in [-1, 1]."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )


def build_transform(image_size: int, train: bool, crop_scale: tuple[float, float] = (0.5, 1.0)):
    """Train: random resized crop + horizontal flip. Eval: resize (short side x 8/7) + centre crop."""
    from torchvision.transforms import v2

    if train:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, to_tensor_pm1()])


def square_transform(image_size: int):
    """Short side to `image_size`, centre crop: the whole image, as a generator should learn it (no zoom-in)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), to_tensor_pm1()])


def to_uint8_images(x):
    """[-1, 1] float NCHW -> uint8 NHWC numpy, for saving figures and PNGs."""
    return (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").byte().permute(0, 2, 3, 1).numpy()
    )


# ----- uint8 images for the device pipeline (datasets.gpu_transforms) -----

UINT8_MODES = ("train", "eval", "square")
JPEG_MAGIC = b"\xff\xd8"


def eval_resize(image_size: int) -> int:
    """The short side the eval transform resizes to before its centre crop (the ImageNet 8/7 rule)."""
    return round(image_size * 8 / 7)


def train_load_size(image_size: int) -> int:
    """The square the train images are shipped at: sqrt(2) x the output, so that a crop of half the area
    (the smallest `build_transform` draws) still holds about `image_size` source pixels a side. The device's
    crops then differ from torchvision's crops of the full-size image by 1 level of 255 on average."""
    import math

    return math.ceil(image_size * math.sqrt(2))


def box_pixels(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A float CUB box (x, y, w, h) as whole pixels (left, top, right, bottom) covering it, clipped to the
    image; None when no box is given or nothing of it lies inside."""
    import math

    if box is None:
        return None
    x, y, w, h = (float(v) for v in box)
    left, top = max(0, math.floor(x)), max(0, math.floor(y))
    right, bottom = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return (left, top, right, bottom) if right > left and bottom > top else None


class Uint8Images:
    """Image file -> fixed-size uint8 RGB tensor [3, S, S] for the device pipeline, which turns it into model
    input (`datasets.gpu_transforms.to_model_batch`). Called as `(path, box) -> (pixels, (height, width))`, the
    second being the size of the region shown (the image, or its box) in source pixels.

    `eval` / `square`: PIL's decoder and the very operations of `build_transform(train=False)` /
    `square_transform`, so that the device's [-1, 1] conversion gives the float path's tensors bit for bit.
    `train`: the whole region squashed to `load_size` x `load_size` (`train_load_size`), decoded by
    libjpeg-turbo/libpng through torchvision.io and resized by torch's uint8 antialiased bilinear kernel
    (together about twice as fast as PIL); JPEGs large enough are decoded at 1/2..1/8 scale (PIL's draft
    mode). The random crop and flip are then drawn on the device, in the source's pixel geometry.
    `encoded=True` (train or eval): JPEG bytes are shipped as they are, to be decoded on the device.
    """

    def __init__(
        self, image_size: int, mode: str = "eval", load_size: int | None = None, encoded: bool = False
    ):
        if mode not in UINT8_MODES:
            raise ValueError(f"mode must be one of {UINT8_MODES}, got {mode!r}")
        self.image_size, self.mode, self.encoded = image_size, mode, encoded
        self.load_size = load_size or (train_load_size(image_size) if mode == "train" else image_size)
        self._exact = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(mode index, output size, shipped size): travels with each item so the device knows the layout."""
        return UINT8_MODES.index(self.mode), self.image_size, self.load_size

    def __call__(self, path, box=None):
        if self.encoded:
            raise TypeError("an encoded Uint8Images ships bytes: call .encode(path, box)")
        if self.mode == "train":
            return self._train_pixels(path, box)
        return self._exact_pixels(path, box)

    def _exact_pixels(self, path, box):
        from torchvision.transforms import v2

        from datasets.images import open_rgb

        if self._exact is None:
            size = self.image_size
            resize = eval_resize(size) if self.mode == "eval" else size
            self._exact = v2.Compose(
                [v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()]
            )
        img = open_rgb(path)
        crop = box_pixels(box, img.width, img.height)
        if crop is not None:
            img = img.crop(crop)
        return self._exact(img), (img.height, img.width)

    def _train_pixels(self, path, box):
        from torchvision.transforms.v2.functional import resize

        pixels, crop = decode_rgb(path, box, self.load_size)
        size = (crop[3] - crop[1], crop[2] - crop[0])
        return resize(pixels, [self.load_size, self.load_size], antialias=True), size

    def encode(self, path, box=None):
        """(data, box, (height, width)): `data` is the file's bytes (1-D uint8) for a JPEG the device can
        decode, else the decoded image [3, H, W]; `box` the region (left, top, right, bottom) to keep."""
        import torch

        from datasets.images import BadImageError, image_header

        fmt, (width, height), mode = image_header(path)
        crop = box_pixels(box, width, height) or (0, 0, width, height)
        if fmt == "JPEG" and mode in ("RGB", "L"):
            try:
                with open(path, "rb") as f:
                    data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            except OSError as err:
                raise BadImageError(f"cannot read image {path} ({err.strerror}); fix or remove it") from None
        else:
            data, _ = decode_rgb(path, None, None)
        return data, torch.tensor(crop), (crop[3] - crop[1], crop[2] - crop[0])


def decode_rgb(path, box=None, min_size: int | None = None):
    """(uint8 [3, h, w] of the box's region, the region in source pixels). RGB and grayscale JPEG/PNG go
    through torchvision.io (libjpeg-turbo, libpng: the pixels PIL decodes, faster); a JPEG whose region holds
    at least 2 x `min_size` pixels a side is decoded by PIL at a 1/2..1/8 scale (draft mode) instead; every
    other file through PIL (`open_rgb`: every mode to RGB). Unreadable files raise BadImageError."""
    import math

    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:  # deprecated in torchvision 0.29 (torchcodec takes over); PIL serves when it is gone
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = None

    from datasets.images import image_header, open_rgb

    fmt, (width, height), mode = image_header(path)
    crop = box_pixels(box, width, height) or (0, 0, width, height)
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    if fmt == "JPEG" and min_size and min(cw, ch) >= 2 * min_size:
        wanted = (math.ceil(min_size * width / cw), math.ceil(min_size * height / ch))
        img = open_rgb(path, draft=wanted)
        sx, sy = img.width / width, img.height / height
        scaled = (
            math.floor(crop[0] * sx),
            math.floor(crop[1] * sy),
            math.ceil(crop[2] * sx),
            math.ceil(crop[3] * sy),
        )
        return pil_to_tensor(img.crop(scaled)), crop
    pixels = None
    if decode_image is not None and fmt in ("JPEG", "PNG") and mode in ("RGB", "L"):
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            pixels = decode_image(data, mode=ImageReadMode.RGB)
        except (OSError, RuntimeError):
            pixels = None  # PIL below names the problem, or reads what libjpeg/libpng refused
        if pixels is not None and (pixels.dtype != torch.uint8 or pixels.shape[1:] != (height, width)):
            pixels = None
    if pixels is None:
        pixels = pil_to_tensor(open_rgb(path))
    return pixels[:, crop[1] : crop[3], crop[0] : crop[2]], crop
