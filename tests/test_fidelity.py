"""Sample fidelity with known answers: real images fed as samples score the classifier's own accuracy, identical
samples have no spread, recognition per level and clade membership by hand, the round trip, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from models.classifiers import Classifier
from testing.generation.fidelity import (
    NOT_GIVEN,
    classifier_outputs,
    feature_distance,
    fidelity_report,
    node_targets,
    pixel_spread,
    recognition_by_level,
    round_trip,
    species_targets,
    spread_ratio,
    write_fidelity,
)

# 6 species: orders {0,1,2} {3,4,5}; genera {0,1} {2} {3} {4,5}
ASSIGNMENT = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]])


class ReadsTheSpecies(nn.Module):
    """A classifier that reads the species off the first pixel (value k/10 - 1 means species k); its features
    are the image's channel means."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.n = n
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = ((x[:, 0, 0, 0] + 1) * 10).round().long().clamp(0, self.n - 1)
        return nn.functional.one_hot(k, self.n).float(), [x]


def images_of(species: list[int], noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(len(species), 3, 8, 8, generator=g)
    x[:, 0, 0, 0] = torch.tensor(species, dtype=torch.float) / 10 - 1
    return x.clamp(-1, 1)


def test_recognition_per_level_by_hand():
    predicted = torch.tensor([0, 1, 3, 2, 5, 4])
    species = np.array([0, 0, 2, 2, 4, 5])
    rows = recognition_by_level(predicted, species_targets(species, ASSIGNMENT), ASSIGNMENT)
    # order: 0->0 ok, 1 ok, 3 (order 1) vs 0 no, 2 ok, 5 ok, 4 ok -> 5/6; genus: 0 ok, 1 (genus 0) ok, 3 no,
    # 2 ok, 5 (genus 3) ok, 4 ok -> 5/6; species: 0 ok, then 1, 3 no, 2 ok, 5 != 4 no, 4 != 5 no -> 2/6
    assert [row["rate"] for row in rows] == pytest.approx([5 / 6, 5 / 6, 2 / 6])
    # chance: share of species in the intended group: orders 3/6 each; genera {0,1} 2/6, {2} 1/6, {4,5} 2/6
    assert [row["chance"] for row in rows] == pytest.approx([0.5, (2 + 2 + 1 + 1 + 2 + 2) / 36, 1 / 6])
    targets = node_targets(1, 3, 4, ASSIGNMENT)  # genus {4, 5}: its order above, nothing below
    assert targets[:, 0].tolist() == [1, 3, NOT_GIVEN]
    rows = recognition_by_level(torch.tensor([4, 5, 3, 0]), targets, ASSIGNMENT)
    assert [(row["level"], row["rate"]) for row in rows] == [(0, 0.75), (1, 0.5)]  # clade membership


def test_real_images_as_samples_score_the_classifiers_accuracy():
    species = [0, 1, 2, 3, 4, 5] * 3
    real = images_of(species, noise=0.3)
    real[:4, 0, 0, 0] = -1  # four images the classifier reads as species 0
    clf = ReadsTheSpecies()
    labels = np.array(species)
    predicted, _ = classifier_outputs(clf, real)
    accuracy = float((predicted.numpy() == labels).mean())
    report = fidelity_report(clf, real, species_targets(labels, ASSIGNMENT), labels, real, labels, ASSIGNMENT)
    assert report["recognition"][-1]["rate"] == pytest.approx(accuracy) and accuracy == pytest.approx(15 / 18)
    assert report["pixel_spread"]["ratio"] == pytest.approx(1.0)  # as varied as themselves
    assert report["feature_distance"]["all"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    net = Classifier("tiny", 6).eval()  # any project classifier: the same identity, resized to its size
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    predicted, features = classifier_outputs(net, images, image_size=32, batch_size=5)
    with torch.no_grad():
        logits, stages = net(
            nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        )
    assert torch.equal(predicted, logits.argmax(1)) and torch.allclose(
        features, stages[-1].mean((2, 3)), atol=1e-6
    )


def test_identical_samples_have_no_spread_and_templates_are_found():
    real = images_of([0] * 5 + [1] * 5, noise=0.4)
    labels = np.array([0] * 5 + [1] * 5)
    template = images_of([0] * 5 + [1] * 5)  # one image per class, repeated
    assert pixel_spread(template, labels) == {0: 0.0, 1: 0.0}
    ratio = spread_ratio(pixel_spread(template, labels), pixel_spread(real, labels))
    assert ratio["ratio"] == 0.0 and set(ratio["per_label"]) == {0, 1}
    by_hand = real[:5].float().std(dim=0).mean().item()
    assert pixel_spread(real, labels)[0] == pytest.approx(by_hand)
    half = spread_ratio(pixel_spread(real * 0.5, labels), pixel_spread(real, labels))
    assert half["ratio"] == pytest.approx(0.5, rel=1e-5)
    a, b = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)), None
    b = a + torch.tensor([3.0, 0.0, 0.0])
    assert feature_distance(a, b) == pytest.approx(9.0, rel=1e-6)  # a shifted copy: |mu1 - mu2|^2


def test_round_trip_and_the_report_files(tmp_path):
    species = [0, 1, 2, 3, 4, 5] * 2
    real, labels = images_of(species, noise=0.2), np.array(species)
    clf = ReadsTheSpecies()
    same = round_trip(clf, lambda x: x, real, labels, batch_size=5)
    assert same["real_accuracy"] == same["round_trip_accuracy"] == 1.0 and same["l1"] == 0.0
    blurred = round_trip(clf, lambda x: torch.full_like(x, -1.0), real, labels)
    assert blurred["round_trip_accuracy"] == pytest.approx(2 / 12)  # everything read as species 0
    report = fidelity_report(clf, real[:2], species_targets(labels[:2], ASSIGNMENT), labels[:2], real, labels,
                             ASSIGNMENT)  # fmt: skip
    assert np.isnan(report["pixel_spread"]["ratio"])  # one sample per class: no spread to compare
    write_fidelity(report, tmp_path, ["order", "genus", "species"])

    def refuse(token):
        raise AssertionError(token)

    saved = json.loads((tmp_path / "fidelity.json").read_text(), parse_constant=refuse)
    assert saved["pixel_spread"]["ratio"] is None and saved["recognition"][-1]["rate"] == 1.0
    assert (tmp_path / "recognition.csv").read_text().splitlines()[0] == "level,samples,rate,chance"
    assert (tmp_path / "fidelity.png").stat().st_size > 5000
