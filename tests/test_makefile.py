"""Make never decides alone that a stage is done: every stage target runs its stage, which skips
finished work by its own hashes, and ARGS reach the stage named on the command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> str:
    """The commands ``make -n`` would run, with the environment taken as installed."""
    done = subprocess.run(["make", "-n", "-o", ".venv/.installed", *args], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Nothing to be done" not in done.stdout + done.stderr
    return done.stdout.replace("\\\n", " ")  # one line per command


def stage_lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if f"-m pipeline.{stage} " in line + " "]


@pytest.mark.parametrize("extra", [[], ["ARGS=noise_features=true"]])
def test_train_runs_every_stage_in_order_each_time(extra: list[str], tmp_path: Path) -> None:
    # whatever is on disk: a finished run's files must not make Make skip the stage
    text = dry_run("train", f"RUNS={tmp_path}", *extra)
    lines = text.splitlines()
    order = [next(i for i, line in enumerate(lines) if f"-m pipeline.{s}" in line)
             for s in ("sample", "faces", "features", "train")]
    assert order == sorted(order)
    (train,) = stage_lines(text, "train")
    assert f"runs_dir={tmp_path}" in train and "name=gru" in train and "encoder=gru" in train
    assert ("noise_features=true" in train) == bool(extra)
    assert not any("noise_features" in line for s in ("faces", "features") for line in stage_lines(text, s))


def test_args_go_to_the_stage_named_and_variables_choose_the_config() -> None:
    text = dry_run("features", "EXTRACTOR=iresnet18", "ARGS=extractor.weights=/ckpt/backbone.pth")
    (features,) = stage_lines(text, "features")
    assert "extractor=iresnet18" in features and "extractor.weights=/ckpt/backbone.pth" in features
    assert "/ckpt" not in "".join(stage_lines(text, "faces"))
    (train,) = stage_lines(dry_run("train", "EXPERIMENT=va_only"), "train")
    assert "experiment=va_only" in train and "name=va_only" in train and "encoder=" not in train
    (sweep,) = stage_lines(dry_run("experiments", "EXPERIMENTS=va_only expr_only", "SEEDS=0,1"), "sweep")
    assert "experiment=va_only,expr_only" in sweep and "seed=0,1" in sweep


def test_a_failed_target_leaves_no_file_that_looks_done() -> None:
    assert ".DELETE_ON_ERROR:" in (ROOT / "Makefile").read_text()


def test_bench_on_the_set_that_needs_time_generates_it_first() -> None:
    text = dry_run("bench", "DATA=sample_temporal", "EXTRACTOR=onet")
    (sample,) = stage_lines(text, "sample")
    assert "configs/sample_temporal.yaml" in sample
    (bench,) = [line for line in text.splitlines() if "-m pipeline.bench.encoders" in line]
    assert "data=sample_temporal" in bench and "extractors=[onet]" in bench
    # on other data nothing is generated, and the built-in sample takes configs/sample.yaml's own set
    assert not stage_lines(dry_run("bench", "DATA=affwild2"), "sample")
    (sample,) = stage_lines(dry_run("features"), "sample")
    assert "sample_temporal" not in sample


@pytest.mark.parametrize(("args", "extractors"), [
    ([], ["fer_xception"]),  # EXTRACTOR, the targets' default
    (["EXTRACTOR=onet"], ["onet"]),
    (["EXPERIMENT=va_only"], ["onet"]),  # the experiment's own (train.yaml's) extractors
    (["EXPERIMENT=nguyen2022_amtl", "ARGS=epochs=2 extractors=[onet]"], ["onet"]),  # ARGS win
    (["EXPERIMENT=fusion_onet_iresnet18"], ["onet", "iresnet18"]),
    (["CONFIG=configs/experiments/fusion_onet_iresnet18.yaml"], ["onet", "iresnet18"]),
])
def test_training_computes_the_features_of_every_extractor_its_config_reads(args: list[str],
                                                                            extractors: list[str]) -> None:
    """Never a feature cache of another extractor than the run reads: the features stage runs for each
    extractor of the resolved training config, in its order, before training."""
    text = dry_run("train", *args)
    features = stage_lines(text, "features")
    assert [next(w.split("=", 1)[1] for w in line.split() if w.startswith("extractor=")) for line in features] \
        == extractors
    lines = text.splitlines()
    assert max(lines.index(f) for f in features) < lines.index(stage_lines(text, "train")[0])


def test_sweeps_experiments_and_the_bench_compute_the_features_they_read() -> None:
    for target, args, extractors in [
        ("experiments", [], ["onet"]), ("sweep", ["EXTRACTOR=onet"], ["onet"]),
        ("sweep", ["SWEEP=extractors=[onet],[onet,iresnet18] seed=0"], ["onet", "iresnet18"]),
        ("bench", ["EXTRACTOR=onet"], ["onet"])]:
        features = stage_lines(dry_run(target, *args), "features")
        assert [next(w.split("=", 1)[1] for w in line.split() if w.startswith("extractor=")) for line in features] \
            == extractors, (target, args)


def test_compare_init_passes_the_seeds_and_args_and_computes_the_runs_features_first() -> None:
    text = dry_run("compare-init", "SEEDS=1,2,3", "ARGS=epochs=2")
    (compare,) = stage_lines(text, "compare_init")
    assert "seeds=[1,2,3]" in compare and "epochs=2" in compare and "data=sample" in compare
    (features,) = stage_lines(text, "features")  # train.yaml's extractors, which every variant reads
    assert "extractor=onet" in features
