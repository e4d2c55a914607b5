"""One command line for every command: ``--help`` that does nothing else, ``--show`` that prints the
resolved config, a config file, overrides and (for the ensemble) run folders, and one error line."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.config import ROOT, ConfigError, load_config

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BENCHES = sorted(f"pipeline.bench.{p.stem}" for p in (ROOT / "pipeline" / "bench").glob("*.py")
                 if p.stem not in ("__init__", "clips"))


def run_help(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, call) -> None:
    """Run ``call`` as the command line ``<cmd> --help`` in an empty folder; it must exit 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFFECT_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(sys, "argv", ["cmd", "--help"])
    monkeypatch.setattr(cli, "command_line_process", lambda stage: pytest.fail("--help set up the process"))
    with pytest.raises(SystemExit) as done:
        call()
    assert done.value.code in (0, None)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_prints_its_usage_on_help_and_does_nothing_else(
        script: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    module, _, function = SCRIPTS[script].partition(":")
    run_help(monkeypatch, tmp_path, getattr(importlib.import_module(module), function))
    said = capsys.readouterr().out
    assert said.startswith(f"usage: python -m {module}") and len(said.splitlines()) > 3, said[:200]
    assert not os.listdir(tmp_path), f"{script} --help wrote {os.listdir(tmp_path)}"  # no weights fetched either


@pytest.mark.parametrize("module", BENCHES)
def test_every_benchmark_prints_its_usage_on_help(module: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)  # run as `python -m` does, not over an import of it
    run_help(monkeypatch, tmp_path, lambda: runpy.run_module(module, run_name="__main__"))
    said = capsys.readouterr().out
    assert said.startswith(f"usage: python -m {module}") and len(said.splitlines()) > 3, said[:200]
    assert not os.listdir(tmp_path)


def test_a_command_line_is_a_config_file_overrides_and_arguments() -> None:
    command = cli.parse(["--config-dir", "/mine", "my.yaml", "epochs=2", "--show", "extractors", "lr=1e-3"])
    assert (command.config, command.overrides, command.config_dir, command.show) == (
        "my.yaml", ["epochs=2", "lr=1e-3"], "/mine", "extractors")
    assert cli.parse(["--show", "epochs=2"]).show == ""  # --show followed by a setting: the whole config
    assert cli.parse(["a", "b", "device=cpu"], arguments="runs").arguments == ["a", "b"]
    with pytest.raises(ConfigError, match="give one config file, not 2"):
        cli.parse(["a.yaml", "b.yaml"])
    with pytest.raises(ConfigError, match="unknown option '--epochs'"):
        cli.parse(["--epochs", "3"])


def test_show_prints_the_resolved_config_or_one_key(capsys: pytest.CaptureFixture) -> None:
    program = cli.Program("train", lambda cfg: pytest.fail("--show ran the command"))
    with pytest.raises(SystemExit) as done:
        program.run(["--show", "extractors", "experiment=fusion_onet_iresnet18"])
    assert done.value.code == 0 and capsys.readouterr().out == "onet\niresnet18\n"
    with pytest.raises(SystemExit):
        program.run(["--show", "experiment=va_only", "epochs=3"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config("train", overrides=["experiment=va_only", "epochs=3"]).to_dict()
    with pytest.raises(SystemExit) as done:
        program.run(["--show", "model.nothing"])
    assert done.value.code == "error: --show model.nothing: no such config key"
