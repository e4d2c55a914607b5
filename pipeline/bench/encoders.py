"""Temporal encoders side by side: parameters, training and inference throughput, latency per
window and peak memory against sequence length; how much of the training loop's time the model
step takes; and validation P_MTL after the same training budget over several seeds, ranked with
its seed spread.

    python -m pipeline.bench.encoders [configs/bench.yaml] [key=value ...]

Each (encoder, length) is measured in a fresh spawned process, so one cell's allocations and
thread pools never colour another's and its peak RSS is its own. Writes ``output`` (JSON, one per
data set), ``plot`` (PNG, with the P_MTL of every data set benchmarked beside it) and prints
Markdown tables; the P_MTL runs are ordinary training runs,
``runs/<data>/train/bench_<encoder>-<hash>/``, reused when the same bench runs again.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from models import MultiTaskLoss, MultiTaskModel
from pipeline.atomic import write_json
from pipeline.bench import cpu_peak_meter, dotted_overrides, machine, synchronizer, time_call
from pipeline.cli import run_stage, setup_logging
from pipeline.config import Config, ConfigError, component_names, load_component, load_config
from pipeline.data import feature_paths
from pipeline.feature_cache import FeatureCache
from pipeline.identity import run_folder
from pipeline.launch import train_process
from pipeline.metrics import columns, markdown_table, summarise
from pipeline.precision import precision, training_dtype
from pipeline.runs import local_device

log = logging.getLogger("pipeline")

TASKS = ("va", "expr", "au")
TASK_SCORES = {key: header for header, key in columns("ccc_v", "ccc_a", "f1_expr", "f1_au")}  # P_MTL's terms
TIE_RULE = "tie: |mean paired difference| < the larger of the two encoders' seed std of P_MTL"


def encoder_spec(name: str, args: dict | None = None) -> dict:
    """``configs/encoders/<name>.yaml`` with ``name`` and the given overrides."""
    spec = load_component("encoder", name)
    unknown = sorted(set(args or {}) - set(spec))
    if unknown:
        raise ConfigError(f"encoder_args.{name}: unknown key(s) {', '.join(unknown)}; {name} has {', '.join(spec)}")
    return {**spec, **(args or {})}


def sizes(name: str, spec: dict, d_in: int) -> dict:
    """The encoder's config and parameter counts of the whole multi-task model and its encoder."""
    try:
        model = MultiTaskModel(d_in, encoder=spec, tasks=TASKS)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"encoder {name} cannot be built from {spec}: {e}") from None
    count = lambda module: sum(p.numel() for p in module.parameters())
    enc = {"config": spec, "params": count(model), "encoder_params": count(model.net.encoder)}
    log.info("%s: %.2f M parameters (%.3f M in the encoder)", name, enc["params"] / 1e6, enc["encoder_params"] / 1e6)
    return enc


def measure(
    encoder: dict,
    d_in: int,
    length: int,
    batch_size: int,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    threads: int = 0,
    seed: int = 0,
    amp: bool = True,
) -> dict:
    """Time one (encoder, length) cell; meant to run alone in a fresh process.

    Training = forward of the full multi-task model + ``MultiTaskLoss`` backward + AdamW step, on
    random inputs (batch_size, length, d_in) with random labels, in training's precision (bf16
    autocast on CUDA with ``amp``, :func:`pipeline.precision.training_dtype`); inference = forward
    under ``torch.inference_mode()`` in fp32, as validation and prediction run it, of the batch and
    of one window alone (the latency of a window as prediction meets it). The clock is read after
    the device finished the work (CUDA synchronised) and after ``warmup`` untimed calls. Peak
    memory is above the baseline taken once the model, optimiser and inputs exist:
    ``max_memory_allocated`` on CUDA, peak RSS on CPU (:func:`cpu_peak_meter`).
    Inference runs first, so the high-water mark read after it is its own; training's, read after
    it, is the larger one. Both include what the first calls initialise inside torch.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(local_device(device))
    cuda = dev.type == "cuda"
    model = MultiTaskModel(d_in, encoder=encoder, tasks=TASKS).to(dev)
    loss_fn = MultiTaskLoss().to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, length, d_in, device=dev)
    mask = torch.ones(batch_size, length, dtype=torch.bool, device=dev)
    targets = {
        "va": torch.rand(batch_size, length, 2, device=dev) * 2 - 1,
        "expr": torch.randint(0, 8, (batch_size, length), device=dev),
        "au": torch.randint(0, 2, (batch_size, length, 12), device=dev),
    }

    dtype = training_dtype(dev, amp)

    def train_step() -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x, mask)
        loss, _ = loss_fn({k: v.float() for k, v in out.items()}, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer(rows: int) -> None:
        with torch.inference_mode():
            model(x[:rows], mask[:rows])

    sync = synchronizer(dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        peak, method = (lambda: (torch.cuda.max_memory_allocated() - base) / 2**20), "CUDA max_memory_allocated"
    else:
        peak, method = cpu_peak_meter()

    model.eval()
    infer_times = time_call(lambda: infer(batch_size), warmup, repeats, sync)
    infer_mb = peak()
    window_times = time_call(lambda: infer(1), warmup, repeats, sync)
    model.train()
    train_times = time_call(train_step, warmup, repeats, sync)
    train_mb = peak()

    frames = batch_size * length
    train_s, infer_s = statistics.median(train_times), statistics.median(infer_times)
    return {
        "length": length,
        "train_seq_s": batch_size / train_s,
        "train_frames_s": frames / train_s,
        "infer_seq_s": batch_size / infer_s,
        "infer_frames_s": frames / infer_s,
        "infer_window_ms": statistics.median(window_times) * 1000,
        "train_peak_mb": train_mb,
        "infer_peak_mb": infer_mb,
        "train_times_s": train_times,
        "infer_times_s": infer_times,
        "infer_window_times_s": window_times,
        "memory": f"{method} after building the model, optimiser and inputs",
        "precision": {"train": precision(dev, dtype), "infer": precision(dev, None)},
    }


def measure_in_child(**kw) -> dict:
    """:func:`measure` in a freshly spawned process; a failure comes back as ``{"error": ...}``."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(measure, **kw).result()
    except Exception as e:  # noqa: BLE001 - one cell (say, out of memory at 4096 steps) must not stop the rest
        log.error("%s at length %d failed: %s: %s", kw["encoder"]["name"], kw["length"], type(e).__name__, e)
        return {"length": kw["length"], "error": f"{type(e).__name__}: {e}"}


def train_overrides(cfg: Config, name: str, seed: int) -> list[str]:
    """The ``pipeline.train`` overrides of ``name`` with the bench budget and one seed: an ordinary
    training run named ``bench_<encoder>``, so a repeated bench with the same settings reuses it
    and other settings get their own folder."""
    data = {k: v for k, v in cfg.data.items() if k != "name"}
    return [
        f"data={cfg.data.name}",
        f"encoder={name}",
        *dotted_overrides("data", data),
        *dotted_overrides("encoder", cfg.encoder_args.get(name, {})),
        *dotted_overrides("", {"extractors": list(cfg.extractors), **cfg.train, "seed": seed, "device": cfg.device,
                         "runs_dir": cfg.runs_dir, "name": f"bench_{name}"}),
    ]


def train_config(cfg: Config, name: str, seed: int) -> Config:
    """The resolved training config of :func:`train_overrides`."""
    return load_config("train", overrides=train_overrides(cfg, name, seed))


def train_scores(cfg: Config, name: str, seed: int, threads: int | None = None) -> dict:
    """Train ``name`` with the bench budget and one seed (``python -m pipeline.train`` in a process
    of its own, with ``threads`` torch threads); its scores.json."""
    overrides = train_overrides(cfg, name, seed)
    status = train_process(None, overrides, {"OMP_NUM_THREADS": str(threads)} if threads else None)
    out = run_folder(load_config("train", overrides=overrides))
    if status:
        raise RuntimeError(f"pipeline.train exited with status {status} for {out}")
    return json.loads((out / "scores.json").read_text())


def all_scores(cfg: Config, names: list[str]) -> dict[tuple[str, int], dict]:
    """Every (encoder, seed) run's scores.json, ``jobs`` training processes at once sharing the
    cores; a failed run gives ``{}`` and the others go on."""
    jobs = [(name, seed) for name in names for seed in cfg.seeds]
    workers = max(1, min(cfg.jobs, len(jobs)))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    log.info("%d training runs, %d at a time with %d torch thread(s) each", len(jobs), workers, threads)
    done = {}

    def collect(name: str, seed: int, result) -> None:
        try:
            done[name, seed] = result()
        except Exception as e:  # noqa: BLE001 - a failed seed is left out, the others count
            log.error("%s seed %d failed: %s: %s", name, seed, type(e).__name__, e)
            done[name, seed] = {}

    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread waits on its training process
        futures = {pool.submit(train_scores, cfg, name, seed, threads if workers > 1 else None): (name, seed)
                   for name, seed in jobs}
        for future in as_completed(futures):
            collect(*futures[future], future.result)
    return done


def loop_speed(cfg: Config, name: str) -> dict:
    """Training frames/s of ``pipeline.train``'s own loop against the bare model step, for ``name``
    built from the bench budget exactly as its training runs build it.

    Loop: :func:`pipeline.loop.train_epoch` over the training DataLoader (reading the cache,
    moving to the device, loss, clipping, optimiser and schedule, progress bar, TensorBoard).
    Bare: forward + loss + backward + optimiser step over the same batches, read beforehand and
    already on the device. One untimed pass of each, then ``loop_repeats`` interleaved timed
    passes; medians, and the ratio of each pair of passes, whose range shows how much the
    machine's other work moved them. Frames are the windows' frames, padding excluded.
    """
    from torch.utils.tensorboard import SummaryWriter

    from pipeline import loop as epoch_loop
    from pipeline.distributed import World
    from pipeline.splits import open_features
    from pipeline.training import build_training, enter_stage

    run_cfg = train_config(cfg, name, cfg.seed)
    world, device = World(), torch.device(local_device(cfg.device))
    built = build_training(run_cfg, world, device, open_features(run_cfg))
    model, loss_fn, loader, tasks = built.model, built.loss_fn, built.loader, built.stages[0]
    _, groups, optimizer, scheduler = enter_stage(run_cfg, model, loss_fn, built.stages, 0, len(loader))
    dtype = training_dtype(device, run_cfg.amp)
    built.shuffle.manual_seed(cfg.seed)  # every pass draws these same batches
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]
    frames = sum(int(b["steps"].sum()) for b in batches)
    sync = synchronizer(device)
    model.train()

    with tempfile.TemporaryDirectory(prefix="bench_loop_") as board_dir:
        board = SummaryWriter(board_dir)

        def loop() -> None:
            built.shuffle.manual_seed(cfg.seed)
            epoch_loop.train_epoch(run_cfg, model, loader, loss_fn, optimizer, scheduler, groups, tasks, device, world,
                              board=board, desc=f"{name} loop")

        def bare() -> None:
            for b in batches:
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    outputs = model(b["x"], b["mask"])
                loss, _ = loss_fn({k: outputs[k].float() for k in tasks}, b, b["mask"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        loop()  # untimed: the first passes set up what torch and the loader keep
        bare()
        loop_times, bare_times = [], []
        for _ in range(cfg.loop_repeats):
            loop_times += time_call(loop, 0, 1, sync)
            bare_times += time_call(bare, 0, 1, sync)
        board.close()
    loop_s, bare_s = statistics.median(loop_times), statistics.median(bare_times)
    log.info("%s: training loop %.0f frames/s, bare step %.0f frames/s (%.0f%%)", name, frames / loop_s,
             frames / bare_s, 100 * bare_s / loop_s)
    return {"loop_frames_s": frames / loop_s, "bare_frames_s": frames / bare_s, "ratio": bare_s / loop_s,
            "ratio_per_pass": [b / t for t, b in zip(loop_times, bare_times, strict=True)],
            "repeats": cfg.loop_repeats, "frames": frames, "batches": len(batches),
            "loop_times_s": loop_times, "bare_times_s": bare_times}


def finite(value) -> float | None:
    """A score as a number, None when it is missing or undefined (NaN)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def paired(scores: list[float | None], other: list[float | None]) -> dict:
    """``scores`` against ``other`` seed by seed (index k is the same seed in both): the per-seed
    differences (None where either failed), their mean and on how many seeds ``scores`` is higher."""
    diffs = [a - b if a is not None and b is not None else None for a, b in zip(scores, other, strict=True)]
    ok = [d for d in diffs if d is not None]
    return {"per_seed": diffs, "mean": statistics.fmean(ok) if ok else None, "wins": sum(d > 0 for d in ok),
            "n": len(ok)}


def compare(scores: list[float | None], other: list[float | None]) -> dict:
    """:func:`paired`, with the seed spread it is judged against (the larger of the two seed std)
    and whether the mean difference is within it (``tie``; None when no seed finished in both)."""
    diff = paired(scores, other)
    spread = max(summarise(scores)["std"] or 0.0, summarise(other)["std"] or 0.0)
    return {**diff, "spread": spread, "tie": None if diff["mean"] is None else abs(diff["mean"]) < spread}


def ranks(per_seed: dict[str, list[float | None]]) -> dict[str, int | None]:
    """Rank 1 + the number of encoders ahead by more than the pair's seed spread, so encoders
    within each other's spread share a rank; None for an encoder with no finished seed."""
    def ahead(c: dict) -> bool:
        return c["mean"] is not None and c["mean"] > 0 and not c["tie"]

    return {name: None if summarise(scores)["mean"] is None else
            1 + sum(ahead(compare(theirs, scores)) for other, theirs in per_seed.items() if other != name)
            for name, scores in per_seed.items()}


def standings(per_seed: dict[str, list[float | None]], baseline: str = "") -> dict:
    """Each encoder's rank, mean P_MTL as a percentage of the best mean, and paired comparisons
    with the ``baseline`` and with the best encoder (None against itself)."""
    means = {name: summarise(scores)["mean"] for name, scores in per_seed.items()}
    scored = [name for name, mean in means.items() if mean is not None]
    best = max(scored, key=means.__getitem__) if scored else None
    rank = ranks(per_seed)
    encoders = {
        name: {
            "rank": rank[name],
            "percent_of_best": 100 * means[name] / means[best]
            if means[name] is not None and best is not None and means[best] > 0 else None,
            "vs_baseline": compare(scores, per_seed[baseline]) if baseline in per_seed and name != baseline else None,
            "vs_best": compare(scores, per_seed[best]) if best is not None and name != best else None,
        }
        for name, scores in per_seed.items()
    }
    return {"best": best, "baseline": baseline or None, "rule": TIE_RULE, "encoders": encoders}


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def versus(c: dict | None) -> str:
    """A comparison as a table cell: mean difference, wins and the verdict."""
    if c is None:
        return "-"
    if c["mean"] is None:
        return "n/a"
    verdict = "tie" if c["tie"] else "better" if c["mean"] > 0 else "worse"
    return f"{c['mean']:+.3f}, {c['wins']}/{c['n']} wins, {verdict}"


def report_tables(result: dict) -> str:
    """The speed table (one row per encoder and length), and when scored the training loop
    against the bare step, the P_MTL standings and the per-task scores."""
    speed = []
    for name, enc in result["encoders"].items():
        for c in enc["speed"]:
            if "error" in c:
                speed.append([name, millions(enc["params"]), c["length"], c["error"], "", "", "", "", "", ""])
                continue
            speed.append([name, millions(enc["params"]), c["length"], c["train_seq_s"], c["train_frames_s"],
                          c["infer_seq_s"], c["infer_frames_s"], c["infer_window_ms"], c["train_peak_mb"],
                          c["infer_peak_mb"]])
    text = markdown_table(
        ["encoder", "params", "length", "train seq/s", "train frames/s", "infer seq/s", "infer frames/s",
         "infer ms/window", "train peak MB", "infer peak MB"],
        speed,
    )
    loops = {n: e["loop"] for n, e in result["encoders"].items() if "loop" in e}
    if loops:
        rows = [[n, r["error"], "", "", "", "", ""] if "error" in r else
                [n, r["loop_frames_s"], r["bare_frames_s"], f"{r['ratio']:.0%}",
                 f"{min(r['ratio_per_pass']):.0%}-{max(r['ratio_per_pass']):.0%}", r["frames"], r["repeats"]]
                for n, r in loops.items()]
        text += "\n\n" + markdown_table(
            ["encoder", "training loop frames/s", "bare step frames/s", "loop / bare", "per pass",
             "frames per pass", "timed passes"], rows)
        text += ("\nloop: pipeline.loop.train_epoch over the DataLoader (reading, to the device, loss, clipping, "
                 "optimiser, schedule, progress bar, TensorBoard); bare: forward + loss + backward + optimiser "
                 "step over the same batches already on the device; medians of interleaved passes")
    scored = {n: e["scores"] for n, e in result["encoders"].items() if "scores" in e}
    if scored:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"
        mean_std = lambda s: f"{f(s['mean'])} ± {f(s['std'])}"
        order = sorted(scored, key=lambda n: (scored[n]["rank"] is None, scored[n]["rank"] or 0,
                                              -(scored[n]["p_mtl"]["mean"] or 0)))
        comparison = result["comparison"]
        base, best = comparison["baseline"], comparison["best"]
        rows = [[s["rank"] or "-", n, millions(result["encoders"][n]["params"]), mean_std(s["p_mtl"]),
                 "n/a" if s["percent_of_best"] is None else f"{s['percent_of_best']:.0f}%",
                 *([versus(s["vs_baseline"])] if base else []), versus(s["vs_best"]),
                 f"{s['p_mtl']['n']}/{len(s['seeds'])}", " ".join(map(f, s["per_seed"]))]
                for n in order for s in [scored[n]]]
        text += "\n\n" + markdown_table(
            ["rank", "encoder", "params", "val P_MTL mean ± std", "% of best",
             *([f"vs {base} (paired)"] if base else []), f"vs best ({best})", "seeds ok", "per seed"], rows)
        text += (f"\npaired: mean of the per-seed differences (this encoder - the other, seeds both finished), "
                 f"wins = seeds on which this one scored higher; {comparison['rule']}; rank = 1 + encoders ahead "
                 f"by more than that spread, so tied encoders share a rank")
        if base and best == base:
            text += f"\nbaseline {base} has the highest mean P_MTL of all"
        elif base in scored and scored[base]["percent_of_best"] is not None:
            text += f"\nbaseline {base}: {scored[base]['percent_of_best']:.0f}% of the best encoder's P_MTL ({best})"
        rows = [[n, *(mean_std(scored[n]["tasks"][k]) for k in TASK_SCORES)] for n in order]
        text += "\n\n" + markdown_table(["encoder", *(f"{v} mean ± std" for v in TASK_SCORES.values())], rows)
    return text


def scored_results(out: Path, result: dict) -> dict[str, dict]:
    """The results with P_MTL to draw, by data set: every ``encoders-*.json`` beside ``out`` that
    has scores, and this run's."""
    found = {}
    for path in sorted(out.parent.glob("encoders-*.json")):
        if path == out:
            continue
        try:
            data = json.loads(path.read_text())
            if any("scores" in enc for enc in data["encoders"].values()):
                found[data.get("data") or path.stem.removeprefix("encoders-")] = data
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: not an encoder benchmark with scores (%s: %s); left out of the plot", path,
                        type(e).__name__, e)
    if any("scores" in enc for enc in result["encoders"].values()):
        found[result["data"]] = result
    return dict(sorted(found.items()))


def plot_scores(ax, groups: dict[str, dict], colours: dict[str, str]) -> None:
    """Validation P_MTL per encoder, one group per data set: mean with a seed-std error bar, and
    each seed's value as a dot beside it."""
    ticks, labels, x = [], [], 0
    for i, (data, res) in enumerate(groups.items()):
        if i:
            ax.axvline(x - 1, color="grey", linestyle=":", linewidth=0.8)
        first = x
        for name, enc in res["encoders"].items():
            if "scores" not in enc:
                continue
            p, dots = enc["scores"]["p_mtl"], [v for v in enc["scores"]["per_seed"] if v is not None]
            ax.scatter(x + 0.15 + np.linspace(-0.04, 0.04, len(dots)), dots, s=14, color=colours[name], alpha=0.6)
            if p["mean"] is not None:
                ax.errorbar(x, p["mean"], yerr=p["std"], fmt="o", color=colours[name], capsize=4)
            ticks.append(x)
            labels.append(name)
            x += 1
        ax.text((first + x - 1) / 2, 1.01, data, transform=ax.get_xaxis_transform(), ha="center", fontsize=9)
        x += 1  # a gap between data sets
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_xlim(-0.6, x - 1.4)
    ax.set_ylabel("validation P_MTL")
    ax.set_title("validation P_MTL: mean ± seed std (dots: each seed)", fontsize=10, pad=16)
    ax.grid(True, axis="y", alpha=0.3)


def plot(result: dict, path: Path, groups: dict[str, dict]) -> None:
    """Validation P_MTL of every data set in ``groups`` (when there is one), then throughput
    (training, inference), latency per window and peak memory against sequence length, one line
    per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(("train_frames_s",), "training frames/s"), (("infer_frames_s",), "inference frames/s"),
              (("infer_window_ms",), "inference ms per window (batch 1)"),
              (("train_peak_mb", "infer_peak_mb"), "peak memory, MB (solid: training, dashed: inference)")]
    fig = plt.figure(figsize=(18, 8.5 if groups else 4.2))
    grid = fig.add_gridspec(2 if groups else 1, len(panels))
    axes = [fig.add_subplot(grid[-1, i]) for i in range(len(panels))]
    names = list(dict.fromkeys([*result["encoders"], *(n for g in groups.values() for n in g["encoders"])]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    if groups:
        plot_scores(fig.add_subplot(grid[0, :]), groups, colours)
    for name, enc in result["encoders"].items():
        cells = [c for c in enc["speed"] if "error" not in c]
        for ax, (keys, _) in zip(axes, panels, strict=True):
            for key, style in zip(keys, ("-", "--"), strict=False):
                ax.plot([c["length"] for c in cells], [c[key] for c in cells], style, marker="o", color=colours[name],
                        label=f"{name} ({millions(enc['params'])})" if style == "-" else None)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        # log-log shows how each cost grows (slope 1: linear in length, 2: quadratic); a log axis
        # needs one positive value, which failed cells or an unmeasurably small peak may not leave
        if any((np.asarray(line.get_ydata()) > 0).any() for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_xticks(result["lengths"], [str(t) for t in result["lengths"]])
        ax.set_xlabel("sequence length (frames)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"batch {result['batch_size']}, d_in {result['d_in']}, {m['device']}, {m['cpu']}, "
                 f"{m['torch_threads']} threads, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_text(cfg: Config) -> str:
    """The training budget, with configs/train.yaml's value beside each setting it changes."""
    defaults = load_config("train")
    parts = [f"{k}={v}" + (f" (train default {defaults[k]})" if defaults.get(k) != v else "")
             for k, v in cfg.train.items()]
    return f"{', '.join(parts)}, seeds {list(cfg.seeds)}"


def output_path(cfg: Config) -> Path:
    """``output``, else ``<runs_dir>/bench/encoders-<data>.json``: one file per data set."""
    return Path(cfg.output) if cfg.output else Path(cfg.runs_dir) / "bench" / f"encoders-{cfg.data.name}.json"


def check(cfg: Config) -> list[Path]:
    """Refuse unusable settings before any work; the feature caches the P_MTL part needs."""
    for key in ("batch_size", "repeats"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    if cfg.loop_repeats < 0:
        raise ConfigError(f"loop_repeats={cfg.loop_repeats} must be 0 (no loop timing) or more")
    if cfg.warmup < 0 or not cfg.lengths or any(not isinstance(t, int) or t < 1 for t in cfg.lengths):
        raise ConfigError(f"warmup={cfg.warmup}, lengths={cfg.lengths}: need warmup >= 0 and positive lengths")
    local_device(cfg.device)  # one that this torch cannot use is refused here
    unknown = sorted(set(cfg.encoder_args) - set(component_names("encoder")))
    if unknown:
        raise ConfigError(f"encoder_args for unknown encoder(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(component_names('encoder'))}")
    paths = feature_paths(cfg.runs_dir, cfg.data.name, cfg.extractors)
    missing = [str(p) for p in paths if not p.is_file()]
    if not cfg.skip_scores and missing:
        raise ConfigError(
            f"no feature cache {', '.join(missing)}: the P_MTL part trains on it. Run `make features "
            f"DATA={cfg.data.name}` first, or pass skip_scores=true for the speed part alone")
    if cfg.d_in <= 0 and missing:
        raise ConfigError(f"d_in=0 takes the dim of {', '.join(missing)}, which does not exist; set d_in=...")
    if not cfg.skip_scores and cfg.baseline and cfg.baseline not in cfg.encoders:
        raise ConfigError(f"baseline={cfg.baseline} is not among encoders={list(cfg.encoders)}; "
                          f"add it, or pass baseline='' for no baseline comparison")
    if not cfg.skip_scores and len(cfg.seeds) < 3:
        log.warning("seeds=%s: fewer than 3 seeds give no trustworthy spread", cfg.seeds)
    return paths


def main(cfg: Config) -> int:
    setup_logging()
    start = time.perf_counter()
    paths = check(cfg)
    d_in = cfg.d_in if cfg.d_in > 0 else FeatureCache(paths).dim
    specs = {name: encoder_spec(name, cfg.encoder_args.get(name)) for name in cfg.encoders}
    result = {
        "machine": machine(cfg.device, cfg.threads),
        "data": cfg.data.name,
        "d_in": d_in,
        "batch_size": cfg.batch_size,
        "lengths": list(cfg.lengths),
        "timing": {"warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median",
                   "process": "one fresh spawned process per (encoder, length)"},
        "budget": None if cfg.skip_scores else {"seeds": list(cfg.seeds), **cfg.train},
        "encoders": {},
    }
    m = result["machine"]
    header = (f"Encoders on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, load "
              f"{m['load_average'][0] if m['load_average'] else 'n/a'}), torch {m['torch']}, device {cfg.device}; "
              f"batch {cfg.batch_size}, d_in {d_in}, {cfg.warmup} warm-up + median of {cfg.repeats} timed calls")

    for name, spec in specs.items():  # every model is built before any timing, so a bad option costs nothing
        result["encoders"][name] = sizes(name, spec, d_in)
    for name, spec in specs.items():
        result["encoders"][name]["speed"] = [
            measure_in_child(encoder=spec, d_in=d_in, length=t, batch_size=cfg.batch_size, warmup=cfg.warmup,
                             repeats=cfg.repeats, device=cfg.device, threads=cfg.threads, seed=cfg.seed,
                             amp=cfg.train.get("amp", True))
            for t in cfg.lengths
        ]
    seconds = {"speed": round(time.perf_counter() - start, 1)}

    if not cfg.skip_scores and cfg.loop_repeats:
        looped = time.perf_counter()
        for name in specs:
            try:
                result["encoders"][name]["loop"] = loop_speed(cfg, name)
            except Exception as e:  # noqa: BLE001 - one encoder's failure must not stop the others
                log.error("%s training loop timing failed: %s: %s", name, type(e).__name__, e)
                result["encoders"][name]["loop"] = {"error": f"{type(e).__name__}: {e}"}
        seconds["loop"] = round(time.perf_counter() - looped, 1)

    if not cfg.skip_scores:
        trained = time.perf_counter()
        scores = all_scores(cfg, list(specs))
        seconds["train"] = round(time.perf_counter() - trained, 1)
        for name in specs:
            runs = [scores[name, seed] for seed in cfg.seeds]
            per_seed = [finite(r.get("p_mtl")) for r in runs]
            tasks = {key: [finite(r.get(key)) for r in runs] for key in TASK_SCORES}
            result["encoders"][name]["scores"] = {
                "seeds": list(cfg.seeds), "per_seed": per_seed, "p_mtl": summarise(per_seed),
                "tasks": {key: {"per_seed": values, **summarise(values)} for key, values in tasks.items()},
                "runs": str(Path(cfg.runs_dir) / cfg.data.name / "train" / f"bench_{name}-*")}
        table = standings({n: e["scores"]["per_seed"] for n, e in result["encoders"].items()}, cfg.baseline)
        for name, standing in table.pop("encoders").items():
            result["encoders"][name]["scores"].update(standing)
        result["comparison"] = table

    result["seconds"] = {**seconds, "total": round(time.perf_counter() - start, 1)}
    out = output_path(cfg)
    png = Path(cfg.plot) if cfg.plot else out.with_suffix(".png")
    write_json(out, {**result, "config": cfg.to_dict()})
    plot(result, png, scored_results(out, result))

    budget = "" if cfg.skip_scores else f"\nP_MTL: {cfg.data.name}'s validation split, best epoch, {budget_text(cfg)}"
    print(f"\n{header}{budget}\n\n{report_tables(result)}\n")
    print(f"{result['seconds']['total']:.0f} s in all; written to {out} and {png}")
    failed = (any("error" in c for e in result["encoders"].values() for c in e["speed"])
              or any("error" in e.get("loop", {}) for e in result["encoders"].values())
              or any(None in e.get("scores", {}).get("per_seed", []) for e in result["encoders"].values()))
    return 1 if failed else 0


if __name__ == "__main__":
    run_stage("bench", main)
