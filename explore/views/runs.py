"""Runs: the training and validation curves of run directories (also of runs still training, refreshed as
their logs grow), several runs overlaid, one panel per quantity with `logs`' y-axis labels and its summary
table. The numbers are `logs`': `read_log` -> `long_table` (what is plotted, bookkeeping dropped) ->
`summarize` (last and best values)."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from explore.views import Request, View, finite, integer

MAX_RUNS = 12  # overlaid at once


class RunsView(View):
    kind = "runs"

    @property
    def title(self) -> str:
        return f"runs: {self.source.name}"

    def describe(self) -> dict:
        return {**super().describe(), "runs": self.listing(), "max_runs": MAX_RUNS}

    def actions(self) -> dict:
        return {"list": ("GET", lambda request: {"runs": self.listing()}), "curves": ("GET", self.curves)}

    def run_dirs(self) -> list[Path]:
        """Found again on every call: runs started after the page opened appear too."""
        from explore.sources import find_runs

        found = find_runs(self.source.path)
        return found or self.source.runs

    def listing(self) -> list[dict]:
        from core.rundir import read_run_info

        rows = []
        for i, run in enumerate(self.run_dirs()):
            try:
                info = read_run_info(run)
            except UserError:
                info = {}
            name = str(run.relative_to(self.source.path)) if run != self.source.path else run.name
            rows.append({"id": i, "name": name, "path": str(run), "status": info.get("status", "unknown"),
                         "command": info.get("command", ""), "signature": signature(run)})  # fmt: skip
        return rows

    def curves(self, request: Request) -> dict:
        """`?runs=0,2` -> per panel the series of each run (metric, split, steps, values) and the summary rows;
        `&since=SIG` answers `{"unchanged": true}` while no chosen log changed."""
        runs = self.run_dirs()
        text = request.params.get("runs", "")
        chosen = [integer(part, "run", 0, len(runs) - 1) for part in text.split(",") if part.strip()]
        if len(chosen) > MAX_RUNS:
            raise UserError(f"overlay at most {MAX_RUNS} runs at once, got {len(chosen)}")
        signatures = "|".join(signature(runs[i]) for i in chosen)
        if request.params.get("since") == signatures:
            return {"unchanged": True, "signature": signatures}
        panels: dict[str, dict] = {}
        summary, problems = [], []
        for i in chosen:
            name = str(runs[i].relative_to(self.source.path)) if runs[i] != self.source.path else runs[i].name
            try:
                table, rows = run_curves(runs[i])
            except UserError as error:
                problems.append({"run": i, "name": name, "error": error.message})
                continue
            for (panel, metric, split), group in table.groupby(["panel", "metric", "split"], sort=False):
                entry = panels.setdefault(panel, {"panel": panel, "series": []})
                entry["series"].append({"run": i, "name": name, "metric": metric, "split": split,
                                        "x": group["step"].astype(int).tolist(),
                                        "y": [finite(v, 7) for v in group["value"]]})  # fmt: skip
            summary += [{"run": i, "name": name, **{k: (finite(v, 7) if isinstance(v, float) else v)
                                                    for k, v in row.items()}} for row in rows]  # fmt: skip
        from testing.runlogs import y_label

        ordered = [{**p, "ylabel": y_label(p["panel"])} for p in panels.values()]
        return {"signature": signatures, "panels": ordered, "summary": summary, "problems": problems}


def signature(run: Path) -> str:
    """Changes whenever the run's log grows (size and modification time)."""
    try:
        stat = (run / "log.jsonl").stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def run_curves(run: Path):
    """(`logs`' long table of the run, its summary rows as dicts)."""
    from core.runlog import read_log
    from testing.runlogs import long_table, summarize

    table = long_table(read_log(run))
    return table, summarize(table).to_dict("records")
