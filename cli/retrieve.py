"""`retrieve`: identify specimens across images, DNA barcodes and taxonomy (BIOSCAN-CLIP / CLIBD): export the
world as BIOSCAN HDF5, build embedding indexes, query them, evaluate with the BIOSCAN protocol, plot the
embedding space. `train retrieval` (registered in cli/train.py) trains the model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from cli.common import (
    CONTEXT,
    DATA,
    HARDWARE,
    MODEL,
    OPTIM,
    OUTPUT,
    REQUIRED,
    Amp,
    DataDir,
    Device,
    Overwrite,
    Quiet,
    Shared,
    TrainOptions,
    Workers,
    WorldPreset,
    results_dir,
    run_dir_for,
    training_command,
    with_options,
)
from core.errors import UserError

app = typer.Typer(
    help="Retrieval across images, DNA barcodes and taxonomy: index, query, evaluate (BIOSCAN protocol), plot.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
SEARCH = "Search"

Model = Annotated[
    Path,
    typer.Option("--model", "-m", exists=True, help="Retrieval weights (.safetensors) or a `train retrieval` run "
                 "directory (uses best).", rich_help_panel=MODEL),
]  # fmt: skip
Data = Annotated[
    Path | None,
    typer.Option("--data", exists=True, dir_okay=False, envvar="BIOVIS_BIOSCAN",
                 help="BIOSCAN HDF5 file (BIOSCAN-1M/5M layout). Default: the data the model was trained on.",
                 rich_help_panel=DATA),
]  # fmt: skip
BatchSize = Annotated[int, typer.Option(help="Records per forward pass.", rich_help_panel=HARDWARE)]
Backend = Annotated[
    str, typer.Option(help="Exact search: torch or faiss (IndexFlatIP).", rich_help_panel=SEARCH)
]
Force = Annotated[bool, typer.Option(help="Rebuild cached embedding indexes.", rich_help_panel=OUTPUT)]
TRAINED = "the data the model was trained on"


# The model and the data that the retrieval commands read (cli.common.with_options)
INPUTS = {"model": (Model, REQUIRED), "data": (Data, None)}
# How `index`, `evaluate` and `plot` embed a split
EMBEDDING = {
    "batch_size": (BatchSize, 256),
    "device": (Device, "auto"),
    "amp": (Amp, True),
    "num_workers": (Workers, None),
    "force": (Force, False),
}
RESULTS = ("out", "name", "overwrite", "show", "quiet")


def _data_for(data: Path | None, meta: dict) -> Path:
    if data is not None:
        return data
    trained = Path((meta.get("dataset") or {}).get("path", ""))
    if not trained.is_file():
        raise UserError(
            f"the model's training data {trained} is not here; pass --data PATH to a BIOSCAN HDF5 file"
        )
    return trained


def _load(model: Path, device: str):
    from core.device import resolve_device
    from models.retrieval import load_retrieval_model

    dev = resolve_device(device)
    net, meta, model_hash = load_retrieval_model(model, str(dev))
    return net, meta, model_hash, dev


@app.command("export-world")
def export_world_command(
    out: Annotated[Path, typer.Option(help="HDF5 file to write.", rich_help_panel=OUTPUT)],
    world: WorldPreset = None,
    data_dir: DataDir = None,
    unseen_fraction: Annotated[
        float, typer.Option(help="Share of species held out as unseen.", rich_help_panel=DATA)
    ] = 0.25,  # fmt: skip
    seed: Annotated[int, typer.Option(help="Seed of the seen/unseen partition.", rich_help_panel=DATA)] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write the synthetic world as a BIOSCAN HDF5 file with the seen/unseen partition (all_keys included)."""
    from datasets.bioscan.export import export_world, is_world_export
    from datasets.registry import ensure_world_root

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name an .h5 file")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or another --out")
    if out.exists() and not is_world_export(out):
        raise UserError(
            f"--overwrite refused: {out} is not a file `retrieve export-world` wrote; choose another --out"
        )
    root = ensure_world_root(world or "default", data_dir, quiet=quiet)
    export_world(root, out, unseen_fraction, seed)
    typer.echo(f"wrote {out} (world {root.parent.name})")


@app.command("index")
@with_options(*EMBEDDING, "overwrite", "quiet", table=EMBEDDING)
def index_command(
    o: SimpleNamespace,
    model: Model,
    data: Data = None,
    split: Annotated[
        str, typer.Option(help="Group of the HDF5 file to index.", rich_help_panel=DATA)
    ] = "all_keys",
    modalities: Annotated[
        str | None,
        typer.Option(help="Comma-separated (default: every modality of the model).", rich_help_panel=DATA),
    ] = None,  # fmt: skip
    dtype: Annotated[
        str,
        typer.Option(
            help="float32 (as the reference evaluates) or float16 (half the memory).", rich_help_panel=SEARCH
        ),
    ] = "float32",  # fmt: skip
    out: Annotated[
        Path | None,
        typer.Option(help="Also copy the index to this folder (e.g. for a laptop).", rich_help_panel=OUTPUT),
    ] = None,  # fmt: skip
) -> None:
    """Embed a split once for all modalities into a cached, memory-mappable index."""
    from testing.retrieval.store import build_index, export_index

    net, meta, model_hash, dev = _load(model, o.device)
    chosen = [m.strip() for m in modalities.split(",")] if modalities else list(net.spec.modalities)
    unknown = [m for m in chosen if m not in net.spec.modalities]
    if unknown:
        raise UserError(f"--modalities: the model has {', '.join(net.spec.modalities)}, not {unknown[0]}")
    if o.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {o.batch_size}")
    if out is not None and out.exists() and not o.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or another --out")
    index, built = build_index(net, model_hash, model, _data_for(data, meta), split, chosen, dev, o.batch_size,
                               o.num_workers, o.amp, force=o.force, quiet=o.quiet, dtype=dtype)  # fmt: skip
    manifest = index.manifest
    how = f"built at {manifest['records_per_s']} records/s" if built else "cached"
    typer.echo(f"index of {len(index)} {split} records ({', '.join(index.modalities)}, {manifest['dim']}-d "
               f"{manifest['dtype']}), {how}: {index.folder}")  # fmt: skip
    if out is not None:
        typer.echo(f"copied to {export_index(index, out, o.overwrite)}")


@app.command("query")
def query_command(
    model: Model,
    image: Annotated[
        list[Path] | None, typer.Option(help="Image file to identify (repeatable).", rich_help_panel=DATA)
    ] = None,  # fmt: skip
    dna: Annotated[
        list[str] | None, typer.Option(help="DNA barcode to identify (repeatable).", rich_help_panel=DATA)
    ] = None,  # fmt: skip
    fasta: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="FASTA file of barcodes.", rich_help_panel=DATA),
    ] = None,  # fmt: skip
    text: Annotated[
        list[str] | None,
        typer.Option(
            help="Taxon name to search by (repeatable): 'order family genus species' or "
            "'order;family;genus;species' (zero-shot: against image or DNA keys).",
            rich_help_panel=DATA,
        ),
    ] = None,  # fmt: skip
    text_vocab: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="BERT-small's vocab.txt, for --text with a CLIBD model.",
            rich_help_panel=DATA,
        ),
    ] = None,  # fmt: skip
    dna_unknown: Annotated[
        str, typer.Option(help="Characters outside ACGTN-: error, or n (read as N).", rich_help_panel=DATA)
    ] = "error",  # fmt: skip
    skip_bad_images: Annotated[
        bool,
        typer.Option(help="Report unreadable images on stderr and answer the rest.", rich_help_panel=DATA),
    ] = False,  # fmt: skip
    index: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Index folder (`retrieve index --out`). Default: the cached index of --data's all_keys.",
            rich_help_panel=SEARCH,
        ),
    ] = None,  # fmt: skip
    data: Data = None,
    keys: Annotated[
        str, typer.Option(help="Key modality: dna, image or text.", rich_help_panel=SEARCH)
    ] = "dna",
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours to list.", rich_help_panel=SEARCH)] = 5,
    min_sim: Annotated[
        float | None,
        typer.Option(
            help="Flag 'possibly novel' below this best cosine (default: the "
            "threshold calibrated by `retrieve evaluate --on val`).",
            rich_help_panel=SEARCH,
        ),
    ] = None,  # fmt: skip
    backend: Backend = "torch",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables.", rich_help_panel=OUTPUT)
    ] = False,
    device: Device = "auto",
) -> None:
    """Identify specimens from photos, DNA barcodes or taxon names: nearest keys, per-rank prediction, novelty."""
    from datasets.bioscan.dna import clean_dna, iter_fasta
    from testing.retrieval.query import check_image_files, check_min_sim, parse_taxon, run_query
    from testing.retrieval.store import EmbeddingIndex, build_index

    check_min_sim(min_sim)
    sequences = [
        (f"dna{i + 1}", clean_dna(s, dna_unknown, source=f"--dna #{i + 1}")) for i, s in enumerate(dna or [])
    ]
    records = 0
    if fasta is not None:  # checked in a first pass, read again while answering: memory holds one batch
        records = sum(1 for _ in iter_fasta(fasta, dna_unknown))
    texts = list(text or [])
    for item in texts:
        parse_taxon(item)
    images = check_image_files(image or [])
    if not images and not sequences and not records and not texts:
        raise UserError("nothing to query: pass --image FILE, --dna SEQUENCE, --fasta FILE or --text NAME")
    net, meta, model_hash, dev = _load(model, device)
    if index is not None:
        store = EmbeddingIndex.load(index)
        store.check_model(model_hash, model)
    else:
        store, _ = build_index(  # quiet with --json: stdout holds the JSON alone
            net, model_hash, model, _data_for(data, meta), "all_keys", net.spec.modalities, dev, quiet=as_json
        )
    if keys not in store.modalities:
        raise UserError(f"--keys {keys}: the index holds {', '.join(store.modalities)} keys")
    for flag, modality, given in (("--image", "image", images), ("--dna", "dna", sequences or records),
                                  ("--text", "text", texts)):  # fmt: skip
        if given and modality not in net.spec.modalities:
            raise UserError(f"{flag}: this model has no {modality} encoder")
    barcodes = itertools.chain(sequences, iter_fasta(fasta, dna_unknown) if fasta is not None else ())

    def skipped(path, message: str) -> None:
        typer.echo(f"skipped: {message}", err=True)

    if texts and net.spec.text_arch == "bert" and text_vocab is None:
        raise UserError("--text with a CLIBD model needs --text-vocab: BERT-small's vocab.txt")
    results = run_query(net, store, images, barcodes, keys, k, min_sim, dev, backend, texts, skip_bad_images,
                        skipped, text_vocab)  # fmt: skip
    if not as_json:
        _print_results(results)
        return
    typer.echo("[")
    for i, result in enumerate(results):  # one answer at a time: a FASTA of any size streams through
        typer.echo(("," if i else "") + json.dumps(result, indent=2))
    typer.echo("]")


def _print_results(results) -> None:
    from rich.console import Console
    from rich.table import Table

    from datasets.bioscan.taxonomy import RANKS

    console = Console()
    for result in results:
        flag = result["novel"]
        note = "" if flag is None else (" [bold red]possibly novel species[/]" if flag else " known species")
        threshold = "" if result["threshold"] is None else f" (threshold {result['threshold']:.3f})"
        table = Table(title=f"{result['modality']} query {result['query']} -> {result['keys']} keys: best cosine "
                      f"{result['best_score']:.3f}{threshold}{note}", title_justify="left")  # fmt: skip
        for column in ("#", "cosine", "id", *RANKS):
            numeric = column in ("#", "cosine")
            table.add_column(column, justify="right" if numeric else "left", overflow="fold")
        for i, n in enumerate(result["neighbours"], 1):
            table.add_row(str(i), f"{n['score']:.3f}", n["id"], *(n[r] for r in RANKS))
        console.print(table)
        guess = ", ".join(f"{r} {p['label']} ({p['support']:.0%})" for r, p in result["prediction"].items())
        console.print(f"prediction: {guess}\n")


@app.command("evaluate")
@with_options(
    *EMBEDDING, *RESULTS, table={**INPUTS, **EMBEDDING},
    helps={"model": "Retrieval weights (.safetensors, a `train retrieval` run directory, or a CLIBD .pth); or "
           "pass --features."},
)  # fmt: skip
def evaluate_command(
    o: SimpleNamespace,
    model: Shared = None,
    features: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Pre-extracted features instead of a model: CLIBD's "
            "extracted_feature_from_{val,test}_split.hdf5 (with --labels).",
            rich_help_panel=DATA,
        ),
    ] = None,  # fmt: skip
    labels: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="The features' labels_{val,test}.json.", rich_help_panel=DATA
        ),
    ] = None,  # fmt: skip
    data: Data = None,
    on: Annotated[
        str,
        typer.Option(
            help="Query splits: val (also calibrates the novelty flag) or test.", rich_help_panel=DATA
        ),
    ] = "val",  # fmt: skip
    pairs: Annotated[
        str | None,
        typer.Option(
            help="QUERY:KEY pairs, comma-separated (default: image:image, "
            "dna:dna, image:dna and image:text when trained).",
            rich_help_panel=SEARCH,
        ),
    ] = None,  # fmt: skip
    key_split: Annotated[
        str, typer.Option(help="Group holding the keys.", rich_help_panel=DATA)
    ] = "all_keys",
    heldout: Annotated[
        str | None,
        typer.Option(
            help="Also query this group of species in neither set (BIOSCAN-5M: other_heldout): its "
            "accuracy and how often the novelty flag rises on it.",
            rich_help_panel=DATA,
        ),
    ] = None,  # fmt: skip
    backend: Backend = "torch",
) -> None:
    """The BIOSCAN protocol: micro/macro top-1/3/5 per rank, seen/unseen/H.M., novelty AUROC; table, CSV, figure."""
    from testing.retrieval.evaluate import run_evaluate

    run_dir = run_dir_for("retrieve-evaluate", o.out, o.name)
    if features is not None or labels is not None:
        from testing.retrieval.features import run_evaluate_features

        if model is not None or data is not None:
            raise UserError("--features evaluates embeddings extracted before: leave out --model and --data")
        if features is None or labels is None:
            raise UserError(
                "--features and --labels go together (CLIBD writes labels_{val,test}.json beside them)"
            )
        summary = run_evaluate_features(features, labels, run_dir, pairs, backend, o.show, o.overwrite)
        _print_table(summary)
        typer.echo(f"results: {run_dir}")
        return
    if model is None:
        raise UserError("pass --model (weights or a run directory) or --features with --labels")
    _, meta, _, _ = _load(model, "cpu")
    summary = run_evaluate(model, _data_for(data, meta), run_dir, on, pairs, key_split, o.batch_size, o.device,
                           o.num_workers, o.amp, backend, o.force, o.show, o.quiet, o.overwrite, heldout)  # fmt: skip
    _print_table(summary)
    typer.echo(f"results: {run_dir}")


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from datasets.bioscan.taxonomy import RANKS

    frame = summary["table"]
    top1 = frame[(frame["k"] == 1) & (frame["metric"] != "chance")]
    top1 = top1.sort_values(["query", "key", "metric"], ascending=[True, True, False])  # micro, then macro
    queries = ", ".join(f"{n} {split}" for split, n in summary["queries"].items() if "heldout" not in split)
    table = Table(title=f"top-1 accuracy (%): {queries} queries against {summary['keys']} keys")
    for column in ("query>key", "metric", "split", *RANKS):
        table.add_column(column, justify="right" if column in RANKS else "left", no_wrap=True)
    for _, row in top1.iterrows():
        for kind, label in (("seen", "seen"), ("unseen", "unseen"), ("hm", "H.M.")):
            first = kind == "seen"
            table.add_row(f"{row['query']}>{row['key']}" if first else "", row["metric"] if first else "", label,
                          *(f"{100 * row[f'{r}_{kind}']:.1f}" for r in RANKS), end_section=kind == "hm")  # fmt: skip
    Console().print(table)
    for pair, result in summary["novelty"].items():
        line = f"novelty flag {pair}: AUROC {result['auroc']:.3f} (best cosine, seen vs unseen queries)"
        if "threshold" in result:
            line += f"; calibrated threshold {result['threshold']:.3f}"
        if "threshold_from_val" in result:
            line += (f"; at the val threshold {result['threshold_from_val']:.3f} it flags {result['tpr']:.0%} of "
                     f"unseen and {result['fpr']:.0%} of seen queries")  # fmt: skip
        other = result.get("heldout")
        if other:
            line += f"; {other['split']} ({other['n']} queries): AUROC {other['auroc']:.3f} against seen"
            if "flagged" in other:
                line += f", {other['flagged']:.0%} flagged"
        typer.echo(line)


@app.command("plot")
@with_options(*EMBEDDING, *RESULTS, table=EMBEDDING)
def plot_command(
    o: SimpleNamespace,
    model: Model,
    data: Data = None,
    split: Annotated[str, typer.Option(help="Group to embed.", rich_help_panel=DATA)] = "all_keys",
    rank: Annotated[
        str, typer.Option(help="Colour by order, family, genus or species.", rich_help_panel=DATA)
    ] = "genus",
    projection: Annotated[
        str,
        typer.Option(
            help="pca, or umap (CLIBD's: cosine, min_dist 0.5; needs umap-learn).", rich_help_panel=OUTPUT
        ),
    ] = "pca",  # fmt: skip
) -> None:
    """2-D projection (PCA or UMAP, fitted jointly) of a split's image and DNA embeddings, coloured by a rank."""
    import numpy as np

    from core.rundir import mark_run
    from datasets.bioscan.hdf5 import check_split
    from datasets.bioscan.taxonomy import RANKS
    from testing.retrieval.plots import check_projection, plot_projection
    from testing.retrieval.store import build_index

    if rank not in RANKS:
        raise UserError(f"--rank must be one of {', '.join(RANKS)}, got {rank!r}")
    check_projection(projection)
    net, meta, model_hash, dev = _load(model, o.device)
    source = _data_for(data, meta)
    modalities = [m for m in ("image", "dna") if m in net.spec.modalities]
    check_split(source, split, tuple(modalities))
    config = {"model": str(model), "model_hash": model_hash, "data": str(source), "split": split, "rank": rank,
              "projection": projection}  # fmt: skip
    run_dir = results_dir("retrieve plot", o, [model, source], config)
    index, _ = build_index(net, model_hash, model, source, split, modalities, dev, o.batch_size, o.num_workers,
                           o.amp, force=o.force, quiet=o.quiet)  # fmt: skip
    embeddings = {m: np.asarray(index.keys(m), dtype=np.float32) for m in modalities}
    path = plot_projection(embeddings, index.labels[rank], rank, run_dir / f"projection_{split}_{rank}.png",
                           f"{', '.join(modalities)} embeddings of {split} ({len(index)} records)", show=o.show,
                           method=projection)  # fmt: skip
    mark_run(run_dir, status="finished")
    typer.echo(f"figure: {path}")


# Settings a resumed run may change besides the hardware and log cadence (not epochs: the OneCycle schedule is
# laid out over the whole run); everything else must match.
RESUMABLE = {"eval_batch_size"}


@training_command(
    "train retrieval",
    data=("world", "data_dir"),
    table=INPUTS,
    helps={
        "data": "BIOSCAN HDF5 file (default: the synthetic world in that layout).",
        "preset": "Recipe from training/presets/retrieval.yaml: tiny, bioscan-1m, bioscan-5m.",
        "weights": "Image tower: imagenet, none or PATH.",
        "batch_size": "Records per step per process.",
        "lr": "OneCycle peak learning rate.",
        "weight_decay": "AdamW weight decay.",
        "eval_every": "Steps between validations (0: every epoch).",
    },
)
def train_retrieval_command(
    options: TrainOptions,
    preset: Shared = "tiny",
    data: Shared = None,
    modalities: Annotated[
        str | None, typer.Option(help="image,dna or image,dna,text.", rich_help_panel=MODEL)
    ] = None,
    image_arch: Annotated[
        str | None, typer.Option(help="tiny, resnet18/34/50 or vit_b_16.", rich_help_panel=MODEL)
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side in pixels.", rich_help_panel=MODEL)
    ] = None,
    weights: Shared = None,
    dna_weights: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="BarcodeBERT checkpoint (v1 .pth, v2 .pt/.pth, .safetensors): its tokenisation and size are used.",
            rich_help_panel=MODEL,
        ),
    ] = None,  # fmt: skip
    dna_k: Annotated[
        int | None,
        typer.Option(
            help="k-mer size (default: the --dna-weights checkpoint's, else 5).", rich_help_panel=MODEL
        ),
    ] = None,  # fmt: skip
    dna_stride: Annotated[
        int | None,
        typer.Option(help="k-mer stride (default: the checkpoint's, else k).", rich_help_panel=MODEL),
    ] = None,  # fmt: skip
    dna_max_len: Annotated[
        int | None,
        typer.Option(
            help="Barcode length padded or cut to (default: the checkpoint's, else 660).",
            rich_help_panel=MODEL,
        ),
    ] = None,  # fmt: skip
    embed_dim: Annotated[int | None, typer.Option(help="Embedding dimension.", rich_help_panel=MODEL)] = None,
    batch_size: Shared = None,
    epochs: Annotated[
        float | None, typer.Option(help="Training epochs (fractions allowed).", rich_help_panel=OPTIM)
    ] = None,
    lr: Shared = None,
    weight_decay: Shared = None,
    eval_every: Shared = None,
) -> None:
    """Train the image-DNA(-taxonomy) retrieval model contrastively (best/last, log.jsonl, resume, DDP)."""
    from training.retrieval import RetrievalConfig, train_retrieval

    if preset.startswith("bioscan") and data is None and not options.resume:
        raise UserError(f"--preset {preset} trains on BIOSCAN: pass --data PATH to its HDF5 file")
    settings = dict(
        data=data, modalities=[m.strip() for m in modalities.split(",")] if modalities else None,
        image_arch=image_arch, image_size=image_size, weights=weights, dna_weights=dna_weights, dna_k=dna_k,
        dna_stride=dna_stride, dna_max_len=dna_max_len, embed_dim=embed_dim, batch_size=batch_size, epochs=epochs,
        lr=lr, weight_decay=weight_decay, eval_every=eval_every,
    )  # fmt: skip
    cfg, run_dir, summary = options.train(
        RetrievalConfig, preset, settings, RESUMABLE, train_retrieval,
        inputs=lambda cfg: [cfg.data, cfg.dna_weights],
    )  # fmt: skip
    if summary is not None:
        best = summary["best"]
        typer.echo(
            f"best val {cfg.selection} top-1 {best['score']:.4f} at step {best['step']}; run: {run_dir}"
        )
        typer.echo(f"weights: {run_dir / 'best.safetensors'}")
