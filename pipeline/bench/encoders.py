"""Temporal encoders side by side: parameters, training and inference throughput and peak memory
against sequence length, and validation P_MTL after the same training budget over several seeds.

    python -m pipeline.bench.encoders [configs/bench.yaml] [key=value ...]

Each (encoder, length) is measured in a fresh spawned process, so one cell's allocations and
thread pools never colour another's and its peak RSS is its own. Writes ``output`` (JSON),
``plot`` (PNG) and prints Markdown tables; the P_MTL runs are ordinary training runs,
``runs/<data>/train/bench_<encoder>-<hash>/``, reused when the same bench runs again.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from models import MultiTaskLoss, MultiTaskModel
from pipeline.bench import cpu_peak_meter, dotted_overrides, machine, time_call
from pipeline.config import Config, ConfigError, component_names, load_component, load_config, run_stage
from pipeline.data import feature_paths
from pipeline.feature_cache import FeatureCache
from pipeline.metrics import markdown_table, summarise
from pipeline.runs import setup_logging, write_json

log = logging.getLogger("pipeline")

TASKS = ("va", "expr", "au")


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
) -> dict:
    """Time one (encoder, length) cell; meant to run alone in a fresh process.

    Training = forward of the full multi-task model + ``MultiTaskLoss`` backward + AdamW step, on
    random inputs (batch_size, length, d_in) with random labels; inference = forward under
    ``torch.inference_mode()``. Peak memory is above the baseline taken once the model, optimiser
    and inputs exist: ``max_memory_allocated`` on CUDA, peak RSS on CPU (:func:`cpu_peak_meter`).
    Inference runs first, so the high-water mark read after it is its own; training's, read after
    it, is the larger one. Both include what the first calls initialise inside torch.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
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

    def train_step() -> None:
        loss, _ = loss_fn(model(x, mask), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode():
            model(x, mask)

    sync = torch.cuda.synchronize if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        peak, method = (lambda: (torch.cuda.max_memory_allocated() - base) / 2**20), "CUDA max_memory_allocated"
    else:
        peak, method = cpu_peak_meter()

    model.eval()
    infer_times = time_call(infer, warmup, repeats, sync)
    infer_mb = peak()
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
        "train_peak_mb": train_mb,
        "infer_peak_mb": infer_mb,
        "train_times_s": train_times,
        "infer_times_s": infer_times,
        "memory": f"{method} after building the model, optimiser and inputs",
    }


def measure_in_child(**kw) -> dict:
    """:func:`measure` in a freshly spawned process; a failure comes back as ``{"error": ...}``."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(measure, **kw).result()
    except Exception as e:  # noqa: BLE001 - one cell (say, out of memory at 4096 steps) must not stop the rest
        log.error("%s at length %d failed: %s: %s", kw["encoder"]["name"], kw["length"], type(e).__name__, e)
        return {"length": kw["length"], "error": f"{type(e).__name__}: {e}"}


def train_scores(cfg: Config, name: str, seed: int) -> dict:
    """Train ``name`` with the bench budget and one seed via ``pipeline.train``; its scores.json.
    The run is an ordinary training run named ``bench_<encoder>``: a repeated bench with the same
    settings reuses it, other settings get their own folder."""
    from pipeline import train  # here, so the spawned timing processes need not import it

    data = {k: v for k, v in cfg.data.items() if k != "name"}
    overrides = [
        f"data={cfg.data.name}",
        f"encoder={name}",
        *dotted_overrides("data", data),
        *dotted_overrides("encoder", cfg.encoder_args.get(name, {})),
        *dotted_overrides("", {"extractors": list(cfg.extractors), **cfg.train, "seed": seed, "device": cfg.device,
                         "runs_dir": cfg.runs_dir, "name": f"bench_{name}"}),
    ]
    run_cfg = load_config("train", overrides=overrides)
    status = train.main(run_cfg)
    out = train.run_folder(run_cfg)
    if status:
        raise RuntimeError(f"pipeline.train exited with status {status} for {out}")
    return json.loads((out / "scores.json").read_text())


def millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def report_tables(result: dict) -> str:
    """The speed table (one row per encoder and length) and, when scored, the P_MTL table."""
    speed = []
    for name, enc in result["encoders"].items():
        for c in enc["speed"]:
            if "error" in c:
                speed.append([name, millions(enc["params"]), c["length"], c["error"], "", "", "", "", ""])
                continue
            speed.append([name, millions(enc["params"]), c["length"], c["train_seq_s"], c["train_frames_s"],
                          c["infer_seq_s"], c["infer_frames_s"], c["train_peak_mb"], c["infer_peak_mb"]])
    text = markdown_table(
        ["encoder", "params", "length", "train seq/s", "train frames/s", "infer seq/s", "infer frames/s",
         "train peak MB", "infer peak MB"],
        speed,
    )
    scored = {n: e["scores"] for n, e in result["encoders"].items() if "scores" in e}
    if scored:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"
        rows = [[n, millions(result["encoders"][n]["params"]), f"{f(p['mean'])} ± {f(p['std'])}",
                 f"{f(p['min'])}-{f(p['max'])}", f"{p['n']}/{len(s['seeds'])}", " ".join(map(f, s["per_seed"]))]
                for n, s in scored.items() for p in [s["p_mtl"]]]
        text += "\n\n" + markdown_table(
            ["encoder", "params", "val P_MTL mean ± std", "min-max", "seeds ok", "per seed"], rows)
    return text


def plot(result: dict, path: Path) -> None:
    """Throughput (training, inference) and peak memory against sequence length, one line per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(("train_frames_s",), "training frames/s"), (("infer_frames_s",), "inference frames/s"),
              (("train_peak_mb", "infer_peak_mb"), "peak memory, MB (solid: training, dashed: inference)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for i, (name, enc) in enumerate(result["encoders"].items()):
        cells = [c for c in enc["speed"] if "error" not in c]
        for ax, (keys, _) in zip(axes, panels, strict=True):
            for key, style in zip(keys, ("-", "--"), strict=False):
                ax.plot([c["length"] for c in cells], [c[key] for c in cells], style, marker="o", color=f"C{i}",
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


def check(cfg: Config) -> list[Path]:
    """Refuse unusable settings before any work; the feature caches the P_MTL part needs."""
    for key in ("batch_size", "repeats"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    if cfg.warmup < 0 or not cfg.lengths or any(not isinstance(t, int) or t < 1 for t in cfg.lengths):
        raise ConfigError(f"warmup={cfg.warmup}, lengths={cfg.lengths}: need warmup >= 0 and positive lengths")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}, but this torch ({torch.__version__}) sees no CUDA device")
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
                             repeats=cfg.repeats, device=cfg.device, threads=cfg.threads, seed=cfg.seed)
            for t in cfg.lengths
        ]
    speed_seconds = time.perf_counter() - start

    if not cfg.skip_scores:
        for name in specs:
            per_seed = []
            for seed in cfg.seeds:
                try:
                    p_mtl = train_scores(cfg, name, seed)["p_mtl"]
                    per_seed.append(p_mtl if p_mtl is not None and math.isfinite(p_mtl) else None)
                except Exception as e:  # noqa: BLE001 - a failed seed is left out, the others count
                    log.error("%s seed %d failed: %s: %s", name, seed, type(e).__name__, e)
                    per_seed.append(None)
            result["encoders"][name]["scores"] = {
                "seeds": list(cfg.seeds), "per_seed": per_seed, "p_mtl": summarise(per_seed),
                "runs": str(Path(cfg.runs_dir) / cfg.data.name / "train" / f"bench_{name}-*")}

    result["seconds"] = {"speed": round(speed_seconds, 1), "total": round(time.perf_counter() - start, 1)}
    out = Path(cfg.output)
    png = Path(cfg.plot) if cfg.plot else out.with_suffix(".png")
    write_json(out, {**result, "config": cfg.to_dict()})
    plot(result, png)

    budget = "" if cfg.skip_scores else f"\nP_MTL: {cfg.data.name}'s validation split, best epoch, {budget_text(cfg)}"
    print(f"\n{header}{budget}\n\n{report_tables(result)}\n")
    print(f"{result['seconds']['total']:.0f} s in all; written to {out} and {png}")
    failed = any("error" in c for e in result["encoders"].values() for c in e["speed"]) or any(
        None in e.get("scores", {}).get("per_seed", []) for e in result["encoders"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    run_stage("bench", main)
