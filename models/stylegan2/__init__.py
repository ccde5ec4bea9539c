"""StyleGAN2 (NVlabs stylegan2-ada-pytorch compatible) in plain PyTorch, and a safe reader for NVlabs pickles.

- `networks`: `MappingNetwork`, `SynthesisNetwork`, `Generator`, `Discriminator` (NVlabs tensor names).
- `layers`: `FullyConnectedLayer` (equalised LR), `SynthesisLayer`, `ToRGBLayer`, `Conv2dLayer`, ...
- `ops`: `upfirdn2d`, `upsample2d`, `downsample2d`, `conv2d_resample`, `modulated_conv2d`, `bias_act`.
- `nvlabs_import`: `load_nvlabs_generator(path)` reads a snapshot .pkl without executing code from it.
"""

from models.stylegan2.layers import FullyConnectedLayer, SynthesisLayer, ToRGBLayer
from models.stylegan2.networks import Discriminator, Generator, MappingNetwork, SynthesisNetwork
from models.stylegan2.nvlabs_import import load_nvlabs_generator, read_nvlabs_generator
from models.stylegan2.ops import normalize_2nd_moment, upfirdn2d

__all__ = [
    "Discriminator",
    "FullyConnectedLayer",
    "Generator",
    "MappingNetwork",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToRGBLayer",
    "load_nvlabs_generator",
    "normalize_2nd_moment",
    "read_nvlabs_generator",
    "upfirdn2d",
]
