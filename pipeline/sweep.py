"""Seeds and sweeps as one command: a grid of training overrides, one run each, one table.

    python -m pipeline.sweep [train config.yaml] encoder=gru,lstm seed=0,1,2 [key=value ...]
    python -m pipeline.sweep experiment=mtl_gru,va_only seed=0,1,2 epochs=20

Every ``key=a,b,c`` (commas outside brackets, so ``extractors=[onet,iresnet18]`` is one value) is
an axis, and the runs are every combination of the axes. Each run is ``python -m pipeline.train``
with its overrides, in a process of its own and in the folder its settings name, so a sweep skips
the runs it finished before and resumes the one it was stopped in. Every run's config is resolved
and checked before the first one starts. The table gives, for each setting (the values of every
axis but ``seed``), the mean and the sample standard deviation over its seeds of CCC-V, CCC-A,
F1-EXPR, F1-AU and P_MTL; it is printed and written to ``<runs_dir>/<data>/sweeps/<hash>.md`` and
``.json`` (with every run's folder and scores). Exit status 1 if any run failed; the others still
ran.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json, write_text
from pipeline.cli import Program, expand, split_values
from pipeline.config import Config, ConfigError, InputError, check_choices, load_config
from pipeline.identity import run_dir, run_folder, run_identity, run_link
from pipeline.launch import train_process
from pipeline.metrics import columns, markdown_table, summarise
from pipeline.runs import finished, link_newest
from pipeline.splits import open_features
from pipeline.training import CHOICES
from pipeline.validation import report_finished

log = logging.getLogger("pipeline")

SCORES = columns("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl")


class Sweep:
    """The resolved runs of one sweep: ``runs`` lists (overrides, config) in grid order."""

    def __init__(self, path: str | None, overrides: list[str]) -> None:
        self.path = path
        self.overrides = overrides
        self.axes = [item.split("=", 1)[0] for item in overrides if len(split_values(item.split("=", 1)[1])) > 1]
        self.runs: list[tuple[list[str], Config]] = []
        for run in expand(overrides):
            try:
                cfg = load_config("train", path, run)
                check_choices(cfg, CHOICES)
            except ConfigError as e:
                raise ConfigError(f"{' '.join(run)}: {e}") from None
            self.runs.append((run, cfg))

    @property
    def configs(self) -> list[Config]:
        """Each run's resolved config, in grid order."""
        return [cfg for _, cfg in self.runs]

    def setting(self, run: list[str]) -> str:
        """The run's values of every axis but the seed: its row in the table."""
        chosen = [item for item in run if item.split("=", 1)[0] in self.axes and not item.startswith("seed=")]
        return " ".join(chosen) or "(one setting)"

    def name(self) -> str:
        data = {cfg.data.name for _, cfg in self.runs}
        return f"{'+'.join(sorted(data))}/sweeps/{Config({'path': self.path, 'runs': self.overrides}).hash()[:8]}"


def with_data_sets(results: list[dict]) -> list[dict]:
    """The results, each followed by one per data set it pooled (its own scores, setting
    ``<setting> · <data set>``), so that every table has a row per data set."""
    out = []
    for r in results:
        out.append(r)
        for name, own in ((r["scores"] or {}).get("data") or {}).items():
            out.append({**r, "setting": f"{r['setting']} · {name}", "scores": own})
    return out


def summary_rows(results: list[dict]) -> list[dict]:
    """Per setting (and per data set of a run that pools several), in order of first appearance:
    the seeds and, per score, mean, std and values."""
    rows: dict[str, dict] = {}
    for r in with_data_sets(results):
        row = rows.setdefault(r["setting"], {"setting": r["setting"], "seeds": [], "failed": 0})
        if r["scores"] is None:
            row["failed"] += 1
            continue
        row["seeds"].append(r["seed"])
        for _, key in SCORES:
            value = r["scores"].get(key)
            value = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
            row.setdefault(key, []).append(value)
    for row in rows.values():
        for _, key in SCORES:
            row[key] = {**summarise(row.get(key, [])), "per_seed": row.get(key, [])}
    return list(rows.values())


def format_summary(rows: list[dict], label: str = "setting") -> str:
    """The table of :func:`summary_rows`: one row per setting (headed ``label``), mean ± std per score."""
    def cell(s: dict) -> str:
        return "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"

    return markdown_table(
        [label, "seeds", *(h for h, _ in SCORES)],
        [[r["setting"], f"{len(r['seeds'])}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
          *(cell(r[k]) for _, k in SCORES)] for r in rows])


def folder_of(cfg: Config) -> tuple[Path | None, bool]:
    """The folder of ``cfg``'s run (None when its features cannot be read: its process will say
    why) and whether the run finished there before, in which case it is relinked as the newest of
    its name, as training does."""
    try:
        identity = run_identity(cfg, open_features(cfg))
    except InputError:
        return None, False
    out = run_dir(cfg, identity)
    done = finished(out, identity)
    if done and run_link(cfg) is not None:
        link_newest(out, run_link(cfg))
    return out, done


def train_or_reuse(path: str | None, run: list[str], cfg: Config) -> tuple[int, Path | None, dict | None]:
    """Train the run of ``cfg`` (``run``: its overrides of ``path``) in a process of its own, or
    reuse it where it finished before: its exit status, folder and scores (None when it failed)."""
    out, done = folder_of(cfg)
    if done:  # as the run itself would say, without starting a process for it
        report_finished(out)
        status = 0
    else:
        status = train_process(path, run)  # a run that fails, fails alone; the caller goes on
        out = (out or run_folder(cfg)) if status == 0 else None
    scores = json.loads((out / "scores.json").read_text()) if out is not None else None
    if status:
        log.error("run %s failed with exit status %d", " ".join(run), status)
    return status, out, scores


def run_all(sweep: Sweep) -> list[dict[str, Any]]:
    """Train (or find finished) every run of ``sweep``, one process each; per run its overrides,
    setting, seed, exit status, folder and scores (None for a run that failed)."""
    results: list[dict[str, Any]] = []
    for i, (run, cfg) in enumerate(sweep.runs, start=1):
        log.info("sweep run %d/%d: %s", i, len(sweep.runs), " ".join(run))
        status, out, scores = train_or_reuse(sweep.path, run, cfg)
        results.append({"overrides": run, "setting": sweep.setting(run), "seed": cfg.seed, "status": status,
                        "folder": str(out) if out else None, "scores": scores})
    return results


def main(sweep: Sweep) -> int:
    results = run_all(sweep)
    rows = summary_rows(results)
    table = format_summary(rows)
    where = Path(sweep.runs[0][1].runs_dir) / sweep.name()
    write_text(where.with_suffix(".md"), table + "\n")
    write_json(where.with_suffix(".json"), {"config": sweep.path, "overrides": sweep.overrides,
                                            "summary": rows, "runs": results})
    failed = [r for r in results if r["status"] != 0]
    print(f"\nSweep over {len(results)} runs ({len(failed)} failed); mean ± std over seeds\n")
    print(table)
    print(f"\nwritten to {where.with_suffix('.md')} and .json")
    return 1 if failed else 0


PROGRAM = Program("sweep", main, configure=lambda command: Sweep(command.config, command.overrides))


def cli() -> None:
    """The ``affect-sweep`` command, the same as ``python -m pipeline.sweep``."""
    PROGRAM.run()


if __name__ == "__main__":
    cli()
