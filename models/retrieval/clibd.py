"""CLIBD checkpoints (bioscan-ml/clibd, e.g. `image_dna_text.pth`: `torch.save` of `SimpleCLIP.state_dict()`)
as a `RetrievalModel` that embeds exactly as CLIBD's code does.

The towers and their parameter names, mapped to this project's modules:
- `image_encoder.base_image_encoder.*`: timm `vit_base_patch16_224`, head Linear(768 -> 768) on the class token,
  fed unnormalised [0, 1] pixels. CLIBD wraps every block's fused qkv in a LoRA module (`attn.qkv.qkv`,
  `linear_a_q/b_q/a_v/b_v`) even with `disable_lora` (its `if lora_layer:` reads [] as "all layers"), and
  full fine-tuning trains those too: they are merged here into the qkv weight (q += B_q A_q, v += B_v A_v).
- `dna_encoder.base_dna_encoder.*`: BarcodeBERT v1 (`BertForMaskedLM`) whose MLM decoder is Linear(768 -> 768);
  the embedding is the mean over tokens of the softmax of that head, over `[0] + 5-mers of the barcode
  padded with N to 660 nt` (133 tokens), no attention mask.
- `language_encoder.*`: BERT-small (`base_language_encoder`, its pooler unused) and `proj` Linear(512 -> 768)
  of the mean of all 20 positions' last hidden states.
- `logit_scale`. LoRA modules of the DNA and text towers (`query.w`, `query.w_a`, `query.w_b`) are merged too.
Older checkpoints' names (`lora_vit`, `lora_barcode_bert`, `lora_bert`, ...) are renamed as CLIBD's
`update_checkpoint_param_names` does. Heads are not stored: width / 64, as in every tower CLIBD uses.
"""

from __future__ import annotations

import torch

from core.errors import UserError
from models.retrieval.barcodebert import bert_state
from models.retrieval.bert import config_from_state
from models.retrieval.vit import vit_config_from_state

TOWERS = {"image": "image_encoder.", "dna": "dna_encoder.", "text": "language_encoder."}
_LEGACY = {"LoRA_barcode_bert": "CLIBDDNAEncoder", "lora_barcode_bert": "base_dna_encoder",
           "LoRA_ViT_timm": "CLIBDImageEncoder", "lora_vit": "base_image_encoder",
           "LoRA_bert": "CLIBDLanguageEncoder", "lora_bert": "base_language_encoder"}  # fmt: skip


def is_clibd_state(state) -> bool:
    return isinstance(state, dict) and any(
        str(k).removeprefix("module.").startswith(tuple(TOWERS.values())) for k in state
    )


def _renamed(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = str(key).removeprefix("module.")
        for old, new in _LEGACY.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _merge_lora_linear(state: dict) -> dict:
    """`X.w.weight`, `X.w_a.weight`, `X.w_b.weight` (CLIBD's `_LoRALayer`) -> `X.weight` = w + w_b w_a."""
    out = {}
    for key, value in state.items():
        if ".w_a." in key or ".w_b." in key:
            continue
        if key.endswith(".w.weight"):
            base = key[: -len(".w.weight")]
            value = value + state[f"{base}.w_b.weight"] @ state[f"{base}.w_a.weight"]
            key = f"{base}.weight"
        elif key.endswith(".w.bias"):
            key = key[: -len(".w.bias")] + ".bias"
        out[key] = value
    return out


def _merge_lora_qkv(state: dict) -> dict:
    """timm blocks whose `attn.qkv` is CLIBD's `_LoRA_qkv_timm`: q and v rows get B A added."""
    out = {}
    for key, value in state.items():
        if ".attn.qkv.linear_" in key:
            continue
        if key.endswith(".attn.qkv.qkv.weight"):
            base = key[: -len(".qkv.weight")]
            value = value.clone()
            d = value.shape[1]
            if f"{base}.linear_a_q.weight" in state:
                value[:d] += state[f"{base}.linear_b_q.weight"] @ state[f"{base}.linear_a_q.weight"]
                value[-d:] += state[f"{base}.linear_b_v.weight"] @ state[f"{base}.linear_a_v.weight"]
            key = f"{base}.weight"
        elif key.endswith(".attn.qkv.qkv.bias"):
            key = key[: -len(".qkv.bias")] + ".bias"
        out[key] = value
    return out


def clibd_model_parts(state: dict, source: str) -> tuple[dict, dict]:
    """(RetrievalSpec fields, RetrievalModel state dict) of a CLIBD state dict."""
    from dataclasses import asdict

    from datasets.bioscan.dna import KmerTokenizer

    state = {k: v for k, v in _renamed(state).items() if isinstance(v, torch.Tensor)}
    spec: dict = {
        "modalities": [],
        "dna_pooling": "mlm_softmax",
        "text_arch": "bert",
        "learn_temperature": True,
    }
    ours: dict = {}
    dims = set()
    image = _merge_lora_qkv(_part(state, "image_encoder.base_image_encoder."))
    if image:
        vit, out = vit_config_from_state(image)
        dims.add(out)
        spec.update(modalities=["image"], image_arch="vit_base_patch16_224", image_size=vit.image_size,
                    image_vit={k: v for k, v in asdict(vit).items() if k != "image_size"})  # fmt: skip
        ours.update({f"image.net.{k}": v for k, v in image.items()})
    dna = _merge_lora_linear(_part(state, "dna_encoder.base_dna_encoder."))
    if dna:
        bert = bert_state(dna, source)
        config = config_from_state(bert)
        k = next((i for i in range(1, 9) if 3 + 4**i == config.vocab_size), None)
        if k is None:
            raise UserError(
                f"{source}: the DNA tower's vocabulary of {config.vocab_size} is not BarcodeBERT v1's 3 + 4^k"
            )
        try:
            decoder = dna["cls.predictions.decoder.weight"]
            head = {"transform.dense.weight": dna["cls.predictions.transform.dense.weight"],
                    "transform.dense.bias": dna["cls.predictions.transform.dense.bias"],
                    "transform.LayerNorm.weight": dna["cls.predictions.transform.LayerNorm.weight"],
                    "transform.LayerNorm.bias": dna["cls.predictions.transform.LayerNorm.bias"],
                    "decoder.weight": decoder, "decoder.bias": dna["cls.predictions.decoder.bias"]}  # fmt: skip
        except KeyError as err:
            raise UserError(
                f"{source}: the DNA tower lacks its MLM head ({err}); is it a CLIBD checkpoint?"
            ) from None
        dims.add(decoder.shape[0])
        tokens = KmerTokenizer(k, k, 660, "v1", attend_padding=True, prefix=0)
        spec["modalities"].append("dna")
        spec.update(dna_k=k, dna_stride=k, dna_max_len=660, dna_vocab="v1", dna_attend_padding=True, dna_prefix=0,
                    dna_bert={f: v for f, v in asdict(config).items() if f != "vocab_size"})  # fmt: skip
        if tokens.num_tokens > config.max_position_embeddings:
            raise UserError(
                f"{source}: the DNA tower has {config.max_position_embeddings} positions, under 133"
            )
        ours.update({f"dna.bert.{n}": v for n, v in bert.items()})
        ours.update({f"dna.head.{n}": v for n, v in head.items()})
    text = _merge_lora_linear(_part(state, "language_encoder."))
    if text:
        bert = bert_state(_part(text, "base_language_encoder."), source)
        config = config_from_state(bert)
        try:
            proj = {"weight": text["proj.weight"], "bias": text["proj.bias"]}
        except KeyError as err:
            raise UserError(f"{source}: the text tower lacks its projection ({err})") from None
        dims.add(proj["weight"].shape[0])
        spec["modalities"].append("text")
        spec["text_bert"] = asdict(config)
        ours.update({f"text.bert.{n}": v for n, v in bert.items()})
        ours.update({f"text.proj.{n}": v for n, v in proj.items()})
    if len(spec["modalities"]) < 2:
        raise UserError(
            f"{source}: a CLIBD checkpoint with {len(spec['modalities'])} tower(s); retrieval needs two"
        )
    if len(dims) != 1:
        raise UserError(f"{source}: its towers embed into different sizes {sorted(dims)}")
    spec["embed_dim"] = dims.pop()
    if "logit_scale" in state:
        ours["logit_scale"] = state["logit_scale"].reshape(())
    return spec, ours
