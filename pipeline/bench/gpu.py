"""The prepared GPU check: what every stage does on one GPU, in one table, offline.

    python -m pipeline.bench.gpu [configs/bench_gpu.yaml] device=cuda [key=value ...]
    python -m pipeline.bench.gpu device=cpu smoke=true      # the same code at toy sizes

Five parts, each reported even when another fails:

- **faces**: the faces stage on a generated 720p video (scikit-image's astronaut), one process
  alone and ``faces.shards`` processes at once sharing the device, each on its own copy of the
  video (``shard=i/n``), each with its share of the cores: frames/s of the whole stage, the
  slowest process's time for the shards;
- **features**: preprocess + forward of a batch of random crops for each extractor and batch size,
  in the features stage's precision (bf16 autocast on CUDA), clock read after synchronising;
- **encoders**: a training step (forward, multi-task loss, backward, AdamW) in training's precision
  at each (length, batch), frames/s (:func:`pipeline.bench.encoders.measure`);
- **training**: the GRU trained for ``training.epochs`` on the built-in sample (generated, then
  faces and ``training.extractor`` features on the same device) with ``amp: true`` and ``amp:
  false``: the P_MTL of both, so that damage done by bf16 shows (where training does not
  autocast, on the CPU, the two are one run, trained once);
- **dtype**: the output dtype of the project's GRU and of a bare ``nn.GRU`` under the training
  autocast (cuDNN's autocast rule runs the bare one in fp16; the project's stays in fp32).

Nothing is downloaded: extractors are built with random weights (speed does not depend on them;
onet's ship with facenet-pytorch). Prints one Markdown table, writes ``out`` (JSON) and exits 1 if
a part failed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from features import build_extractor
from pipeline.atomic import write_json
from pipeline.bench import dotted_overrides, machine, stage_peak_in_child, synchronizer, time_call
from pipeline.bench.encoders import encoder_spec, measure
from pipeline.bench.faces import make_long_video
from pipeline.bench.memory import count_frames
from pipeline.cli import run_stage
from pipeline.config import Config, ConfigError, load_config
from pipeline.launch import train_process
from pipeline.metrics import markdown_table
from pipeline.precision import autocast_dtype, precision, training_dtype
from pipeline.runs import cores_share, local_device

log = logging.getLogger("pipeline")

# smoke=true: every part at sizes a 2-core CPU runs in well under a minute
SMOKE = {
    "warmup": 1,
    "repeats": 1,
    "faces": {"minutes": 2 / 60, "width": 480, "height": 360, "fps": 10, "shards": 2},
    "features": {"extractors": ["onet", "iresnet18", "vit_tiny"], "batches": [2, 4]},  # the small ones
    "encoders": {"names": ["gru"], "lengths": [8, 16], "batches": [2, 4], "d_in": 32},
    "training": {"epochs": 1, "sample": {"n_videos": 4, "n_frames": 80, "size": 128}},
}


def resolve(cfg: Config) -> Config:
    """``cfg`` with SMOKE on top when ``smoke`` is set."""
    if not cfg.smoke:
        return cfg
    merged = dict(cfg)
    for key, value in SMOKE.items():
        merged[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return copy.deepcopy(Config(merged))  # nested sections read as attributes too


def bench_faces(cfg: Config, work: Path) -> dict:
    """The faces stage, one process alone, then ``shards`` processes at once on copies of the video."""
    f = cfg.faces
    name = f"astronaut_{f.width}x{f.height}_{f.fps}fps_{f.minutes:g}min"
    video = make_long_video(work / "videos" / f"{name}.mp4", f.minutes * 60, f.width, f.height, f.fps)
    rows = {}
    for label, n in (("1 process", 1), (f"{f.shards} shards", int(f.shards))):
        folder, out = work / "faces" / f"in_{n}", work / "faces" / f"out_{n}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)  # the stage skips videos it finished: time fresh work
        folder.mkdir(parents=True)
        copies = [folder / f"copy_{k:02d}.mp4" for k in range(n)]
        for c in copies:
            os.link(video, c) if video.stat().st_dev == folder.stat().st_dev else shutil.copy(video, c)
        base = ["subject=main", f"videos={folder}", f"out_dir={out}", f"device={cfg.device}"]
        # processes started together each take their share of the cores, as a launch's would
        threads = cfg.threads or (max(1, cores_share() // n) if n > 1 else 0)
        if n > 1:
            base.append(f"decode_threads={min(8, threads)}")
        shards = [[*base, f"shard={k}/{n}"] for k in range(n)] if n > 1 else [base]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:  # each thread waits on its stage process
            done = list(pool.map(lambda o, t=threads: stage_peak_in_child("faces", o, t), shards))
        wall = time.perf_counter() - start
        errors = [d["error"] for d in done if "error" in d]
        if errors:
            rows[label] = {"processes": n, "error": errors[0]}
            continue
        frames = [count_frames("faces", out, c.stem, "") for c in copies]
        kept, with_face = sum(k for k, _ in frames), sum(w for _, w in frames)
        slowest = max(d["seconds"] for d in done)
        rows[label] = {"processes": n, "frames": kept, "frames_with_face": with_face,
                       "stage_seconds": round(slowest, 2), "wall_seconds": round(wall, 2),
                       "fps": kept / slowest, "threads": threads,
                       "gpu_peak_mb": max(d.get("gpu_peak_mb", 0.0) for d in done),
                       "peak_rss_mb": max(d["peak_rss_mb"] for d in done)}
        log.info("faces, %s: %.1f frames/s (%d frames, slowest process %.1f s)", label, kept / slowest, kept, slowest)
    return {"video": str(video), "width": f.width, "height": f.height, "minutes": f.minutes, "runs": rows}


def bench_features(cfg: Config) -> dict:
    """Preprocess + forward of one batch of random crops per (extractor, batch), in the stage's precision."""
    device = torch.device(local_device(cfg.device))
    dtype = autocast_dtype(device, True)  # the features stage's default, amp: true
    sync = synchronizer(device)
    rows = {}
    for name in cfg.features.extractors:
        try:
            torch.manual_seed(cfg.seed)
            extractor = build_extractor(name, random_init=True).to(device, memory_format=torch.channels_last).eval()
        except Exception as e:  # noqa: BLE001 - an extractor that cannot be built is reported, the rest go on
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        size = int(extractor.input_size)
        for batch in cfg.features.batches:
            crops = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)

            def step(crops: torch.Tensor = crops, net: nn.Module = extractor) -> None:
                with torch.inference_mode():
                    x = net.preprocess(crops.to(device, non_blocking=True))
                    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        net(x.contiguous(memory_format=torch.channels_last))

            try:
                times = time_call(step, cfg.warmup, cfg.repeats, sync)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at the larger batch
                rows[f"{name}/{batch}"] = {"extractor": name, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                continue
            fps = batch / statistics.median(times)
            rows[f"{name}/{batch}"] = {"extractor": name, "batch": batch, "input_size": size, "fps": fps,
                                       "times_s": times, "precision": precision(device, dtype)}
            log.info("features, %s at batch %d: %.1f frames/s", name, batch, fps)
    return rows


def bench_encoders(cfg: Config) -> dict:
    """Training frames/s of each encoder at each (length, batch), in training's precision."""
    rows = {}
    e = cfg.encoders
    for name in e.names:
        for length in e.lengths:
            for batch in e.batches:
                key = f"{name}/{length}x{batch}"
                try:
                    cell = measure(encoder=encoder_spec(name), d_in=int(e.d_in), length=int(length),
                                   batch_size=int(batch), warmup=cfg.warmup, repeats=cfg.repeats,
                                   device=cfg.device, threads=cfg.threads, seed=cfg.seed, amp=True)
                except Exception as err:  # noqa: BLE001 - one cell failing leaves the others
                    rows[key] = {"encoder": name, "length": length, "batch": batch,
                                 "error": f"{type(err).__name__}: {err}"}
                    continue
                rows[key] = {"encoder": name, "length": length, "batch": batch, "fps": cell["train_frames_s"],
                             "peak_mb": cell["train_peak_mb"], "precision": cell["precision"]["train"]}
                log.info("encoders, %s: %.0f training frames/s", key, cell["train_frames_s"])
    return rows


def sample_inputs(cfg: Config, work: Path) -> tuple[list[str], dict]:
    """Generate the sample into ``work``, run faces and ``training.extractor`` features on it -> the
    data overrides that point training there, and each stage's seconds."""
    from pipeline import sample

    root = work / "sample"
    status = sample.main(load_config("sample", overrides=[f"out={root}",
                                                           *dotted_overrides("", dict(cfg.training.sample))]))
    if status:
        raise RuntimeError(f"the sample could not be written to {root} (status {status})")
    data = ["data=sample", f"data.videos={root / 'videos'}", f"data.annotations={root / 'annotations'}"]
    runs = work / "runs"
    seconds = {}
    for stage, extra in (("faces", [f"out_dir={runs / 'sample' / 'faces'}"]),
                         ("features", [f"extractor={cfg.training.extractor}", f"faces_dir={runs / 'sample' / 'faces'}",
                                       f"out_dir={runs / 'sample' / 'features'}"])):
        done = stage_peak_in_child(stage, [*data, *extra, f"device={cfg.device}"], cfg.threads)
        if "error" in done:
            raise RuntimeError(f"{stage} of the sample: {done['error']}")
        seconds[stage] = round(done["seconds"], 2)
    return [*data, f"runs_dir={runs}", f"extractors=[{cfg.training.extractor}]"], seconds


def bench_training(cfg: Config, work: Path) -> dict:
    """The GRU on the sample with bf16 autocast and without: P_MTL and seconds of each."""
    data, stage_seconds = sample_inputs(cfg, work)
    shutil.rmtree(work / "runs" / "sample" / "train", ignore_errors=True)  # time training, never reuse a run
    rows = {"inputs_seconds": stage_seconds}
    device = torch.device(local_device(cfg.device))
    for amp in (True, False):
        if not amp and training_dtype(device, True) is None:  # no autocast here: amp: false is the same run
            rows["fp32"] = {**rows["amp"], "amp": False, "same_run_as": "amp"} if "p_mtl" in rows["amp"] else \
                {"amp": False, "error": rows["amp"]["error"]}
            continue
        label = "amp" if amp else "fp32"
        overrides = [*data, "encoder=gru", f"epochs={cfg.training.epochs}", f"amp={str(amp).lower()}",
                     f"seed={cfg.seed}", f"device={cfg.device}", f"name=bench_gpu_{label}"]
        start = time.perf_counter()
        log_file = work / "logs" / f"train_{label}.log"
        status = train_process(None, overrides, log=log_file)
        took = time.perf_counter() - start
        out = work / "runs" / "sample" / "train"
        found = sorted(out.glob(f"bench_gpu_{label}-*/scores.json"))
        if status or not found:
            rows[label] = {"amp": amp, "error": f"pipeline.train exited with status {status}; see {log_file}"}
            continue
        scores = json.loads(found[-1].read_text())
        rows[label] = {"amp": amp, "precision": precision(device, training_dtype(device, amp)),
                       "p_mtl": scores["p_mtl"], "seconds": round(took, 1), "run": str(found[-1].parent)}
        log.info("training, %s: P_MTL %.4f in %.1f s", label, scores["p_mtl"], took)
    return rows


def bench_dtype(cfg: Config) -> dict:
    """Output dtype of the project's GRU and of a bare ``nn.GRU`` under training's autocast (bf16;
    on the CPU, where training does not autocast, under a bf16 CPU autocast all the same)."""
    from models.encoders import build_encoder

    device = torch.device(local_device(cfg.device))
    dtype = training_dtype(device, True) or torch.bfloat16
    torch.manual_seed(cfg.seed)
    x = torch.randn(2, 8, 16, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    ours = build_encoder("gru", 16).to(device).eval()
    bare = nn.GRU(16, 16, batch_first=True).to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
        got, plain = ours(x, mask), bare(x)[0]
    name = lambda t: str(t).removeprefix("torch.")
    return {"autocast": name(dtype), "gru": name(got.dtype), "bare_nn_gru": name(plain.dtype)}


def table(result: dict) -> str:
    """One row per measurement: part, setting, figure, note."""
    rows = []
    dtype = lambda p: "fp32" if p["autocast"] == "none" else p["autocast"]
    err = lambda r: f"failed: {r['error'][:80]}"
    for part in ("faces", "features", "encoders", "training", "dtype"):
        result.setdefault(part, {})
    for label, r in result["faces"].get("runs", {}).items():
        rows.append(["faces", label, err(r) if "error" in r else f"{r['fps']:.1f} frames/s",
                     "" if "error" in r else f"{r['frames']} frames, slowest process {r['stage_seconds']} s"])
    for key, r in result["features"].items():
        rows.append(["features", key, err(r) if "error" in r else f"{r['fps']:.1f} frames/s",
                     "" if "error" in r else dtype(r["precision"])])
    for key, r in result["encoders"].items():
        rows.append(["encoder training", key.replace("/", " T x B = ", 1),
                     err(r) if "error" in r else f"{r['fps']:.0f} frames/s",
                     "" if "error" in r else f"{dtype(r['precision'])}, peak {r['peak_mb']:.0f} MB"])
    for key in ("amp", "fp32"):
        r = result["training"].get(key)
        if r:
            rows.append([f"GRU, {result['epochs']} epoch(s) on the sample", f"amp: {str(r['amp']).lower()}",
                         err(r) if "error" in r else f"P_MTL {r['p_mtl']:.4f}",
                         "" if "error" in r else f"{dtype(r['precision'])}, {r['seconds']} s"])
    d = result["dtype"]
    if d and "error" not in d:
        rows.append(["dtype under autocast", f"{d['autocast']} autocast", f"GRU: {d['gru']}",
                     f"bare nn.GRU: {d['bare_nn_gru']}"])
    for part in ("faces", "training", "dtype"):
        if "error" in result[part]:
            rows.append([part, "", err(result[part]), ""])
    return markdown_table(["Part", "Setting", "Figure", "Note"], rows)


def main(cfg: Config) -> int:
    cfg = resolve(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"machine": machine(local_device(cfg.device), cfg.threads), "smoke": bool(cfg.smoke),
              "epochs": cfg.training.epochs}
    parts = (("faces", lambda: bench_faces(cfg, work)), ("features", lambda: bench_features(cfg)),
             ("encoders", lambda: bench_encoders(cfg)), ("training", lambda: bench_training(cfg, work)),
             ("dtype", lambda: bench_dtype(cfg)))
    unknown = sorted(set(cfg.parts) - {p for p, _ in parts})
    if unknown:
        raise ConfigError(f"parts: {', '.join(unknown)} unknown; choose from {', '.join(p for p, _ in parts)}")
    parts = tuple((p, run) for p, run in parts if p in cfg.parts)
    for part, run in parts:
        t0 = time.perf_counter()
        try:
            result[part] = run()
        except Exception as e:  # noqa: BLE001 - one part failing is reported; the others still run
            log.error("%s failed: %s: %s", part, type(e).__name__, e)
            result[part] = {"error": f"{type(e).__name__}: {e}"}
        result.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
    result["seconds"] = round(time.perf_counter() - start, 1)
    failed = [p for p, _ in parts if "error" in result[p] or any(
        isinstance(r, dict) and "error" in r for r in (result[p].get("runs", result[p])).values())]
    result["failed"] = failed
    print(table(result))
    m = result["machine"]
    print(f"\n{m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}; {result['seconds']} s in all"
          + (" (smoke: toy sizes)" if cfg.smoke else ""))
    write_json(Path(cfg.out), result)
    print(f"written to {cfg.out}")
    if failed:
        log.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    run_stage("bench_gpu", main)
