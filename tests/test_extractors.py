"""Extractor registry, shapes, parameter counts and loading of foreign checkpoints."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from einops import rearrange

from features import EXTRACTORS, build_extractor
from pipeline.config import component_names, load_component

# How each registry entry runs on real crops in test_small_extractors_give_finite_features_from_any_crop_size:
# the arguments that build it, or in TOO_BIG why it does not run (its shapes still run on the meta device).
RUN_ARGS = {
    "fer_xception": dict(random_init=True),
    "iresnet18": dict(random_init=True),
    "onet": dict(),  # the weights shipped with facenet-pytorch
    "vit_tiny": dict(random_init=True),
    "dinov2_vits14": dict(random_init=True),
    "efficientnet_b0": dict(random_init=True),
    "efficientnet_b2": dict(random_init=True),
    **{n: dict(random_init=True) for n in ("enet_b0_8_best_afew", "enet_b0_8_best_vgaf", "enet_b0_8_va_mtl",
                                           "enet_b2_8", "enet_b2_7")},
}
TOO_BIG = {
    "iresnet34": "iresnet18's network with more blocks: seconds more on CPU, nothing new checked",
    "iresnet50": "iresnet18's network with more blocks: seconds more on CPU, nothing new checked",
    "iresnet100": "iresnet18's network with more blocks: seconds more on CPU, nothing new checked",
    "mae_vit_base": "vit_tiny's ViTExtractor at ViT-B width: about 5 s on CPU",
    "mae_vit_large": "vit_tiny's ViTExtractor at ViT-L width: about 20 s and 1.2 GB on CPU",
    "dinov2_vitb14": "dinov2_vits14's TimmExtractor at ViT-B width: seconds on CPU, nothing new checked",
    "dinov3_vitb16": "ViT-B: its family runs at ViT-S in tests/test_timm_backbones.py",
    "convnext_base": "88 M parameters: its family runs as convnext_atto in tests/test_timm_backbones.py",
    "clip_vitb16": "ViT-B/16: its family runs as ViT-B/32 in tests/test_timm_backbones.py",
    "swin_base": "88 M parameters: its family runs as Swin-T in tests/test_timm_backbones.py",
}


def runnable() -> list[str]:
    """The registry entries run on real crops: all but those in TOO_BIG."""
    return sorted(set(EXTRACTORS) - set(TOO_BIG))


def check_tables() -> None:
    """Every registry entry is in exactly one of RUN_ARGS and TOO_BIG, and neither names anything else."""
    missing = sorted(set(EXTRACTORS) - set(RUN_ARGS) - set(TOO_BIG))
    assert not missing, f"add a row to RUN_ARGS (or TOO_BIG, with a reason) in tests/test_extractors.py for {missing}"
    stale = sorted((set(RUN_ARGS) | set(TOO_BIG)) - set(EXTRACTORS))
    assert not stale, f"RUN_ARGS or TOO_BIG name unregistered extractors: {stale}"
    assert not set(RUN_ARGS) & set(TOO_BIG) and all(TOO_BIG.values())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registry_entry_has_a_config_and_vice_versa():
    assert set(component_names("extractor")) == set(EXTRACTORS)


def test_every_registry_entry_runs_or_says_why_not():
    check_tables()


def test_a_new_registry_entry_is_collected_and_needs_a_row(monkeypatch):
    """A registered extractor joins the parametrised tests and fails the table check until it has a row."""
    monkeypatch.setitem(EXTRACTORS, "dummy", EXTRACTORS["fer_xception"])
    assert "dummy" in runnable()
    with pytest.raises(AssertionError, match=r"add a row to RUN_ARGS .*\['dummy'\]"):
        check_tables()
    with pytest.raises(pytest.fail.Exception, match="'dummy' has no row: add one to RUN_ARGS or TOO_BIG"):
        run_args("dummy")
    monkeypatch.setitem(TOO_BIG, "dummy", "a test entry")
    check_tables()
    assert "dummy" not in runnable()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="iresnet50.*onet"):
        build_extractor("resnet9000")


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_builds_from_its_config_with_declared_shape(name):
    cfg = load_component("extractor", name)
    cfg.pop("name")
    cfg["random_init"] = True
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = build_extractor(name, **cfg)
        channels = model.describe().get("channels", 3)  # 1 for a grey network
        out = model(torch.empty(2, channels, model.input_size, model.input_size))
    assert out.shape == (2, model.dim)
    info = model.describe()
    assert info["input_size"] == model.input_size and info["dim"] == model.dim
    assert len(info["mean"]) == len(info["std"]) == 3 and info["channel_order"] in ("RGB", "BGR")


def run_args(name: str) -> dict:
    """The arguments that build registry entry ``name`` for a run on real crops."""
    if name not in RUN_ARGS:
        pytest.fail(f"extractor {name!r} has no row: add one to RUN_ARGS or TOO_BIG in tests/test_extractors.py",
                    pytrace=False)
    return RUN_ARGS[name]


@pytest.mark.parametrize("name", runnable())
def test_small_extractors_give_finite_features_from_any_crop_size(name):
    torch.manual_seed(0)
    model = build_extractor(name, **run_args(name))
    crops = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8)
    x = model.preprocess(crops)
    channels = model.describe().get("channels", 3)
    assert x.shape == (2, channels, model.input_size, model.input_size) and x.dtype == torch.float32
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, model.dim) and torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # different crops, different features


# insightface's model zoo; timm's ViT-B/16 86.6 M and ViT-L/16 304.3 M less their 1000-class heads
@pytest.mark.parametrize(("name", "millions"), [("iresnet50", 43.6), ("iresnet100", 65.2),
                                                 ("mae_vit_base", 85.8), ("mae_vit_large", 303.3)])
def test_parameter_counts_match_the_published_models(name, millions):
    with torch.device("meta"):
        model = build_extractor(name, random_init=True)
    assert round(n_params(model) / 1e6, 1) == millions


@pytest.mark.parametrize("name", ["iresnet18", "mae_vit_base"])
def test_refuses_to_run_without_weights(name):
    with pytest.raises(ValueError, match="random_init=true"):
        build_extractor(name)


def insightface_keys(layers: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names/shapes of arcface_torch's ``IResNet`` state dict."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    keys["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    keys["prelu.weight"] = (64,)
    cin = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            bn(f"{p}.bn1", cin)
            keys[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.prelu.weight"] = (planes,)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if j == 0:  # every stage starts with stride 2, hence a projection shortcut
                keys[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                bn(f"{p}.downsample.1", planes)
            cin = planes
    bn("bn2", 512)
    keys["fc.weight"], keys["fc.bias"] = (512, 512 * 7 * 7), (512,)
    bn("features", 512)
    return keys


@pytest.mark.parametrize(("name", "layers"), [("iresnet18", (2, 2, 2, 2)), ("iresnet50", (3, 4, 14, 3))])
def test_iresnet_state_dict_layout_is_insightface(name, layers):
    with torch.device("meta"):
        model = build_extractor(name, random_init=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == insightface_keys(layers)


def test_insightface_backbone_pth_loads_strictly_and_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    source = build_extractor("iresnet18", random_init=True)
    with torch.no_grad():  # non-trivial BN statistics, so a skipped buffer would show
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "backbone.pth"
    torch.save({k: v.clone() for k, v in source.state_dict().items()}, path)  # a plain state dict

    loaded = build_extractor("iresnet18", weights=str(path))
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    crops = torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8)
    with torch.inference_mode():
        x = loaded.preprocess(crops)
        assert x.min() >= -1 and x.max() <= 1  # ArcFace's [-1, 1] input
        torch.testing.assert_close(loaded(x), source(x))

    state = torch.load(path, weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({**state, "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        build_extractor("iresnet18", weights=str(bad))
    del state["fc.bias"]
    torch.save(state, bad)
    with pytest.raises(ValueError, match="missing keys: fc.bias"):
        build_extractor("iresnet18", weights=str(bad))


def mae_checkpoint(timm_state: dict[str, torch.Tensor], embed: int) -> dict:
    """The official MAE checkpoint layout: ``{"model": ...}`` with decoder and mask token."""
    dec = 32
    extra = {
        "mask_token": torch.randn(1, 1, dec),
        "decoder_embed.weight": torch.randn(dec, embed), "decoder_embed.bias": torch.zeros(dec),
        "decoder_pos_embed": torch.randn(1, 101, dec),
        "decoder_blocks.0.norm1.weight": torch.ones(dec),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dec, dec),
        "decoder_norm.weight": torch.ones(dec), "decoder_pred.weight": torch.randn(16 * 16 * 3, dec),
    }
    return {"model": {**timm_state, **extra}, "epoch": 799}


@pytest.mark.parametrize("fc_norm", [False, True], ids=["pretrain", "finetuned"])
def test_mae_checkpoint_loads_and_matches_timm(tmp_path, fc_norm):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    # trained at 160x160 (10x10 patches): the 224x224 model needs interpolated position embeddings
    kw = dict(num_classes=0, global_pool="avg", fc_norm=fc_norm)
    trained = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=160, **kw)
    state = trained.state_dict()
    if fc_norm:  # a fine-tuned MAE model also carries its classifier
        state.update({"head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)})
    path = tmp_path / "mae.pth"
    torch.save(mae_checkpoint(state, 192), path)

    model = build_extractor("vit_tiny", weights=str(path))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    timm_state = {k: v for k, v in state.items() if not k.startswith("head.")}
    reference.load_state_dict(checkpoint_filter_fn(timm_state, reference))

    crops = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        x = model.preprocess(crops)
        torch.testing.assert_close(model(x), reference(x))
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def mae_save_model(path, model: torch.nn.Module) -> None:
    """A checkpoint as MAE's own training script writes one (``util/misc.py`` ``save_model``):
    the weights beside the optimiser and scaler states, the epoch and the run's ``args``."""
    import argparse

    args = argparse.Namespace(  # main_pretrain.py's get_args_parser() defaults
        batch_size=64, epochs=400, accum_iter=1, model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
        norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=1,
        local_rank=-1, dist_on_itp=False, dist_url="env://", distributed=False)
    tuned = [model.cls_token, model.pos_embed]  # an optimiser's state, kept small: two tensors' moments
    optimizer = torch.optim.AdamW(tuned, lr=1.5e-4, betas=(0.9, 0.95))
    sum(p.sum() for p in tuned).backward()
    optimizer.step()
    to_save = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 399,
               "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}
    torch.save(to_save, path)


def test_a_checkpoint_saved_as_maes_training_script_saves_it_loads(tmp_path):
    import os

    import timm

    trained = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg")
    path = tmp_path / "checkpoint-399.pth"
    mae_save_model(path, trained)
    model = build_extractor("mae_vit_base", weights=str(path))
    crops = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        x = model.preprocess(crops)
        torch.testing.assert_close(model(x), trained.eval()(x))

    bad = tmp_path / "with_code.pth"  # anything else that needs a global to load would run code
    torch.save({"model": {}, "hook": os.system}, bad)
    with pytest.raises(ValueError, match=r"with_code.pth: refused: loading it would run code \(the global "
                                         r"(posix|nt).system\)") as refused:
        build_extractor("mae_vit_base", weights=str(bad))
    assert "\n" not in str(refused.value)


def test_vit_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    path = tmp_path / "short.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(ValueError, match="missing keys: blocks.10"):
        build_extractor("vit_tiny", weights=str(path))


def test_onet_features_are_the_hidden_layer_mtcnn_uses():
    from facenet_pytorch.models.mtcnn import ONet
    from facenet_pytorch.models.utils.detect_face import imresample

    model = build_extractor("onet")
    assert model.weights_sha256 is not None
    reference = ONet(pretrained=True).eval()
    crops = torch.randint(0, 256, (4, 96, 80, 3), dtype=torch.uint8)
    with torch.inference_mode():
        x = model.preprocess(crops)
        # MTCNN's own resampling and normalisation of a box before the O-net
        mtcnn_x = (imresample(crops.permute(0, 3, 1, 2).float(), (48, 48)) - 127.5) * 0.0078125
        torch.testing.assert_close(x, mtcnn_x)
        boxes, points, probs = reference(x)
        h = model(x)
        assert h.shape == (4, 256)
        n = model.net
        torch.testing.assert_close(n.dense6_2(h), boxes)
        torch.testing.assert_close(n.dense6_3(h), points)
        torch.testing.assert_close(n.softmax6_1(n.dense6_1(h)), probs)


def test_resizing_matches_pil_on_8_bit_images():
    """ViT crops stored at 112 are upsampled to 224 as PIL's bicubic would (timm's own pipeline)."""
    from PIL import Image

    model = build_extractor("vit_tiny", random_init=True)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (2, 14, 14, 3), dtype=np.uint8)
    crops = np.stack([np.asarray(Image.fromarray(c).resize((112, 112), Image.BILINEAR)) for c in coarse])
    expected = np.stack([np.asarray(Image.fromarray(c).resize((224, 224), Image.BICUBIC)) for c in crops])
    x = model.preprocess(torch.from_numpy(crops))
    std, mean = torch.tensor(model.std).view(1, 3, 1, 1), torch.tensor(model.mean).view(1, 3, 1, 1)
    pixels = np.round(rearrange(x * std + mean, "b c h w -> b h w c").numpy())
    # 8-bit kernels follow PIL's fixed-point sums; resizing floats would miss about a fifth of the pixels
    assert np.abs(pixels - expected).max() <= 1 and (pixels != expected).mean() < 0.01
    assert model.describe()["resize_precision"] == "uint8"
