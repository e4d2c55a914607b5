"""A seed system reproduced: its recipe over its authors' seeds, the runs ensembled, one table
beside the validation figures its paper published.

    python -m pipeline.reproduce recipe=<name> [seeds=[...]] [training key=value ...]

``recipe`` names a recipe of ``configs/experiments/`` listed under ``published`` in
``configs/reproduce.yaml``, which gives its authors' seeds and their paper's figures; every other
``key=value`` goes to each training run (``data=affwild2_mtl``, ``epochs=2``). Each seed is one
``python -m pipeline.train`` run in the folder its settings name (a finished one is not trained
again), then the runs are averaged as ``python -m pipeline.ensemble`` averages them. The table lists
each seed, their mean ± std, the ensemble, and the published figures marked as the paper's: they
were measured on the authors' features and data, not on this run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import ensemble
from pipeline.atomic import write_json, write_text
from pipeline.cli import Command, Program
from pipeline.config import Config, ConfigError, load_config
from pipeline.metrics import columns, markdown_table, score_cell, summarise
from pipeline.sweep import Sweep, run_all

SCORES = columns("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl")


@dataclass
class Reproduction:
    """The recipe, its seeds and published figures, and the overrides of its training runs."""

    cfg: Config
    recipe: str
    seeds: list[int]
    published: dict
    training: list[str]

    @property
    def configs(self) -> list[Config]:
        return self.sweep.configs

    def __post_init__(self) -> None:
        seeds = ",".join(str(s) for s in self.seeds)
        self.sweep = Sweep(None, [f"experiment={self.recipe}", *self.training, f"seed={seeds}"])


def configure(command: Command) -> Reproduction:
    own, training = [], []
    defaults = load_config("reproduce", command.config)
    for item in command.overrides:
        (own if item.split("=", 1)[0].split(".")[0] in defaults else training).append(item)
    cfg = load_config("reproduce", command.config, own)
    if cfg.recipe not in cfg.published:
        raise ConfigError(f"recipe={cfg.recipe!r}: reproduce knows {', '.join(cfg.published)} "
                          "(configs/reproduce.yaml, published)")
    entry = cfg.published[cfg.recipe]
    seeds = [int(s) for s in (cfg.seeds or entry["seeds"])]
    if not seeds:
        raise ConfigError(f"recipe={cfg.recipe!r}: no seeds (give seeds=[...])")
    return Reproduction(cfg, cfg.recipe, seeds, dict(entry), training)


def table(results: list[dict], ensembled: dict | None, published: dict) -> str:
    """Each seed, their mean ± std, the ensemble and the paper's figures, one row each."""
    rows = []
    for r in results:
        if r["scores"] is None:
            rows.append([f"seed {r['seed']}", f"failed (exit status {r['status']})", *[""] * (len(SCORES) - 1)])
        else:
            rows.append([f"seed {r['seed']}", *(score_cell(r["scores"].get(k)) for _, k in SCORES)])
    done = [r["scores"] for r in results if r["scores"] is not None]
    if len(done) > 1:
        cells = []
        for _, key in SCORES:
            s = summarise([d.get(key) for d in done])
            cells.append("n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        rows.append([f"mean ± std of {len(done)}", *cells])
    if ensembled is not None:
        rows.append([f"ensemble of {len(done)}", *(score_cell(ensembled.get(k)) for _, k in SCORES)])
        for name, own in (ensembled.get("data") or {}).items():  # each pooled data set's own row
            rows.append([f"ensemble · {name}", *(score_cell(own.get(k)) for _, k in SCORES)])
    for label, figures in (("published (the paper's, not ours)", published.get("scores") or {}),
                           ("published baseline (the paper's)", published.get("baseline") or {})):
        if figures:
            rows.append([label, *(score_cell(figures.get(k)) if k in figures else "" for _, k in SCORES)])
    return markdown_table(["run", *(h for h, _ in SCORES)], rows)


def main(job: Reproduction) -> int:
    results = run_all(job.sweep)
    folders = [r["folder"] for r in results if r["scores"] is not None]
    ensembled = None
    if len(folders) > 1:
        if ensemble.main(Config({"runs": folders, "device": job.configs[0].device})) == 0:
            ensembled = json.loads((ensemble.resolve(folders)[2] / "scores.json").read_text())
    text = table(results, ensembled, job.published)
    first = job.sweep.configs[0]
    where = Path(first.runs_dir) / first.data.name / "reproduce" / f"{job.recipe}-{job.sweep.name().rsplit('/', 1)[-1]}"
    write_text(where.with_suffix(".md"), text + "\n")
    write_json(where.with_suffix(".json"), {"recipe": job.recipe, "seeds": job.seeds, "training": job.training,
                                            "runs": results, "ensemble": ensembled, "published": job.published})
    print(f"\n{job.recipe} over seeds {', '.join(map(str, job.seeds))} ({first.data.name}); "
          f"{job.published.get('source', '')}\n")
    print(text)
    print(f"\nwritten to {where.with_suffix('.md')} and .json")
    return 1 if any(r["status"] for r in results) else 0


PROGRAM = Program("reproduce", main, configure=configure)


def cli() -> None:
    """The ``affect-reproduce`` command, the same as ``python -m pipeline.reproduce``."""
    PROGRAM.run()


if __name__ == "__main__":
    cli()
