"""VisCoIN's interpretable network around a frozen classifier f and a pretrained StyleGAN2 G.

- `ConceptExtractor` (Psi): f's last three feature maps -> non-negative concept maps (B, K, g, g) and the
  support vector (B, g*g*K) that carries what the concepts do not (pose, background).
- `Explainer` (Theta): spatial max-pool of the concept maps to (B, K), then one linear layer to the classes.
- `ConceptDecoder` (Omega): one equalised-LR head per W+ slot; concepts drive the middle slots, the support
  vector the coarse and fine ones; the sum with G's `w_avg` goes through G's frozen synthesis network.

Because every head input is `normalize_2nd_moment`-ed, Omega is invariant to a global rescale of the concept
maps, and amplifying some concepts shrinks the others after normalisation. All-zero concepts give
w_avg + lrelu(head bias) on the concept slots (exactly w_avg only while the heads' biases are zero).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.stylegan2 import FullyConnectedLayer, SynthesisNetwork, normalize_2nd_moment


class ConceptExtractor(nn.Module):
    """Psi: (stage2, stage3, stage4) -> concept maps (B, K, g, g) >= 0 and support vector (B, g*g*K)."""

    def __init__(
        self,
        in_channels: tuple[int, int, int],
        n_concepts: int = 256,
        latent_channels: int = 512,
        grid: int = 3,
    ):
        super().__init__()
        c2, c3, c4 = in_channels
        self.in_channels = tuple(in_channels)
        self.n_concepts, self.latent_channels, self.grid = n_concepts, latent_channels, grid
        # stage2 is 4x and stage3 2x the resolution of stage4: bring all three onto stage4's grid
        self.conv1 = nn.Conv2d(c2, latent_channels, 5, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c3, latent_channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c4, latent_channels, 3, stride=1, padding=1)
        self.conv4 = nn.Conv2d(3 * latent_channels, 3 * latent_channels, 3, padding=1)
        self.conv5 = nn.Conv2d(3 * latent_channels, n_concepts, 1)
        cells = grid * grid
        self.support1 = nn.Linear(3 * latent_channels * cells, cells * n_concepts)
        self.support2 = nn.Linear(cells * n_concepts, cells * n_concepts, bias=False)

    @property
    def config(self) -> dict[str, Any]:
        return {"in_channels": list(self.in_channels), "n_concepts": self.n_concepts,
                "latent_channels": self.latent_channels, "grid": self.grid}  # fmt: skip

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f2, f3, f4 = features[-3:]
        size = f4.shape[-2:]
        branches = [F.relu(self.conv1(f2)), F.relu(self.conv2(f3)), F.relu(self.conv3(f4))]
        branches = [b if b.shape[-2:] == size else F.adaptive_avg_pool2d(b, size) for b in branches]
        hidden = F.relu(self.conv4(torch.cat(branches, dim=1)))
        concepts = F.adaptive_avg_pool2d(F.relu(self.conv5(hidden)), self.grid)
        support = F.adaptive_avg_pool2d(hidden, self.grid).flatten(1)
        support = F.relu(self.support2(F.relu(self.support1(support))))
        return concepts, support


def concept_activations(concepts: torch.Tensor) -> torch.Tensor:
    """(B, K, g, g) -> (B, K): the strongest response of each concept anywhere in the image."""
    return concepts.amax(dim=(2, 3))


class Explainer(nn.Module):
    """Theta: linear classifier on max-pooled concept activations (the interpretable layer)."""

    def __init__(self, n_concepts: int, n_classes: int, dropout: float = 0.01):
        super().__init__()
        self.n_concepts, self.n_classes, self.dropout_p = n_concepts, n_classes, dropout
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(n_concepts, n_classes)

    @property
    def config(self) -> dict[str, Any]:
        return {"n_concepts": self.n_concepts, "n_classes": self.n_classes, "dropout": self.dropout_p}

    def forward(self, concepts: torch.Tensor) -> torch.Tensor:
        return self.linear(concept_activations(self.dropout(concepts)))

    def relevance(self, concepts: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per-concept contribution to each image's class logit: activation x weight, (B, K)."""
        return concept_activations(concepts) * self.linear.weight[classes]


def default_concept_slots(num_ws: int) -> tuple[int, int]:
    """The reference's split at 256 px (14 slots: concepts on 2..10) scaled to other W+ lengths."""
    start = max(1, round(2 * num_ws / 14))
    end = min(num_ws - 1, round(11 * num_ws / 14))
    return start, max(end, start + 1)


class ConceptDecoder(nn.Module):
    """Omega: (concept maps, support) -> W+ -> image through a frozen StyleGAN2 synthesis network."""

    def __init__(
        self,
        n_concepts: int,
        grid: int,
        generator_config: dict[str, Any],
        concept_slots: tuple[int, int] | None = None,
        lr_multiplier: float = 0.01,
        learn_w_avg: bool = False,
    ):
        super().__init__()
        g = generator_config
        self.generator_config = dict(g)
        self.synthesis = SynthesisNetwork(
            w_dim=g["w_dim"],
            img_resolution=g["img_resolution"],
            img_channels=g["img_channels"],
            **g.get("synthesis_kwargs", {}),
        )
        self.synthesis.requires_grad_(False)
        self.num_ws, self.w_dim = self.synthesis.num_ws, g["w_dim"]
        self.n_concepts, self.grid, self.lr_multiplier, self.learn_w_avg = (
            n_concepts,
            grid,
            lr_multiplier,
            learn_w_avg,
        )
        self.concept_slots = tuple(concept_slots or default_concept_slots(self.num_ws))
        start, end = self.concept_slots
        if not 0 <= start < end <= self.num_ws:
            raise ValueError(f"concept_slots {self.concept_slots} must lie within the {self.num_ws} W+ slots")
        width = grid * grid * n_concepts
        self.heads = nn.ModuleList(
            FullyConnectedLayer(width, self.w_dim, activation="lrelu", lr_multiplier=lr_multiplier)
            for _ in range(self.num_ws)
        )
        w_avg = torch.zeros(self.w_dim)
        if learn_w_avg:
            self.w_avg = nn.Parameter(w_avg)
        else:
            self.register_buffer("w_avg", w_avg)

    @property
    def config(self) -> dict[str, Any]:
        return {"n_concepts": self.n_concepts, "grid": self.grid, "generator_config": self.generator_config,
                "concept_slots": list(self.concept_slots), "lr_multiplier": self.lr_multiplier,
                "learn_w_avg": self.learn_w_avg}  # fmt: skip

    @classmethod
    def from_generator(cls, generator, n_concepts: int, grid: int, **kwargs) -> ConceptDecoder:
        """Copy the pretrained G's synthesis weights and its `w_avg`."""
        decoder = cls(n_concepts, grid, generator.config, **kwargs)
        decoder.synthesis.load_state_dict(generator.synthesis.state_dict())
        with torch.no_grad():
            decoder.w_avg.copy_(generator.mapping.w_avg)
        return decoder

    def train(self, mode: bool = True) -> ConceptDecoder:
        super().train(mode)
        self.synthesis.eval()  # frozen, always in inference mode
        return self

    def ws(self, concepts: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        z_concepts = normalize_2nd_moment(concepts.flatten(1))
        z_support = normalize_2nd_moment(support.flatten(1))
        start, end = self.concept_slots
        slots = [head(z_concepts if start <= i < end else z_support) for i, head in enumerate(self.heads)]
        return torch.stack(slots, dim=1) + self.w_avg

    def forward(
        self, concepts: torch.Tensor, support: torch.Tensor, noise_mode: str = "const"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ws = self.ws(concepts, support)
        return self.synthesis(ws, noise_mode=noise_mode), ws
