"""The GPU path read on the CPU: every stage on the device the user names, the scheduler's shard and
GPU for each process, the device type and autocast dtype in the training identity, recurrent
encoders in fp32 under autocast, resuming with the optimiser state read on the host, and
deterministic training that refuses what it cannot make deterministic."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import pytest
import torch
from torch import nn

from features import build_extractor
from models.gru import GRUEncoder
from models.lstm import LSTMEncoder
from pipeline import checkpoint, faces, features, loop, precision, predict, runs, splits, train
from pipeline.config import InputError, load_config
from pipeline.identity import run_folder, run_identity
from pipeline.runs import finished, local_device, shard_index
from tests.synthetic import learnable_set

ROOT = Path(__file__).resolve().parents[1]
FAST = ["encoder.hidden=8", "encoder.layers=1", "window=24", "stride=12", "eval_stride=12", "batch_size=4",
        "patience=0", "extractors=[syn]", "epochs=2", "va_smoothing=[1]"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=48, dim=8)


def syn_config(syn: dict[str, Path], *overrides: str):
    return load_config("train", overrides=[*FAST, f"runs_dir={syn['runs']}", "data.name=syn",
                                           f"data.annotations={syn['annotations']}", "data.format=abaw_tasks",
                                           *overrides])


# ---- Make: DEVICE reaches every stage a target runs ------------------------------------------------

def make_lines(*args: str) -> list[str]:
    done = subprocess.run(["make", "-n", "-o", ".venv/.installed", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [ln for ln in done.stdout.replace("\\\n", " ").splitlines() if " -m pipeline." in ln]


def stage_of(line: str) -> str:
    return line.split(" -m pipeline.", 1)[1].split()[0]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_device_reaches_every_stage_of_a_target(device: str, tmp_path: Path) -> None:
    lines = make_lines("train", "DATA=sample", f"DEVICE={device}", f"RUNS={tmp_path}")
    stages = [stage_of(ln) for ln in lines]
    assert stages == ["sample", "faces", "features", "train"]
    for line in lines[1:]:  # the generated sample renders on the CPU and has no device
        assert f"device={device}" in line.split(), line
    for target, stage in [("predict", "predict"), ("sweep", "sweep"), ("reproduce", "reproduce"),
                          ("compare-init", "compare_init"), ("bench", "bench.encoders"),
                          ("bench-faces", "bench.faces"), ("bench-features", "bench.features"),
                          ("bench-memory", "bench.memory"), ("bench-pipeline", "bench.pipeline"),
                          ("bench-gpu", "bench.gpu"), ("features", "features")]:
        found = [ln for ln in make_lines(target, "VIDEO=clip.mp4", f"DEVICE={device}", f"RUNS={tmp_path}")
                 if stage_of(ln) != "sample"]
        assert any(stage_of(ln) == stage for ln in found), (target, found)
        assert all(f"device={device}" in ln.split() for ln in found), (target, found)


def test_without_device_each_stage_keeps_its_config_and_args_still_win(tmp_path: Path) -> None:
    lines = make_lines("train", f"RUNS={tmp_path}")
    assert not any("device=" in ln for ln in lines)
    (train_line,) = [ln for ln in make_lines("train", "DEVICE=cuda", "ARGS=device=cpu", f"RUNS={tmp_path}")
                     if stage_of(ln) == "train"]
    assert train_line.split().index("device=cpu") > train_line.split().index("device=cuda")


# ---- the scheduler's shard and GPU ------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "expected"), [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4)),  # torchrun
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "5"}, (2, 5)),  # sbatch --array=0-4
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 5)),  # --array=1-5
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8)),  # srun -n 8
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1)),  # a plain sbatch job: one task
    # each array task split again over its own processes: task 1 of 3, rank 2 of 4 -> 6 of 12
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "2", "WORLD_SIZE": "4"}, (6, 12)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 6)),
    # torchrun started by srun: torchrun's ranks name the processes
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
])
def test_the_shard_each_scheduler_variable_set_gives(environ: dict, expected: tuple[int, int]) -> None:
    assert shard_index(None, environ) == expected
    assert shard_index("1/7", environ) == (1, 7)  # shard= wins over the environment


def test_every_array_task_and_rank_together_cover_the_videos_once() -> None:
    videos = list(range(37))
    taken = []
    for task in range(3):
        for rank in range(4):
            i, n = shard_index(None, {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
                                      "SLURM_PROCID": str(rank), "SLURM_NTASKS": "4"})
            taken += videos[i::n]
    assert sorted(taken) == videos


def test_processes_sharing_a_machine_take_their_share_of_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert runs.cores_share({}) == 16
    assert runs.cores_share({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}) == 4  # 4 of 8 ranks on this machine
    assert runs.cores_share({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 2
    assert runs.cores_share({"LOCAL_WORLD_SIZE": "32"}) == 1
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    runs.share_threads({"SLURM_NTASKS_PER_NODE": "4"})
    runs.share_threads({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"})  # torchrun's choice stands
    runs.share_threads({})  # alone on the machine: torch's default
    assert set_to == [4]


def test_each_process_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device("cuda", {}) == "cuda"
    assert local_device("cuda", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == "cuda:1"
    assert local_device("cuda", {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "6"}) == "cuda:2"
    assert local_device("cuda:3", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == "cuda:3"  # named: kept
    assert local_device("cpu", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # 8 shards sharing one GPU, or Slurm's one
    assert local_device("cuda", {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "6"}) == "cuda:0"
    with pytest.raises(InputError, match=r"device=cuda:1, but this torch .* sees 1 CUDA device$"):
        local_device("cuda:1", {})


def test_a_gpu_that_is_not_there_is_refused_by_every_stage_never_replaced_by_the_cpu(
        syn: dict[str, Path], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for one without")
    said = r"^device=cuda, but this torch \(.*\) sees no CUDA devices$"
    with pytest.raises(InputError, match=said):
        faces.main(load_config("faces", overrides=[f"videos={tmp_path}", f"out_dir={tmp_path / 'f'}", "device=cuda"]))
    with pytest.raises(InputError, match=said):
        features.main(load_config("features", overrides=[f"faces_dir={tmp_path}", f"out_dir={tmp_path / 'x'}",
                                                         "device=cuda", "extractor=onet"]))
    with pytest.raises(InputError, match=said):
        train.main(syn_config(syn, "device=cuda"))
    assert not (tmp_path / "f").exists() and not (tmp_path / "x").exists()


# ---- precision in the training identity -------------------------------------------------------------

def test_the_training_identity_holds_the_device_type_and_autocast_dtype(
        syn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = splits.open_features(syn_config(syn))
    identity = lambda *o: run_identity(syn_config(syn, *o), cache)
    cpu = identity("device=cpu")
    assert identity("device=cpu", "amp=true") == cpu  # amp does nothing on the CPU (and is the default)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    bf16, fp32_gpu = identity("device=cuda"), identity("device=cuda", "amp=false")
    assert len({cpu, bf16, fp32_gpu}) == 3
    assert identity("device=cuda:1") == bf16  # which GPU does not change the numbers
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # trains in fp32 there
    assert identity("device=cuda") not in (bf16, cpu)
    assert precision.defining("cpu", None) == {}  # what runs made before this key stand for
    assert precision.defining("cuda:0", torch.bfloat16) == {"precision": {"device": "cuda", "autocast": "bfloat16"}}


def test_a_run_finished_on_the_cpu_is_not_taken_as_done_on_a_gpu(
        syn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_cfg = syn_config(syn)
    assert train.main(cpu_cfg) == 0
    done = run_folder(cpu_cfg)
    assert finished(done, run_identity(cpu_cfg, splits.open_features(cpu_cfg)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    gpu_cfg = syn_config(syn, "device=cuda")
    gpu_identity = run_identity(gpu_cfg, splits.open_features(gpu_cfg))
    assert run_folder(gpu_cfg) != done and not finished(done, gpu_identity)
    # nor resumed from the CPU run's last.pt, which names the CPU run
    assert checkpoint.read(done / "last.pt").recipe.identity != gpu_identity


# ---- precision in the features' and predictions' identities ------------------------------------------

def onet_attrs(device: str, *overrides: str) -> dict:
    cfg = features.resolve(load_config("features", overrides=["extractor=onet", *overrides]))
    return features.cache_attrs(cfg, build_extractor("onet"), device)


def test_the_features_hash_holds_the_device_type_and_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = onet_attrs("cpu")["config_hash"]
    # the hash the onet cache had before precision was recorded: CPU parts made then stay current
    assert cpu == "c718cdfef3235d40"
    assert onet_attrs("cpu", "amp=false")["config_hash"] == cpu  # the CPU never autocasts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    bf16, fp32_gpu = onet_attrs("cuda")["config_hash"], onet_attrs("cuda:1", "amp=false")["config_hash"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # fp16 inference there
    fp16 = onet_attrs("cuda:0")["config_hash"]
    assert len({cpu, bf16, fp32_gpu, fp16}) == 4
    assert json.loads(onet_attrs("cuda")["precision"]) == {"device": "cuda", "autocast": "float16"}


def test_a_cache_never_mixes_precisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = tmp_path / "clip.h5"
    cpu = onet_attrs("cpu")
    with h5py.File(part, "w") as f:
        f.attrs.update({**cpu, "complete": True, "source_config_hash": ""})
    assert features.part_status(part, cpu["config_hash"], "") == "done"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert features.part_status(part, onet_attrs("cuda")["config_hash"], "").startswith("stale")


def test_predict_computes_features_in_the_training_features_precision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cfg = load_config("predict", overrides=["device=cuda"])
    on_cpu = checkpoint.Recipe(extractors=["onet"], feature_attrs=[onet_attrs("cpu")])
    older = checkpoint.Recipe(extractors=["onet"], feature_attrs=[{"weights_sha256": "x"}])  # no precision kept
    on_gpu = checkpoint.Recipe(extractors=["onet"], feature_attrs=[onet_attrs("cuda")])
    assert predict.features_amp(cfg, on_cpu) is False and predict.features_amp(cfg, older) is False
    assert predict.features_amp(cfg, on_gpu) is True
    with caplog.at_level("WARNING", logger="pipeline"):
        assert predict.features_amp(load_config("predict", overrides=["device=cpu"]), on_gpu) is True
    assert "trained on features computed in bfloat16 on cuda" in caplog.text
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"video")
    ident = lambda device, amp: predict.prediction_identity(
        load_config("predict", overrides=[f"device={device}"]), video, video, amp)
    assert ident("cpu", True) == ident("cpu", False)  # what predictions made before stand for
    assert len({ident("cpu", True), ident("cuda", True), ident("cuda", False)}) == 3


# ---- recurrent encoders in fp32 -----------------------------------------------------------------------

@pytest.mark.parametrize("encoder", [GRUEncoder, LSTMEncoder])
@pytest.mark.parametrize("carry", [False, True])
def test_recurrent_encoders_compute_in_fp32_under_autocast(encoder: type[nn.Module], carry: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 16)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 30:], mask[2, 5:9] = False, False
    enc = encoder(16, hidden=8, bidirectional=not carry, carry_state=carry).eval()
    reference = enc(x, mask)
    enc.reset_state() if carry else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x, mask)
        bare = enc.rnn(x[..., :8].contiguous())[0] if encoder is LSTMEncoder else None
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    if carry:
        state = enc.state if isinstance(enc.state, tuple) else (enc.state,)
        assert all(s.dtype == torch.float32 for s in state)
    if bare is not None:  # what the wrapper prevents: autocast turns a bare LSTM to bf16 on this CPU
        assert bare.dtype == torch.bfloat16
    assert type(enc).forward.full_precision


# ---- resume and determinism -----------------------------------------------------------------------------

def test_resume_reads_the_checkpoints_on_the_host(syn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading moves each tensor where its parameter is (and keeps Adam's step counts on the host),
    which a map_location of the GPU would not."""
    cfg = syn_config(syn, "lr=0.002")
    assert train.main(cfg) == 0
    out = run_folder(cfg)
    # as if killed before it was marked finished: the same command resumes from last.pt
    (out / "run.json").write_text((out / "run.json").read_text().replace('"finished": true', '"finished": false'))
    reads: list = []
    read = checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda path, device="cpu": reads.append((Path(path).name, str(device)))
                        or read(path, device))
    assert train.main(cfg) == 0
    assert [d for name, d in reads if name == "last.pt"] == ["cpu"], reads


def test_deterministic_training_refuses_an_operation_without_a_deterministic_kernel(
        syn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert train.main(syn_config(syn, "deterministic=true", "lr=0.003")) == 0  # the model's own ops have one
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        with pytest.raises(InputError) as refused:
            train.main(syn_config(syn, "deterministic=true", f"encoder={__name__}:PutEncoder"))
    finally:
        torch.use_deterministic_algorithms(False)
    said = str(refused.value)
    assert "\n" not in said and said.startswith("deterministic=true, but put_ does not have a deterministic")


class PutEncoder(nn.Module):
    """A plug-in encoder that calls ``Tensor.put_``, which has no deterministic kernel."""

    def __init__(self, d_in: int, hidden: int = 8, layers: int = 1) -> None:
        super().__init__()
        self.proj, self.out_dim = nn.Linear(d_in, hidden), hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h + torch.zeros(1).put_(torch.tensor([0]), torch.ones(1)).sum() * 0


# ---- the loop reads the losses back only where it logs ------------------------------------------------

def test_the_loop_logs_every_step_though_it_reads_them_back_in_groups(
        syn: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import training
    from pipeline.distributed import World

    cfg, cpu = syn_config(syn, "batch_size=2"), torch.device("cpu")
    runs = {}
    for every in (1, 3):
        monkeypatch.setattr(loop, "LOG_EVERY", every)
        built = training.build_training(cfg, World(), cpu, splits.open_features(cfg))
        _, groups, optimizer, scheduler = training.enter_stage(cfg, built.model, built.loss_fn, built.stages, 0,
                                                            len(built.loader))
        scalars: list = []
        board = type("Board", (), {"add_scalar": lambda self, *a, into=scalars: into.append(a)})()
        losses = loop.train_epoch(cfg, built.model, built.loader, built.loss_fn, optimizer, scheduler, groups,
                                  built.stages[0], cpu, World(), first_step=10, board=board)
        runs[every] = losses, scalars
    assert len(runs[3][0]) == len(built.loader) > 3 and len(built.loader) % 3  # a last, shorter group
    assert runs[1] == runs[3]  # the same values, for the same steps, in the same order
    assert [v for tag, v, _ in runs[3][1] if tag == "train/loss"] == runs[3][0]
