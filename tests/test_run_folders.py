"""Runs a researcher can trust: a run's folder is named by its settings, a finished run is never
written again, the same settings skip, and a folder holding another run is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import splits, train
from pipeline.config import Config, load_config
from pipeline.identity import run_folder, run_identity
from pipeline.runs import link_newest
from tests.synthetic import learnable_set

ROOT = Path(__file__).resolve().parents[1]
FAST = ["encoder.hidden=16", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]", "epochs=3"]
OUTPUTS = ("scores.json", "best.pt", "last.pt", "metrics.jsonl", "config.yaml")


def syn_config(syn: dict[str, Path], *overrides: str) -> Config:
    return load_config("train", overrides=[*FAST, f"runs_dir={syn['runs']}", "data.name=syn",
                                           f"data.annotations={syn['annotations']}", *overrides])


def digests(folder: Path) -> dict[str, str]:
    files = [folder / n for n in OUTPUTS] + sorted((folder / "predictions").rglob("*.txt"))
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"))


def test_runs_with_other_settings_get_their_own_folder_and_never_touch_a_finished_one(
        syn: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    base = syn_config(syn)
    assert train.main(base) == 0
    first = run_folder(base)
    assert first.parent == syn["runs"] / "syn" / "train" and first.name.startswith("gru-")
    link = syn["runs"] / "syn" / "latest" / "gru"
    assert link.is_symlink() and link.resolve() == first.resolve()
    assert not [p for p in first.parent.iterdir() if p.is_symlink()], "train/ holds each run once, no links"
    before = digests(first)
    identity = run_identity(base, splits.open_features(base))
    assert json.loads((first / "run.json").read_text()) == {"identity": identity, "finished": True}
    assert list((first / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"

    noise = syn_config(syn, "noise_features=true")
    assert train.main(noise) == 0
    second = run_folder(noise)
    assert second != first and second.name.startswith("gru-")
    assert json.loads((second / "scores.json").read_text())["noise_features"] is True
    assert link.resolve() == second.resolve(), "the name links to the newest run"
    assert digests(first) == before, "the finished run was written again"

    # the same settings again: skipped without training, and the name links back to that run
    capsys.readouterr()
    tick = time.perf_counter()
    assert train.main(syn_config(syn)) == 0
    assert time.perf_counter() - tick < 10
    said = capsys.readouterr().out
    assert "finished earlier with these settings; not trained again" in said and "P_MTL" in said
    assert digests(first) == before
    assert link.resolve() == first.resolve()


def test_a_changed_training_setting_starts_a_new_run_and_the_same_one_resumes(syn: dict[str, Path]) -> None:
    a, b = syn_config(syn, "lr=0.005"), syn_config(syn, "lr=0.002")
    c = syn_config(syn, "lr=0.005", "device=cpu", "num_workers=0", "resume=true")  # nothing that defines the run
    assert run_folder(a) != run_folder(b)
    assert run_folder(a) == run_folder(c)
    # the features are part of a run's identity: other features, other folder
    cache = splits.open_features(a)
    other = [{**part, "config_hash": "another extractor setting"} for part in cache.identity()]
    cache.identity = lambda: other
    assert run_identity(a, cache) != run_identity(a, splits.open_features(a))


def test_a_folder_holding_another_run_is_refused_and_left_untouched(syn: dict[str, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "mine"
    assert train.main(syn_config(syn, f"out_dir={out}", "epochs=2")) == 0
    before = digests(out)
    assert train.main(syn_config(syn, f"out_dir={out}", "epochs=2", "lr=0.001")) == 2
    assert f"{out}: holds the run" in caplog.text and "made with other settings" in caplog.text
    assert digests(out) == before
    # results that record no run at all (an older layout, or someone else's) are not taken over either
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "best.pt").write_bytes(b"not mine")
    assert train.main(syn_config(syn, f"out_dir={stray}", "epochs=2")) == 2
    assert (stray / "best.pt").read_bytes() == b"not mine"


def test_an_unfinished_run_resumes_in_its_own_folder(syn: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    cfg = syn_config(syn, "epochs=4", "seed=7")
    out = run_folder(cfg)
    assert train.main(cfg) == 0
    scores = json.loads((out / "scores.json").read_text())
    # as if killed while scoring: scores.json and the finished mark gone, last.pt kept
    (out / "scores.json").unlink()
    (out / "run.json").write_text(json.dumps({"identity": scores["identity"], "finished": False}))
    assert train.main(cfg) == 0
    assert json.loads((out / "scores.json").read_text())["p_mtl"] == pytest.approx(scores["p_mtl"], abs=1e-6)


def test_the_command_line_skips_a_finished_run(syn: dict[str, Path]) -> None:
    args = [sys.executable, "-m", "pipeline.train", *FAST, f"runs_dir={syn['runs']}", "data.name=syn",
            f"data.annotations={syn['annotations']}", "name=cli", "epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "Validation scores" in first.stdout, first.stderr[-2000:]
    (folder,) = (syn["runs"] / "syn" / "train").glob("cli-*")
    before = digests(folder)
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "not trained again" in again.stdout
    assert "epoch" not in again.stderr, "a finished run trained again"
    assert digests(folder) == before


def test_the_newest_link_is_relative_and_replaced_whole(tmp_path: Path) -> None:
    runs = tmp_path / "sample" / "train"
    first, second = runs / "gru-0123abcd", runs / "gru-4567ef01"
    for folder in (first, second):
        folder.mkdir(parents=True)
    link = tmp_path / "sample" / "latest" / "gru"
    link_newest(first, link)
    assert os.readlink(link) == "../train/gru-0123abcd" and link.resolve() == first.resolve()
    link_newest(second, link)
    assert link.resolve() == second.resolve() and sorted(p.name for p in link.parent.iterdir()) == ["gru"]


def test_a_link_of_the_older_layout_in_train_is_retired(syn: dict[str, Path]) -> None:
    """Older versions linked the newest run as ``train/<name>``, beside the run folders, which made
    TensorBoard over ``train/`` show every run twice; the next run of that name removes it."""
    cfg = syn_config(syn, "name=old_link", "epochs=1")
    out = run_folder(cfg)
    old = out.parent / "old_link"
    out.parent.mkdir(parents=True, exist_ok=True)
    old.symlink_to("somewhere-else")
    assert train.main(cfg) == 0
    assert not os.path.lexists(old) and (syn["runs"] / "syn" / "latest" / "old_link").resolve() == out.resolve()


class _Features:
    """What run_identity reads of a feature cache."""

    def identity(self) -> list:
        return [{"extractor": "onet", "config_hash": "fixed"}]


def _with(cfg: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(cfg))
    *path, last = dotted.split(".")
    section = out
    for part in path:
        section = section.setdefault(part, {})
    section[last] = value
    return out


def test_keys_added_later_keep_the_identity_of_runs_made_before_them_at_their_neutral_value() -> None:
    from pipeline import checkpoint
    from pipeline.identity import ADDED_KEYS

    # the config of a run made before any of these keys existed (commit de9e064)
    old = checkpoint.read(Path(__file__).parent / "data" / "checkpoints_v1" / "shared_gru_best.pt").recipe.config
    features = _Features()
    now = old
    for key, neutral in ADDED_KEYS.items():
        *path, last = key.split(".")
        section = old
        for part in path:
            section = section.get(part, {})
        assert last not in section, f"{key} was already a key when that run was made"
        now = _with(now, key, neutral)
    assert run_identity(Config(now), features) == run_identity(Config(old), features)
    # any other value is another run
    for key, neutral in ADDED_KEYS.items():
        if isinstance(neutral, bool):
            other = not neutral
        elif isinstance(neutral, int):
            other = neutral + 1
        elif isinstance(neutral, dict):
            other = {"syn": 1.0}
        else:
            other = {"all": "labelled", "drop": "keep", "joint": "apart", "first": "last", "eval": "train",
                     "pad": "truncate", "weighted_mean": "mean", "labelled": "steps"}.get(neutral, "syn")
        assert run_identity(Config(_with(now, key, other)), features) != run_identity(Config(old), features), key
