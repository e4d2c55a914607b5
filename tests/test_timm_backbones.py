"""Any timm backbone as an extractor: weights that timm itself wrote (random init, as safetensors
and as a state dict) load strictly, and the features equal timm's own ``forward_features`` plus
the model's pooling (``forward_head(..., pre_logits=True)``) of a model timm loaded from the same
file, on the same input; the preprocessing is timm's pretrained configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from features import EXTRACTORS, build_extractor
from pipeline.config import load_component

# A shipped YAML -> what the test builds: the YAML's own timm model, the larger ones with fewer
# blocks (``model_args``, as a user's YAML may set them), the same code and layout otherwise.
FAMILIES = {
    "dinov2_vits14": {"depth": 2},
    "dinov3_vitb16": {"depth": 2},
    "convnext_base": {"depths": (1, 1, 1, 1)},
    "clip_vitb16": {"depth": 2},
    "swin_base": {"depths": (1, 1, 1, 1)},
    "efficientnet_b0": {},
}
SHIPPED_TIMM = ("dinov2_vits14", "dinov2_vitb14", "dinov3_vitb16", "convnext_base", "clip_vitb16", "swin_base",
                "efficientnet_b0", "efficientnet_b2")


def test_every_shipped_timm_yaml_is_a_registered_extractor() -> None:
    for name in SHIPPED_TIMM:
        assert name in EXTRACTORS and load_component("extractor", name)["timm"]
    assert set(FAMILIES) | {"dinov2_vitb14", "efficientnet_b2"} == set(SHIPPED_TIMM)


def timm_reference(arch: str, path: Path, input_size: int | None, model_args: dict) -> torch.nn.Module:
    """The model as timm itself loads the file (its own filter and position-embedding resampling)."""
    import timm

    kw = {"img_size": input_size} if input_size and "vit" in arch else {}
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw,
                             **model_args).eval()


@pytest.fixture
def registry():
    """The extractor registry as it was before the test (a user's YAML registers its name)."""
    saved = dict(EXTRACTORS)
    yield
    EXTRACTORS.clear()
    EXTRACTORS.update(saved)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_weights_load_strictly_and_give_timms_own_features(name: str, tmp_path: Path, monkeypatch,
                                                                registry) -> None:
    import timm
    from safetensors.torch import save_file

    shipped = load_component("extractor", name)
    arch, model_args = shipped["timm"], FAMILIES[name]
    if model_args:  # the user's own YAML: the shipped one with fewer blocks
        (tmp_path / "configs" / "features").mkdir(parents=True)
        keys = {k: v for k, v in shipped.items() if k != "name"} | {"model_args": model_args}
        (tmp_path / "configs" / "features" / f"small_{name}.yaml").write_text(yaml.safe_dump(keys))
        monkeypatch.setenv("AFFECT_CONFIG_DIR", str(tmp_path / "configs"))
        name = f"small_{name}"
    torch.manual_seed(0)
    trained = timm.create_model(arch, pretrained=False, **model_args)  # with its classifier, as published
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    crops = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8)
    for path in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
        model = build_extractor(name, weights=str(path))
        reference = timm_reference(arch, path, shipped.get("input_size"), model_args)
        with torch.inference_mode():
            x = model.preprocess(crops)
            want = reference.forward_head(reference.forward_features(x), pre_logits=True)
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        assert model.dim == want.shape[1] == reference.num_features
    # the preprocessing is timm's own pretrained configuration, and gives its PIL transform's pixels
    data = timm.data.resolve_model_data_config(reference)
    info = model.describe()
    assert info["input_size"] == (shipped.get("input_size") or data["input_size"][-1])
    np.testing.assert_allclose(info["mean"], np.asarray(data["mean"]) * 255)
    np.testing.assert_allclose(info["std"], np.asarray(data["std"]) * 255)
    assert info["interpolation"] == data["interpolation"] and info["crop_pct"] == pytest.approx(data["crop_pct"])
    from PIL import Image

    rng = np.random.default_rng(0)  # smooth images, as face crops are (noise would test the kernels' tails)
    smooth = np.stack([np.asarray(Image.fromarray(c).resize((112, 112), Image.BILINEAR))
                       for c in rng.integers(0, 256, (2, 14, 14, 3), dtype=np.uint8)])
    transform = timm.data.create_transform(**{**data, "input_size": (3, info["input_size"], info["input_size"])})
    theirs = torch.stack([transform(Image.fromarray(c)) for c in smooth])
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    ours = model.preprocess(torch.from_numpy(smooth))
    grey = ((ours - theirs) * std * 255).abs()  # the difference in grey levels
    assert grey.max() <= 2.01 and (grey > 0.5).float().mean() < 0.02, (grey.max(), (grey > 0.5).float().mean())


def test_a_timm_yaml_refuses_weights_of_another_model(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "other.bin"
    torch.save(timm.create_model("efficientnet_b2", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"other.bin: weights do not fit .*shape mismatch"):
        build_extractor("efficientnet_b0", weights=str(path))
