"""`explore`: a local web page to see and steer what models learned (concepts, retrieval, generation, runs)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from cli.common import EVALUATION_OPTIONS, OUTPUT, DataDir, Device, Quiet, Shared, with_options
from core.errors import UserError

SERVER = "Server"
TOKEN = re.compile(r"^[A-Za-z0-9._~-]{16,128}$")


def check_server_options(host: str, port: int, token: str | None, max_upload_mb: float) -> None:
    """What needs no model: a port number, a host name, a usable token, a positive upload limit."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0 picks a free port), got {port}")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise UserError(f"--host must be a host name or address such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    if token is not None and not TOKEN.match(token):
        raise UserError("--token must be 16-128 characters of letters, digits and . _ ~ - (it goes in a URL)")
    if not max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {max_upload_mb}")


@with_options(
    table=EVALUATION_OPTIONS,
    helps={
        "dataset": "VisCoIN: dataset of the image gallery (default: the bundle's).",
        "split": "VisCoIN: split shown in the gallery (test, val, train).",
    },
)
def explore(
    sources: Annotated[
        list[Path],
        typer.Argument(
            exists=True,
            show_default=False,
            help="What to open, one tab each: a VisCoIN bundle or `train viscoin` run, a retrieval run "
            "(and/or its index folder), a Phylo-NN or CVAE run, a folder of run directories.",
        ),
    ],  # fmt: skip
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Any other than loopback needs the token printed in the URL.",
            rich_help_panel=SERVER,
        ),
    ] = "127.0.0.1",  # fmt: skip
    port: Annotated[int, typer.Option(help="Port (0: any free port).", rich_help_panel=SERVER)] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="BIOVIS_EXPLORE_TOKEN",
            rich_help_panel=SERVER,
            help="Token requests must carry (default: none on loopback, a random one on any other host).",
        ),
    ] = None,  # fmt: skip
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest upload accepted, in MiB.", rich_help_panel=SERVER)
    ] = 8.0,
    dataset: Shared = None,
    data_dir: DataDir = None,
    split: Shared = "test",
    device: Device = "auto",
    verbose: Annotated[
        bool, typer.Option(help="Log every request on the console.", rich_help_panel=OUTPUT)
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Serve a local web page: drag a concept's slider and see the image regenerated, identify specimens
    by photo or DNA, sample from a phylogeny's nodes, compare training curves. Works through `ssh -L`."""
    check_server_options(host, port, token, max_upload_mb)
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. An interactive server shares its
    # cores (training jobs, other users); with spinning threads a 32 px slider image took 180-220 ms instead of
    # 8-10 ms at the median on a busy 2-core machine (bench/bench_explore.py). An explicit setting is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from explore.app import Options, serve

    serve(Options(list(sources), host, port, token, device, dataset, data_dir, split, int(max_upload_mb * 2**20),
                  quiet, verbose))  # fmt: skip
