"""Retrieval models and loss: BarcodeBERT parameter names (a BertForMaskedLM state dict loads), equality with
`transformers`' BERT on random weights (when installed), padding that changes nothing, the contrastive loss
against a hand computation, and identical taxonomy strings as positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from datasets.bioscan.dna import KmerTokenizer
from models.retrieval.barcodebert import bert_state, load_barcodebert
from models.retrieval.bert import Bert, BertConfig
from models.retrieval.clip import DNAEncoder
from training.losses_retrieval import contrastive_loss

SMALL = dict(vocab_size=1027, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=160, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def barcodebert_keys(layers: int) -> set[str]:
    """The parameter names of HF `BertForMaskedLM` (BarcodeBERT's checkpoint), written out by hand."""
    keys = {
        f"bert.embeddings.{n}.weight"
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    keys |= {"bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):  # fmt: skip
            keys |= {p + name + ".weight", p + name + ".bias"}
    return keys


def test_barcodebert_checkpoint_loads(tmp_path):
    bert = Bert(BertConfig(**SMALL))
    assert {"bert." + k for k in bert.state_dict()} == barcodebert_keys(2)
    # A checkpoint as BarcodeBERT saves it: DDP prefix, MLM head, position_ids buffer.
    source = Bert(BertConfig(**SMALL))
    state = {f"module.bert.{k}": v.clone() for k, v in source.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(160)[None]
    state["module.cls.predictions.bias"] = torch.zeros(1027)
    state["module.cls.predictions.transform.dense.weight"] = torch.zeros(32, 32)
    path = tmp_path / "model_41.pth"
    torch.save(state, path)
    load_barcodebert(bert, path)
    for key, value in source.state_dict().items():
        assert torch.equal(bert.state_dict()[key], value), key
    with pytest.raises(UserError, match="does not fit this architecture: shape mismatch"):
        load_barcodebert(Bert(BertConfig(**{**SMALL, "hidden_size": 64})), path)
    with pytest.raises(UserError, match="no BERT encoder weights"):
        bert_state({"cls.predictions.bias": torch.zeros(3)}, "x.pth")


def test_equals_transformers_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**SMALL, attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    ours = Bert(BertConfig(**SMALL)).eval()
    state = bert_state({f"bert.{k}": v for k, v in reference.state_dict().items()}, "hf")
    ours.load_state_dict(state)
    ids = torch.randint(3, 1027, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    mask[2, 5:] = False
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_padding_changes_nothing():
    """A barcode embeds the same alone, padded to another length, and beside a longer one in a batch."""
    torch.manual_seed(1)
    encoder = DNAEncoder(BertConfig(**SMALL), embed_dim=16).eval()
    short, long = "ACGTTGCA" * 30, "TTGACCAG" * 80
    embeddings = []
    for max_len, batch in ((660, [short]), (700, [short]), (660, [short, long])):
        ids, mask = KmerTokenizer(max_len=max_len).encode(batch)
        with torch.no_grad():
            embeddings.append(encoder(torch.from_numpy(ids), torch.from_numpy(mask))[0])
    assert torch.allclose(embeddings[0], embeddings[1], atol=1e-5)
    assert torch.allclose(embeddings[0], embeddings[2], atol=1e-5)
    # without the mask, the padding would move the embedding
    ids, _ = KmerTokenizer(max_len=700).encode([short])
    with torch.no_grad():
        unmasked = encoder(torch.from_numpy(ids), torch.ones_like(torch.from_numpy(ids), dtype=torch.bool))[0]
    assert not torch.allclose(embeddings[0], unmasked, atol=1e-3)


def _ce(logits_row: list[float], target: int) -> float:
    return -logits_row[target] + math.log(sum(math.exp(v) for v in logits_row))


def test_loss_by_hand():
    """Two records, unit vectors at 0 and 90 degrees (image) and 0 and 60 degrees (DNA), scale 2."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dna = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    s = 2.0
    sim = [[1.0, 0.5], [0.0, math.sqrt(3) / 2]]  # image_i . dna_j
    image_to_dna = (_ce([s * v for v in sim[0]], 0) + _ce([s * v for v in sim[1]], 1)) / 2
    dna_to_image = (_ce([s * sim[0][0], s * sim[1][0]], 0) + _ce([s * sim[0][1], s * sim[1][1]], 1)) / 2
    loss, per_pair = contrastive_loss({"image": image, "dna": dna}, torch.tensor(s))
    assert per_pair.shape == (1,)
    assert loss.item() == pytest.approx((image_to_dna + dna_to_image) / 2, abs=1e-6)


def test_identical_taxonomy_strings_are_not_negatives():
    """Records 0 and 1 share a taxonomy string: each is left out of the other's negatives."""
    torch.manual_seed(2)
    image = F.normalize(torch.randn(3, 4), dim=1)
    text = F.normalize(torch.randn(3, 4), dim=1)
    text[1] = text[0]  # the same string embeds identically
    groups = torch.tensor([7, 7, 9])
    s = 3.0
    loss, _ = contrastive_loss({"image": image, "text": text}, torch.tensor(s), groups)
    keep = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    targets = torch.arange(3)

    def ce(logits):
        return F.cross_entropy(logits.masked_fill(~keep, -torch.inf), targets)

    expected = (ce(s * image @ text.T) + ce(s * text @ image.T)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # the same masking for records of one species in an image-DNA pair
    species, _ = contrastive_loss({"image": image, "dna": text}, torch.tensor(s), species_groups=groups)
    assert species.item() == pytest.approx(expected.item(), abs=1e-6)
    identity, _ = contrastive_loss({"image": image, "text": text}, torch.tensor(s))
    assert identity.item() > loss.item() + 0.1  # as a negative, the duplicate costs at least log 2 per row
