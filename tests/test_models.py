"""Temporal encoders, task structures and heads: masks, shapes, overfitting, checkpoint round trip."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from models import ENCODERS, STRUCTURES, MultiTaskLoss, MultiTaskModel, build_encoder, encoder_from, encoder_options
from models.cross_task import AUGraph, au_cooccurrence
from pipeline.config import ConfigError, component_names, load_component, load_config

torch.set_num_threads(1)
D_IN = 16

# One small config per registry entry: every registry test runs it, and check_tables fails for an
# entry without a row here.
SMALL = {
    "transformer": dict(hidden=32, layers=2, heads=4, dropout=0.0),
    "lstm": dict(hidden=24, layers=2, bidirectional=True, dropout=0.0),
    "gru": dict(hidden=24, layers=2, bidirectional=True, dropout=0.0),
    "tcn": dict(hidden=24, layers=3, kernel=3, dropout=0.0),
    "frame": dict(hidden=24, layers=2, dropout=0.0),
    "none": dict(),
}
# Other settings of the registered encoders, held to the same mask contract.
VARIANTS = {
    "transformer_learned": dict(
        name="transformer", hidden=32, layers=2, heads=4, positions="learned", max_len=64, dropout=0.0
    ),
    "transformer_window": dict(name="transformer", hidden=32, layers=2, heads=4, window=3, dropout=0.0),
    "lstm_uni": dict(name="lstm", hidden=24, layers=1, bidirectional=False, dropout=0.0),
    "gru_uni": dict(name="gru", hidden=24, layers=2, bidirectional=False, dropout=0.0),
    "tcn_causal": dict(name="tcn", hidden=24, layers=3, kernel=3, causal=True, dropout=0.0),
}
NOT_TRAINABLE = {"none": "linear heads on the raw features have nothing to memorise with"}


def small(name: str) -> dict:
    """The small config of registry entry ``name``, as an encoder spec."""
    if name not in SMALL:
        pytest.fail(f"encoder {name!r} has no small config: add a row for it to SMALL in tests/test_models.py",
                    pytrace=False)
    return {"name": name, **SMALL[name]}


def encoder_cases() -> list[str]:
    """Every registry entry, then every extra variant: the ids of the mask tests."""
    return sorted(ENCODERS) + list(VARIANTS)


def encoder_spec(case: str) -> dict:
    """The spec of a mask-test case: a variant, or a registry entry's small config."""
    return VARIANTS[case] if case in VARIANTS else small(case)


def trainable() -> list[str]:
    """The registry entries the overfit test trains: all but the explicit exclusions."""
    return sorted(set(ENCODERS) - set(NOT_TRAINABLE))


def check_tables() -> None:
    """SMALL has a row for exactly the registry entries; the other tables name only registry entries."""
    missing, stale = sorted(set(ENCODERS) - set(SMALL)), sorted(set(SMALL) - set(ENCODERS))
    assert not missing, f"add a row to SMALL in tests/test_models.py for each new encoder: {missing}"
    assert not stale, f"SMALL has rows for encoders that are not registered: {stale}"
    unknown = sorted(set(NOT_TRAINABLE) - set(ENCODERS))
    assert not unknown and all(NOT_TRAINABLE.values()), f"NOT_TRAINABLE: unregistered {unknown}, or a reason left empty"
    assert not set(VARIANTS) & set(ENCODERS), "a variant name would hide a registry entry's id"
    assert {v["name"] for v in VARIANTS.values()} <= set(ENCODERS)


class TinyEncoder(nn.Module):
    """A plug-in encoder kept to the contract: one linear map per frame, zero at invalid steps."""

    def __init__(self, d_in: int, hidden: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask.bool()[..., None]
        return torch.where(valid, self.proj(torch.where(valid, x, 0.0)), 0.0)


class NoOutDim(nn.Module):
    """A plug-in that breaks the contract: nothing says how wide its output is."""

    def __init__(self, d_in: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


PLUGIN = f"{__name__}:TinyEncoder"  # the name pytest imported this file under, so no second import


def holey_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(5, 20, D_IN) features and a mask with trailing padding, inner holes, a leading gap,
    a fully valid and a fully invalid sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 20, D_IN, generator=g)
    mask = torch.ones(5, 20, dtype=torch.bool)
    mask[0, 14:] = False  # trailing padding
    mask[1, 3:6] = mask[1, 11] = False  # missing faces inside
    mask[2, :4] = mask[2, 9:17] = False  # leading gap, a gap longer than the local window
    mask[4] = False  # no face at all
    return x, mask


def scramble_invalid(x: torch.Tensor, mask: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    """Replace every invalid step by large noise (or ``fill``)."""
    y = x.clone()
    noise = 100 * torch.randn_like(x) if fill is None else torch.full_like(x, fill)
    y[~mask] = noise[~mask]
    return y


def test_every_encoder_has_a_small_config():
    check_tables()


def test_a_new_registry_entry_is_collected_and_needs_a_small_config(monkeypatch):
    """A registered encoder joins the parametrised tests, fails until SMALL has its row, then keeps the contract."""
    monkeypatch.setitem(ENCODERS, "dummy", TinyEncoder)
    assert "dummy" in encoder_cases() and "dummy" in trainable()
    with pytest.raises(AssertionError, match=r"add a row to SMALL .*\['dummy'\]"):
        check_tables()
    with pytest.raises(pytest.fail.Exception, match="'dummy' has no small config: add a row for it to SMALL"):
        small("dummy")
    monkeypatch.setitem(SMALL, "dummy", dict(hidden=8))
    check_tables()
    test_encoder_honours_mask("dummy")
    test_trailing_padding_is_invisible("dummy")


def test_build_encoder_errors_name_the_choices():
    with pytest.raises(ValueError, match="choose one of none, frame, gru, .*transformer or give a plug-in"):
        build_encoder("wavenet", D_IN)
    with pytest.raises(ValueError, match="hiden"):
        build_encoder("gru", D_IN, hiden=8)
    with pytest.raises(ValueError, match="no 'name'"):
        encoder_from({"hidden": 8}, D_IN)


@pytest.mark.parametrize("case", encoder_cases())
def test_encoder_honours_mask(case):
    torch.manual_seed(0)
    enc = encoder_from(encoder_spec(case), D_IN).eval()
    x, mask = holey_batch()
    with torch.no_grad():
        ref = enc(x, mask)
        noisy = enc(scramble_invalid(x, mask), mask)
        nan = enc(scramble_invalid(x, mask, float("nan")), mask)
        changed = enc(x + torch.randn_like(x) * mask[..., None], mask)
    assert ref.shape == (5, 20, enc.out_dim)
    assert torch.isfinite(ref).all() and torch.isfinite(noisy).all() and torch.isfinite(nan).all()
    torch.testing.assert_close(noisy[mask], ref[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nan[mask], ref[mask], atol=1e-5, rtol=1e-5)
    # The valid steps do carry information: changing them changes the outputs.
    assert (changed[mask] - ref[mask]).abs().max() > 1e-3


@pytest.mark.parametrize("case", encoder_cases())
def test_trailing_padding_is_invisible(case):
    """A sequence padded to a longer batch gives the same outputs as the sequence alone: padding
    takes no attention weight and no recurrent step (zeroed input is not enough for either)."""
    torch.manual_seed(0)
    enc = encoder_from(encoder_spec(case), D_IN).eval()
    x, mask = holey_batch()
    alone_x, alone_mask = x[1:2, :13], mask[1:2, :13]  # holes inside, no padding
    padded_mask = torch.zeros(1, 20, dtype=torch.bool)
    padded_mask[:, :13] = alone_mask
    with torch.no_grad():
        alone = enc(alone_x, alone_mask)
        padded = enc(x[1:2], padded_mask)
    torch.testing.assert_close(padded[:, :13][alone_mask], alone[alone_mask], atol=1e-5, rtol=1e-5)


def moved_by_a_change(enc: torch.nn.Module, steps: int, at: int) -> torch.Tensor:
    """(steps,) bool: the outputs of ``enc`` that move when the input at step ``at`` changes."""
    x, mask = torch.randn(1, steps, D_IN), torch.ones(1, steps, dtype=torch.bool)
    y = x.clone()
    y[0, at] += 5.0
    with torch.no_grad():
        a, b = enc(x, mask), enc(y, mask)
    return (a - b).abs().amax(-1)[0] > 1e-6


def test_local_window_limits_context():
    torch.manual_seed(0)
    enc = build_encoder("transformer", D_IN, hidden=16, layers=1, heads=2, window=2, dropout=0.0).eval()
    moved = moved_by_a_change(enc, 12, 8)
    assert moved.tolist() == [i in range(6, 11) for i in range(12)]  # one layer: |i - 8| <= 2


@pytest.mark.parametrize("causal", [False, True])
def test_tcn_reaches_its_receptive_field_exactly(causal):
    """A change at step 20 moves the outputs 1 + 2 x (1 + 2 + 4) = 15 steps wide: centred on it, or
    (causal) starting at it, so no earlier output ever moves."""
    torch.manual_seed(0)
    enc = build_encoder("tcn", D_IN, hidden=16, layers=3, kernel=3, causal=causal, dropout=0.0).eval()
    moved = moved_by_a_change(enc, 40, 20)
    reach = range(20, 35) if causal else range(13, 28)
    assert moved.tolist() == [i in reach for i in range(40)]
    assert enc.receptive_field == int(moved.sum()) == 15


# Each structure's own options at a small size (a structure refuses another's options).
STRUCTURE_OPTIONS = {"cross_attention": dict(au_dim=8, attn_heads=2, au_graph="learned")}


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_structure_shapes_finite_and_masked(structure, encoder):
    torch.manual_seed(0)
    model = MultiTaskModel(D_IN, small(encoder), structure=structure, **STRUCTURE_OPTIONS.get(structure, {})).eval()
    x, mask = holey_batch()
    with torch.no_grad():
        out = model(x, mask)
        noisy = model(scramble_invalid(x, mask), mask)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "va": (5, 20, 2),
        "expr": (5, 20, 8),
        "au": (5, 20, 12),
    }
    for task, value in out.items():
        assert torch.isfinite(value).all() and torch.isfinite(noisy[task]).all()
        torch.testing.assert_close(noisy[task][mask], value[mask], atol=1e-5, rtol=1e-5)
    assert out["va"].abs().max() <= 1.0


def test_task_subsets_and_structure_requirements():
    x, mask = holey_batch()
    enc = small("gru")
    assert list(MultiTaskModel(D_IN, enc, tasks=["expr"])(x, mask)) == ["expr"]
    assert list(MultiTaskModel(D_IN, enc, tasks=["au", "va"], structure="task_specific")(x, mask)) == [
        "va",
        "au",
    ]
    assert list(MultiTaskModel(D_IN, enc, tasks=["va"], structure="feedback")(x, mask)) == ["va"]
    assert list(MultiTaskModel(D_IN, enc, tasks=["au"], structure="cross_attention", au_dim=8)(x, mask)) == [
        "au"
    ]
    with pytest.raises(ValueError, match="needs the va task"):
        MultiTaskModel(D_IN, enc, tasks=["expr", "au"], structure="feedback")
    with pytest.raises(ValueError, match="needs the au task"):
        MultiTaskModel(D_IN, enc, tasks=["va", "expr"], structure="cross_attention")
    with pytest.raises(ValueError, match="subset of va, expr, au"):
        MultiTaskModel(D_IN, enc, tasks=["pain"])
    with pytest.raises(ValueError, match="shared, task_specific"):
        MultiTaskModel(D_IN, enc, structure="tower")


def test_feedback_arousal_does_not_train_valence_or_au_branches():
    torch.manual_seed(0)
    model = MultiTaskModel(D_IN, small("lstm"), structure="feedback")
    x, mask = holey_batch()
    model(x, mask)["va"][..., 1].sum().backward()  # arousal only
    net = model.net

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(net.branches["valence"]) == 0 and grad_norm(net.branches["au"]) == 0
    assert grad_norm(net.branches["arousal"]) > 0 and grad_norm(net.bottom) > 0
    model.zero_grad()
    model(x, mask)["va"][..., 0].sum().backward()  # valence trains its own branch
    assert grad_norm(net.branches["valence"]) > 0 and grad_norm(net.branches["arousal"]) == 0


def test_au_cooccurrence_and_given_graph():
    rng = np.random.default_rng(0)
    au = rng.integers(-1, 2, size=(200, 12))
    rel = au_cooccurrence(au)
    for i, j in [(0, 1), (3, 3), (11, 4)]:
        rows = [r for r in au if r[i] == 1 and r[j] >= 0]
        assert rel[i, j] == pytest.approx(sum(r[j] == 1 for r in rows) / len(rows), abs=1e-6)
    graph = AUGraph(8, rel)
    a = graph.adjacency()
    torch.testing.assert_close(a, a.T)
    assert (a > 0).all()  # self loops and a dense co-occurrence
    with pytest.raises(ValueError, match="12x12"):
        AUGraph(8, np.ones((11, 12)))
    with pytest.raises(ValueError, match="learned"):
        AUGraph(8, "random")


@pytest.mark.parametrize(
    "structure,encoder,graph",
    [
        ("shared", "transformer_learned", None),
        ("task_specific", "lstm", None),
        ("feedback", "gru_uni", None),
        ("cross_attention", "transformer_window", "given"),
        ("cross_attention", "gru", "learned"),
    ],
)
def test_args_round_trip(structure, encoder, graph):
    torch.manual_seed(0)
    if graph == "given":
        graph = au_cooccurrence(np.random.default_rng(0).integers(0, 2, size=(50, 12)))
    own = dict(au_dim=8, attn_heads=2, au_graph=graph) if structure == "cross_attention" else {}
    model = MultiTaskModel(D_IN, encoder_spec(encoder), structure=structure, head_hidden=8, **own).eval()
    buf = io.BytesIO()
    torch.save({"args": model.args, "state": model.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    args = json.loads(json.dumps(saved["args"]))  # plain builtins only
    clone = MultiTaskModel.from_args(args)
    clone.load_state_dict(saved["state"])
    clone.eval()
    x, mask = holey_batch(1)
    with torch.no_grad():
        a, b = model(x, mask), clone(x, mask)
    assert a.keys() == b.keys()
    for task in a:
        assert torch.equal(a[task], b[task])


def numpy_ccc(p: np.ndarray, y: np.ndarray) -> float:
    cov = np.mean((p - p.mean()) * (y - y.mean()))
    return 2 * cov / (p.var() + y.var() + (p.mean() - y.mean()) ** 2)


@pytest.mark.parametrize("encoder", trainable())
def test_encoder_overfits_one_batch(encoder):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, D_IN, generator=g)
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[1, 25:] = mask[2, 5:8] = False
    targets = {
        "va": torch.rand(4, 32, 2, generator=g) * 1.6 - 0.8,
        "expr": torch.randint(0, 8, (4, 32), generator=g),
        "au": torch.randint(0, 2, (4, 32, 12), generator=g),
    }
    model = MultiTaskModel(D_IN, {**small(encoder), "hidden": 32})
    loss_fn = MultiTaskLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss, _ = loss_fn(model(x, mask), targets, mask)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x, mask)
    m = mask.numpy()
    va, va_true = out["va"].numpy()[m], targets["va"].numpy()[m]
    assert min(numpy_ccc(va[:, k], va_true[:, k]) for k in range(2)) > 0.95
    assert (out["expr"].argmax(-1)[mask] == targets["expr"][mask]).float().mean() > 0.98
    assert ((out["au"] > 0).long()[mask] == targets["au"][mask]).float().mean() > 0.98


def test_encoder_configs_build_with_comparable_sizes():
    names = component_names("encoder")
    assert set(ENCODERS) <= set(names)
    sizes = {}
    for name in names:
        enc = encoder_from(load_component("encoder", name), 512).eval()
        x, mask = holey_batch()
        with torch.no_grad():
            out = enc(torch.nn.functional.pad(x, (0, 512 - D_IN)), mask)
        assert out.shape == (5, 20, enc.out_dim) and torch.isfinite(out).all()
        sizes[name] = sum(p.numel() for p in enc.parameters())
        if name == "tcn":
            assert enc.receptive_field == 127  # as tcn.yaml states
    temporal = {name: n for name, n in sizes.items() if n}  # `none` has no parameters; `frame` is sized alike
    assert sizes["none"] == 0 and len(temporal) == len(sizes) - 1
    assert max(temporal.values()) / min(temporal.values()) < 1.25, sizes


def test_plugin_encoder_from_the_command_line_builds_and_trains(tmp_path):
    cfg = load_config("train", overrides=[f"encoder={PLUGIN}"])
    assert cfg.encoder.to_dict() == {"hidden": 8, "name": PLUGIN}  # its options, from its signature
    assert load_config("train", overrides=[f"encoder={PLUGIN}", "encoder.hidden=6"]).encoder.hidden == 6
    with pytest.raises(ConfigError, match="unknown config key 'encoder.layers'"):
        load_config("train", overrides=[f"encoder={PLUGIN}", "encoder.layers=2"])
    (tmp_path / "run.yaml").write_text(f"encoder: {{name: '{PLUGIN}', hidden: 4}}\n")
    assert load_config("train", tmp_path / "run.yaml", ["encoder.hidden=6"]).encoder.hidden == 6  # or a file
    assert encoder_options(PLUGIN) == {"hidden"}
    x, mask = holey_batch()
    g = torch.Generator().manual_seed(1)
    targets = {"va": torch.rand(5, 20, 2, generator=g) - 0.5, "expr": torch.randint(0, 8, (5, 20), generator=g),
               "au": torch.randint(0, 2, (5, 20, 12), generator=g)}
    for structure in ("shared", "task_specific"):  # task branches look up the plug-in's options
        torch.manual_seed(0)
        model = MultiTaskModel(D_IN, {**cfg.encoder, "hidden": 6}, structure=structure)
        plugins = [m for m in model.modules() if isinstance(m, TinyEncoder)]
        before = [m.proj.weight.detach().clone() for m in plugins]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _ = MultiTaskLoss()(model(x, mask), targets, mask)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and len(plugins) == (1 if structure == "shared" else 4)
        assert all(not torch.equal(w, m.proj.weight) for w, m in zip(before, plugins, strict=True))


def test_plugin_encoder_errors_name_the_spec():
    with pytest.raises(ValueError, match="encoder plug-in 'no.such.module:X' cannot be loaded"):
        build_encoder("no.such.module:X", D_IN)
    with pytest.raises(ValueError, match=re.escape(f"{__name__}:Missing") + "' cannot be loaded"):
        build_encoder(f"{__name__}:Missing", D_IN)
    with pytest.raises(ValueError, match=re.escape(f"{__name__}:NoOutDim") + "' must build an nn.Module with out_dim"):
        build_encoder(f"{__name__}:NoOutDim", D_IN)
    with pytest.raises(ValueError, match="has no option layers; options: hidden"):
        build_encoder(PLUGIN, D_IN, layers=2)
