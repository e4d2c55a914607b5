"""The command line that every stage, benchmark, sweep and the ensemble share::

    python -m pipeline.<stage> [--config-dir DIR] [config.yaml] [key=value ...]
    python -m pipeline.<stage> --show [KEY] [config.yaml] [key=value ...]
    python -m pipeline.<stage> --help

The first argument that is not ``key=value`` is a config file (for the ensemble every such
argument is a run folder, and so is each ``runs=...``). ``--config-dir DIR`` looks up configs in the user's folder first
(``$AFFECT_CONFIG_DIR``). ``--show`` prints the resolved config as YAML, or with a key its value
(a list one item per line; a sweep's values over all its runs), and runs nothing. ``--help``
prints the usage and exits 0 before anything else happens.

``python -m pipeline.cli <stage> --show KEY [config.yaml] [key=value ...]`` prints the same from
the config alone, without loading the command (``sweep``: over every run of its grid;
``compare_init``: over its runs); Make asks it which extractors a training target reads.

A config or input error, found while reading the command line or inside ``main``, is one
``error: ...`` line and exit status 1; ``main``'s own status is the process's otherwise. Process-wide
settings (log lines on stderr, the allocator option of the stages that decode video) are applied
here, never by importing or calling the stages as a library.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml

from pipeline.config import USER_CONFIG_ENV, ConfigError, InputError, config_file, load_config, parse_value

HELP = ("-h", "--help")
DECODING_STAGES = ("faces", "predict")  # the stages that decode video, whose frames churn the heap


@dataclass(frozen=True)
class Command:
    """What a command line names: a config file, ``key=value`` overrides in their order, and the
    other plain arguments (run folders, for the ensemble)."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    config_dir: str | None = None
    show: str | None = None  # "" for the whole config


def parse(argv: Iterable[str], arguments: str | None = None) -> Command:
    """Split a command line into a :class:`Command`. With ``arguments`` (the name of a list key)
    every plain argument is one of its values; without, the first is the config file and a
    second is refused."""
    argv = list(argv)
    config_dir = show = None
    plain, overrides = [], []
    i = 0
    while i < len(argv):
        item = argv[i]
        if item in ("--config-dir", "--show") or item.startswith(("--config-dir=", "--show=")):
            flag, eq, value = item.partition("=")
            if not eq:  # the value is the next argument: a folder, or (--show) a key if it looks like one
                takes_next = flag == "--config-dir" or (i + 1 < len(argv) and _looks_like_key(argv[i + 1]))
                value = argv[i + 1] if takes_next and i + 1 < len(argv) else ""
                i += takes_next
                if flag == "--config-dir" and not value:
                    raise ConfigError("--config-dir needs a folder")
            config_dir, show = (value, show) if flag == "--config-dir" else (config_dir, value)
        elif item.startswith("-"):
            raise ConfigError(f"unknown option {item!r}; the options are --config-dir DIR, --show [KEY], --help")
        elif "=" in item:
            overrides.append(item)
        else:
            plain.append(item)
        i += 1
    if arguments is None:
        if len(plain) > 1:
            raise ConfigError(f"give one config file, not {len(plain)} ({', '.join(plain)}); settings are key=value")
        return Command(plain[0] if plain else None, overrides, [], config_dir, show)
    return Command(None, overrides, plain, config_dir, show)


def _looks_like_key(item: str) -> bool:
    return bool(item) and "=" not in item and not item.startswith("-") and not item.endswith((".yaml", ".yml"))


def split_values(text: str) -> list[str]:
    """``"a,b,[c,d]"`` -> ``["a", "b", "[c,d]"]``: a comma inside brackets or braces stays in its value."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def expand(overrides: list[str]) -> list[list[str]]:
    """The runs of a sweep, each as its list of ``key=value`` overrides, in grid order (last axis
    fastest): every ``key=a,b,c`` is an axis, commas inside brackets belong to the value."""
    axes = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        values = split_values(text)
        if any(v == "" for v in values):
            raise ConfigError(f"{item!r}: an empty value in the list")
        axes.append([f"{key.strip()}={v}" for v in values])
    return [list(run) for run in itertools.product(*axes)]


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def release_large_buffers(threshold: int = 128 * 1024) -> None:
    """Have glibc's malloc give every buffer of ``threshold`` bytes or more straight back to the
    system when it is freed (Linux only; elsewhere nothing happens).

    By default glibc raises that threshold as large buffers come and go, and then carves frames and
    tensors out of a heap that fragments: a stage's resident memory crept up with the video's length
    although it kept nothing from one chunk to the next.
    """
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def command_line_process(stage: str) -> None:
    """The process-wide settings of a stage run from the command line: log lines on stderr and,
    where video is decoded, glibc's allocator returning large buffers."""
    setup_logging()
    if stage in DECODING_STAGES:
        release_large_buffers()


def _values(resolved: Any, key: str) -> list:
    """The value of a dotted ``key`` in each config ``resolved`` holds (one, or a sweep's runs)."""
    configs = resolved.configs if hasattr(resolved, "configs") else [resolved]
    values = []
    for cfg in configs:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"--show {key}: no such config key")
            node = node[part]
        for value in node if isinstance(node, list) else [node]:
            if value not in values:
                values.append(value)
    return values


@dataclass(frozen=True)
class Program:
    """One command: ``stage`` names its defaults (``configs/<stage>.yaml``), ``main`` runs the
    resolved config and returns the exit status, ``configure`` resolves a :class:`Command`
    (default: :func:`pipeline.config.load_config`, with plain arguments filling the list key
    ``arguments``), and ``module`` is what ``python -m`` runs, whose docstring is the help."""

    stage: str
    main: Callable[[Any], int]
    configure: Callable[[Command], Any] | None = None
    arguments: str | None = None
    has_config: bool = True

    @property
    def module(self) -> str:
        name = self.main.__module__
        if name == "__main__":  # run as python -m <module>: its own name is in its spec
            spec = getattr(self.main, "__globals__", {}).get("__spec__")
            name = spec.name if spec is not None else name
        return name

    @property
    def doc(self) -> str:
        return (getattr(self.main, "__globals__", {}).get("__doc__") or "").strip()

    def usage(self) -> str:
        plain = f"[{self.arguments.upper().rstrip('S')} ...]" if self.arguments else "[config.yaml]"
        line = f"usage: python -m {self.module} [--config-dir DIR] [--show [KEY]] {plain} [key=value ...]"
        if not self.has_config:
            line = f"usage: python -m {self.module}"
        doc = self.doc
        defaults = f"\n\ndefaults: {config_file(f'{self.stage}.yaml')}" if self.has_config else ""
        return f"{line}\n\n{doc}{defaults}"

    def read(self, argv: Iterable[str]) -> Any:
        """The resolved config of a command line (``--config-dir`` applied for this process)."""
        return self._resolve(parse(argv, self.arguments))

    def _resolve(self, command: Command) -> Any:
        if command.config_dir is not None:
            os.environ[USER_CONFIG_ENV] = command.config_dir
        if not self.has_config:
            if command.config or command.overrides or command.arguments:
                raise ConfigError(f"python -m {self.module} takes no settings; see --help")
            return None
        if self.configure is not None:
            return self.configure(command)
        overrides, values = command.overrides, list(command.arguments)
        if self.arguments:  # each `<key>=x` or `<key>=[x, y]` adds to what the plain arguments give
            given = [o for o in overrides if o.split("=", 1)[0].strip() == self.arguments]
            overrides = [o for o in overrides if o not in given]
            for item in given:
                value = parse_value(item.split("=", 1)[1])
                values += [str(v) for v in (value if isinstance(value, list) else [value])]
        cfg = load_config(self.stage, command.config, overrides)
        if self.arguments:
            cfg[self.arguments] = [*cfg[self.arguments], *values]
        return cfg

    def run(self, argv: Iterable[str] | None = None) -> NoReturn:
        """Run the command line ``argv`` (default ``sys.argv[1:]``) and exit with its status."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(item in HELP for item in argv):
            print(self.usage())
            raise SystemExit(0)
        try:
            command = parse(argv, self.arguments)
            if command.show is not None:
                _print_shown(self._resolve(command), command.show)
                raise SystemExit(0)
            command_line_process(self.stage)
            status = self.main(self._resolve(command))
        except InputError as e:
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(status)


def _print_shown(resolved: Any, key: str) -> None:
    """Print the resolved config as YAML, or one key's values (a list one item per line)."""
    if not key:
        print(yaml.safe_dump(_plain(resolved), sort_keys=False), end="")
        return
    values = _values(resolved, key)
    if any(isinstance(v, Mapping) for v in values):
        print(yaml.safe_dump(_plain(values if len(values) > 1 else values[0]), sort_keys=False), end="")
    else:
        print("\n".join(str(v) for v in values))


def _plain(resolved: Any) -> Any:
    """A config, a sweep's configs or a value of one as plain YAML-ready data."""
    if hasattr(resolved, "configs"):
        return [cfg.to_dict() for cfg in resolved.configs]
    return json.loads(json.dumps(resolved))


def run_stage(stage: str, main: Callable[[Any], int], argv: list[str] | None = None) -> NoReturn:
    """``Program(stage, main).run(argv)``: the command line of a stage with the default resolution."""
    Program(stage, main).run(argv)


@dataclass(frozen=True)
class _Grid:
    configs: list


def _only_shows(_: Any) -> int:
    raise ConfigError("python -m pipeline.cli <command> only shows a config: give --show [KEY]")


def _show_only(argv: list[str]) -> NoReturn:
    """``python -m pipeline.cli <command> --show KEY [config] [key=value ...]``: what the command's
    ``--show`` prints, resolved from its config alone (the sweep's over every run of its grid),
    without importing the command; for Make, which asks before each training target."""
    if not argv or argv[0] in HELP:
        print(__doc__.strip())
        raise SystemExit(0)
    stage, rest = argv[0], argv[1:]
    grid = (lambda c: _Grid([load_config("train", c.config, run) for run in expand(c.overrides)]))
    configure = {"sweep": grid, "compare_init": _comparison}.get(stage)
    Program(stage, _only_shows, configure=configure).run(rest)


def _comparison(command: Command) -> Any:
    from pipeline.compare_init import Comparison  # its runs' configs, for Make's features

    return Comparison(command.config, command.overrides)


if __name__ == "__main__":
    _show_only(sys.argv[1:])
