"""A hand-made CUB-200-2011 folder with the official quirks (float boxes, grayscale, odd lines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


def make_mini_cub(root: Path, attributes: bool = True, n_per_class: int = 6) -> Path:
    """Write a tiny CUB copy: RGB, grayscale and palette JPEG/PNG images, float boxes, optional attributes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir()
        for k in range(n_per_class):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}.jpg"
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            mode = ("RGB", "L", "P", "CMYK")[k % 4]
            img = img.convert(mode)
            if mode == "P":
                rel = rel.replace(".jpg", ".png")
            img.save(root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(k < n_per_class // 2 + 1)}")
            boxes.append(f"{image_id} 10.0 5.5 20.0 30.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(CLASSES)) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    if attributes:
        (root / "attributes").mkdir()
        (root / "attributes" / "attributes.txt").write_text(
            "1 has_bill_shape::curved\n2 has_wing_color::blue\n"
        )
        lines = []
        for i in range(1, image_id + 1):
            lines.append(f"{i} 1 {i % 2} 3 2.5")
            # the official file has a few lines with an extra field; they must parse
            lines.append(f"{i} 2 {(i + 1) % 2} 4 0 1.0" if i == 2 else f"{i} 2 {(i + 1) % 2} 4 1.0")
        (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    return root
