"""`logs`: plot the curves of a run's log.jsonl and print a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import Show


def logs(
    source: Annotated[
        Path,
        typer.Argument(exists=True, help="A run directory or its log.jsonl (also of a run still going)."),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where figures and CSVs go (default: RUN_DIR/logs).")
    ] = None,
    show: Show = False,
) -> None:
    """Plot training/validation curves of a run, save them as PNG + CSV and print a summary table."""
    from rich.console import Console
    from rich.table import Table

    from testing.runlogs import plot_run_log

    result = plot_run_log(source, out, show=show)
    table = Table(title=f"run log summary: {source}")
    for column in ("split", "metric", "points", "last", "best", "best step"):
        table.add_column(column, justify="left" if column in ("split", "metric") else "right")
    for row in result["summary"].itertuples():
        table.add_row(
            row.split, row.metric, str(row.points), f"{row.last:.5g}", f"{row.best:.5g}", str(row.best_step)
        )
    Console().print(table)
    typer.echo(f"figure: {result['figure']}  (numbers: {result['out_dir'] / 'curves.csv'})")
