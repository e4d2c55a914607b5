"""The GPU path on a real CUDA device: ``pytest -m gpu`` (``make test-gpu``) on a machine with one.

Without a CUDA device these tests are left out of the run, and the summary says so;
``tests/test_gpu_path.py`` checks on the CPU what can be checked there (identities, devices
per process, the fp32 recurrent encoders under a CPU autocast). Here the same claims meet CUDA's
own kernels and autocast rules.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from features import build_extractor
from models.gru import GRUEncoder
from models.lstm import LSTMEncoder
from pipeline import checkpoint, features, precision, splits, train
from pipeline.config import load_config
from pipeline.identity import run_folder, run_identity
from pipeline.runs import local_device
from tests.test_gpu_path import syn, syn_config  # noqa: F401 - syn is a fixture

pytestmark = pytest.mark.gpu  # left out of the run where torch sees no CUDA device (tests/conftest.py)


@pytest.mark.parametrize("encoder", [GRUEncoder, LSTMEncoder])
@pytest.mark.parametrize("carry", [False, True])
def test_recurrent_encoders_stay_fp32_inside_cuda_autocast(encoder: type[nn.Module], carry: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 16, device="cuda")
    mask = torch.ones(3, 40, dtype=torch.bool, device="cuda")
    mask[1, 30:] = False
    enc = encoder(16, hidden=8, bidirectional=not carry, carry_state=carry).cuda().eval()
    with torch.inference_mode():
        reference = enc(x, mask)
        enc.reset_state() if carry else None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc(x, mask)
            bare = nn.GRU(16, 8, batch_first=True).cuda()(x)[0]  # what the rule does to a bare cuDNN RNN
    assert bare.dtype == torch.float16  # the premise: cuDNN RNNs autocast to fp16, even under bf16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    if carry:
        state = enc.state if isinstance(enc.state, tuple) else (enc.state,)
        assert all(s.dtype == torch.float32 for s in state)


def test_adam_step_counters_stay_on_the_host_when_read_as_training_reads_last_pt() -> None:
    model = nn.Linear(4, 2).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4, device="cuda")).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)

    def restored(map_location: str) -> dict:
        buffer.seek(0)
        fresh = torch.optim.AdamW(model.parameters())
        fresh.load_state_dict(torch.load(buffer, map_location=map_location, weights_only=True))
        return next(iter(fresh.state.values()))

    on_host = restored("cpu")  # how pipeline.train reads last.pt
    assert on_host["step"].device.type == "cpu" and on_host["exp_avg"].device.type == "cuda"
    assert restored("cuda")["step"].device.type == "cuda"  # the premise: read onto the GPU, every step syncs


def test_training_on_cuda_is_its_own_run_and_repeats_bitwise(syn: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    runs, weights = [], []
    for k in range(2):
        cfg = syn_config(syn, "device=cuda", "deterministic=true", f"out_dir={tmp_path / f'run{k}'}")
        assert train.main(cfg) == 0
        records = [json.loads(line) for line in (tmp_path / f"run{k}" / "metrics.jsonl").read_text().splitlines()]
        runs.append([{key: v for key, v in r.items() if not key.endswith("seconds")} for r in records])  # clocks
        weights.append(checkpoint.read(tmp_path / f"run{k}" / "best.pt").model.state_dict)
    assert runs[0] == runs[1] and len(runs[0]) == 2
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    cpu = syn_config(syn)
    gpu = syn_config(syn, "device=cuda")
    cache = splits.open_features(cpu)
    assert run_identity(cpu, cache) != run_identity(gpu, cache) and run_folder(cpu) != run_folder(gpu)
    scores = json.loads((tmp_path / "run0" / "scores.json").read_text())
    assert scores["p_mtl"] == scores["p_mtl"]  # a number, not NaN


def test_features_on_cuda_compute_in_bf16_close_to_the_cpu_and_name_their_precision() -> None:
    torch.manual_seed(0)
    net = build_extractor("onet").eval()
    crops = torch.randint(0, 256, (16, net.input_size, net.input_size, 3), dtype=torch.uint8)
    with torch.inference_mode():
        cpu = net(net.preprocess(crops))
        net.cuda()
        dtype = precision.autocast_dtype("cuda", True)
        with torch.autocast("cuda", dtype=dtype):
            gpu = net(net.preprocess(crops.cuda())).float().cpu()
    assert dtype == torch.bfloat16  # every GPU this project targets has bf16
    assert nn.functional.cosine_similarity(cpu, gpu).min() > 0.99
    cfg = features.resolve(load_config("features", overrides=["extractor=onet"]))
    attrs = features.cache_attrs(cfg, net, "cuda")
    assert json.loads(attrs["precision"]) == {"device": "cuda", "autocast": "bfloat16"}
    assert attrs["config_hash"] != features.cache_attrs(cfg, net, "cpu")["config_hash"]


def test_a_process_of_a_launch_takes_its_local_gpu() -> None:
    seen = torch.cuda.device_count()
    for env, expected in (({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "cuda:0"),
                          ({"SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, f"cuda:{1 % seen}")):
        assert local_device("cuda", env) == expected
        torch.zeros(1, device=expected)  # a device this machine has
