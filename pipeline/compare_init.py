"""Uni- versus multi-task, and a multi-task model started from the uni-task runs, in one table.

    python -m pipeline.compare_init [configs/compare_init.yaml] [key=value ...]
    python -m pipeline.compare_init data=sample seeds=[0,1,2] epochs=5

For each seed, with the same training keys (``train`` of ``configs/compare_init.yaml``, then every
``key=value`` of the command line that is not one of that file's keys): the three uni-task runs
(the experiments ``va_only``, ``expr_only``, ``au_only``), the multi-task run (``mtl``), the
multi-task run started from that seed's uni-task runs (``mtl_from_uni``: the encoder and the
``encoder_from`` task's branch and head from that task's run, each other task's branch and head from
its own run, ``init_frozen`` of them kept frozen), and the ensemble of the three uni-task runs
(:mod:`pipeline.ensemble`; each task's outputs are its own run's). With ``selection: per_task``
each task is scored at its own best epoch, and each task's part comes from its own best weights.

Each run is ``python -m pipeline.train`` in a process of its own and its run folder, so runs that
finished before are reused (:func:`pipeline.sweep.train_or_reuse`). The table gives, per variant,
the mean and sample standard deviation over the seeds of CCC-V, CCC-A, F1-EXPR, F1-AU and P_MTL;
it is printed and written to ``<runs_dir>/<data>/comparisons/init-<hash>.md`` and ``.json`` (with
every run's folder and scores). Exit status 1 if any run failed; the others still ran.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from models.abaw import TASKS
from pipeline import ensemble, initialise, sweep
from pipeline.atomic import write_json, write_text
from pipeline.cli import Program
from pipeline.config import Config, ConfigError, InputError, check_choices, config_file, load_config, read_yaml
from pipeline.training import CHOICES as TRAIN_CHOICES

log = logging.getLogger("pipeline")

CHOICES = {"encoder_from": TASKS, "init_frozen": initialise.PARTS}
UNI = {"va": "va_only", "expr": "expr_only", "au": "au_only"}  # each task's uni-task experiment
ROWS = {**{t: f"{t} alone" for t in TASKS}, "mtl": "multi-task", "mtl_from_uni": "multi-task from uni-task",
        "ensemble": "ensemble of uni-task"}


class Comparison:
    """The resolved comparison of a command line: its own config (``configs/compare_init.yaml``),
    the training overrides of every run, and each plain run's config, checked before any starts."""

    def __init__(self, path: str | None, overrides: list[str]) -> None:
        own = set(read_yaml(config_file("compare_init.yaml")))
        mine = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in own]
        self.path = path
        self.cfg = load_config("compare_init", path, mine)
        check_choices(self.cfg, CHOICES)
        seeds = self.cfg.seeds
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"config key 'seeds' = {seeds!r}: give a non-empty list of integers")
        self.train = [*self.cfg.train, *(o for o in overrides if o not in mine)]
        self.runs: list[tuple[str, int, list[str], Config]] = []  # (variant, seed, overrides, config)
        for seed in seeds:
            for task in TASKS:
                self.runs.append(self._resolved(task, seed, [f"experiment={UNI[task]}"]))
            self.runs.append(self._resolved("mtl", seed, ["name=mtl"]))
        started = self._resolved("mtl_from_uni", seeds[0], self.started({t: Path(t) for t in TASKS}))
        initialise.plan(started[3])  # the init keys hold together (their sources are read when it runs)

    def _resolved(self, variant: str, seed: int, chosen: list[str]) -> tuple[str, int, list[str], Config]:
        run = [*chosen, *self.train, f"seed={seed}"]
        try:
            cfg = load_config("train", None, run)
            check_choices(cfg, TRAIN_CHOICES)
        except ConfigError as e:
            raise ConfigError(f"{' '.join(run)}: {e}") from None
        if variant == "mtl" and list(cfg.model.tasks) != list(TASKS):
            raise ConfigError(f"the multi-task run trains {', '.join(TASKS)}; model.tasks={list(cfg.model.tasks)}")
        if cfg.selection != "per_task":
            log.warning("selection=%s: each task is not scored at its own best epoch", cfg.selection)
        return variant, seed, run, cfg

    def started(self, folders: dict[str, Path]) -> list[str]:
        """The overrides of the multi-task run started from the uni-task runs in ``folders``."""
        first = self.cfg.encoder_from
        frozen = ",".join(self.cfg.init_frozen)
        return ["name=mtl_from_uni", f"init_from={folders[first]}", f"init_parts=[encoder,{first}]",
                *(f"init_sources.{t}={folders[t]}" for t in TASKS if t != first), f"init_frozen=[{frozen}]"]

    @property
    def configs(self) -> list[Config]:
        """The plain runs' configs (what ``--show`` prints and Make reads the extractors from)."""
        return [cfg for *_, cfg in self.runs]

    def name(self) -> str:
        data = self.configs[0].data.name
        return f"{data}/comparisons/init-{Config({'path': self.path, 'cfg': self.cfg, 'train': self.train}).hash()[:8]}"


def result(variant: str, seed: int, run: list[str], status: int, out: Path | None, scores: dict | None) -> dict:
    return {"variant": variant, "setting": ROWS[variant], "seed": seed, "overrides": run, "status": status,
            "folder": str(out) if out else None, "scores": scores}


def average(folders: list[Path], device: str) -> tuple[int, Path | None, dict | None]:
    """The ensemble of the uni-task runs in ``folders``: its status, folder and scores."""
    try:
        status = ensemble.main(Config({"runs": [str(f) for f in folders], "device": device}))
        out = ensemble.resolve(folders)[2]
    except InputError as e:
        log.error("the ensemble of %s failed: %s", ", ".join(map(str, folders)), e)
        return 1, None, None
    return status, out, json.loads((out / "scores.json").read_text()) if status == 0 else None


def main(comparison: Comparison) -> int:
    results: list[dict[str, Any]] = []
    plain = iter(comparison.runs)
    for seed in comparison.cfg.seeds:
        folders: dict[str, Path] = {}
        for _ in range(len(TASKS) + 1):  # the uni-task runs, then the multi-task run
            variant, _, run, cfg = next(plain)
            log.info("compare: %s, seed %d", ROWS[variant], seed)
            status, out, scores = sweep.train_or_reuse(None, run, cfg)
            results.append(result(variant, seed, run, status, out, scores))
            if variant in TASKS and out is not None:
                folders[variant] = out
        if len(folders) < len(TASKS):
            log.error("seed %d: a uni-task run failed; its started run and ensemble are left out", seed)
            results += [result(v, seed, [], 1, None, None) for v in ("mtl_from_uni", "ensemble")]
            continue
        log.info("compare: %s, seed %d", ROWS["mtl_from_uni"], seed)
        variant, _, run, cfg = comparison._resolved("mtl_from_uni", seed, comparison.started(folders))
        results.append(result(variant, seed, run, *sweep.train_or_reuse(None, run, cfg)))
        log.info("compare: %s, seed %d", ROWS["ensemble"], seed)
        results.append(result("ensemble", seed, [], *average([folders[t] for t in TASKS], cfg.device)))

    table = sweep.format_summary(sweep.summary_rows(results), label="variant")
    where = Path(comparison.configs[0].runs_dir) / comparison.name()
    write_text(where.with_suffix(".md"), table + "\n")
    write_json(where.with_suffix(".json"), {"config": comparison.cfg, "train": comparison.train,
                                            "summary": sweep.summary_rows(results), "runs": results})
    failed = [r for r in results if r["status"] != 0]
    print(f"\nUni- versus multi-task over seeds {list(comparison.cfg.seeds)} ({len(results)} results, "
          f"{len(failed)} failed); mean ± std over seeds\n")
    print(table)
    print(f"\nwritten to {where.with_suffix('.md')} and .json")
    return 1 if failed else 0


PROGRAM = Program("compare_init", main, configure=lambda command: Comparison(command.config, command.overrides))


def cli() -> None:
    """``python -m pipeline.compare_init``."""
    PROGRAM.run()


if __name__ == "__main__":
    cli()
