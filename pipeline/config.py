"""Small YAML configs with typed ``key=value`` overrides.

A stage config (``configs/<stage>.yaml``) may name components by group: ``data: sample`` loads
``configs/data/sample.yaml`` into the section ``data``, ``encoder: gru`` loads
``configs/encoders/gru.yaml``. On the command line ``encoder=lstm`` swaps the whole section and
``encoder.hidden=256`` overrides one field. Keys that the YAML does not define are refused, and so
are values whose type differs from the default's, each with a message naming the key.

A config file may build on another (``base: train.yaml``) and hold only what differs: sections
merge key by key, and a top-level dotted key (``encoder.hidden: 256``) is applied like a
command-line override. ``experiment=<name>`` picks ``configs/experiments/<name>.yaml`` for training.
Keys whose value is one of a set are checked against the choices their stage declares
(:func:`check_choices`) before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = (ROOT / "configs" / "train.yaml").is_file()  # a source checkout or an editable install


def _shipped_configs() -> Path:
    """The project's configs: ``configs/`` of a source checkout, else the copy an installed package
    carries as ``pipeline/configs``."""
    if CHECKOUT:
        return ROOT / "configs"
    return Path(str(importlib.resources.files("pipeline") / "configs"))


CONFIG_DIR = _shipped_configs()
USER_CONFIG_ENV = "AFFECT_CONFIG_DIR"  # a folder of the user's own configs, looked up before CONFIG_DIR


def config_dirs() -> list[Path]:
    """Where configs are looked up, in order: the user's folder (``$AFFECT_CONFIG_DIR`` or
    ``--config-dir``), laid out as ``configs/``, then the shipped configs."""
    user = os.environ.get(USER_CONFIG_ENV)
    if not user:
        return [CONFIG_DIR]
    if not Path(user).is_dir():
        raise ConfigError(f"{USER_CONFIG_ENV}={user}: no such folder")
    return [Path(user), CONFIG_DIR]


def config_file(relative: str | Path) -> Path:
    """The first file ``relative`` (e.g. ``encoders/gru.yaml``) under :func:`config_dirs`; the
    shipped path, which does not exist, when none has it."""
    for folder in config_dirs():
        if (folder / relative).is_file():
            return folder / relative
    return CONFIG_DIR / relative


def _config_names(folder: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / folder).glob("*.yaml")})


def cache_dir() -> Path:
    """Downloads kept between runs (weights, test clips): ``.cache/`` of a source checkout, else
    ``$XDG_CACHE_HOME/affect-pipeline`` (``~/.cache/affect-pipeline``)."""
    if CHECKOUT:
        return ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "affect-pipeline"


# Section name -> folder of its component YAMLs.
GROUPS = {"data": "data", "extractor": "features", "encoder": "encoders"}
# Section -> (its key that names a component, the folder of their YAMLs): the component's options
# join the section beside that key. ``model.structure: feedback`` adds configs/structures/feedback.yaml's
# options to ``model``; an option of another structure is refused, naming the structure it belongs to.
SUBGROUPS = {"model": ("structure", "structures")}


def sub_options(section: str, name: Any) -> dict:
    """The options, with their defaults, of the component ``name`` that a ``SUBGROUPS`` section names."""
    key, folder = SUBGROUPS[section]
    path = config_file(f"{folder}/{name}.yaml") if isinstance(name, str) else None
    if path is None or not path.is_file():
        raise ConfigError(f"config key '{section}.{key}' = {name!r}: choose one of {', '.join(_config_names(folder))}")
    return read_yaml(path)


def _owners(section: str, option: str) -> list[str]:
    """The components of a ``SUBGROUPS`` section that have ``option``."""
    folder = SUBGROUPS[section][1]
    return [n for n in _config_names(folder) if option in sub_options(section, n)]


def _named(cfg: Mapping, section: str) -> Any:
    """The component a ``SUBGROUPS`` section of ``cfg`` names, or None."""
    node = cfg.get(section)
    return node.get(SUBGROUPS[section][0]) if isinstance(node, Mapping) else None


def _leave_component(cfg: dict, dotted: list, section: str, old: Any, new: Any) -> list:
    """``cfg``'s ``section`` and ``dotted`` overrides without the options that only the component
    ``old`` has, now that ``new`` replaces it; returns the dotted overrides kept."""
    if old is None or old == new or not isinstance(cfg.get(section), Mapping):
        return dotted
    gone = set(sub_options(section, old)) - set(sub_options(section, new))
    cfg[section] = {k: v for k, v in cfg[section].items() if k not in gone}
    return [d for d in dotted if not (d[0].split(".")[0] == section and d[0].split(".", 2)[1] in gone)]



class Pattern:
    """A string choice given by a regular expression that the whole value must match, with the
    words that describe it to a person."""

    def __init__(self, regex: str, description: str) -> None:
        self.regex, self.description = re.compile(regex), description

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.regex.fullmatch(value) is not None

    def __str__(self) -> str:
        return self.description


DEVICE = Pattern(r"cpu|cuda(:\d+)?|mps", "cpu, cuda, cuda:<index> or mps")

# Dotted key -> its allowed values (a collection or a Pattern).
Choices = Mapping[str, "Collection[Any] | Pattern"]


class InputError(Exception):
    """An input the user named that cannot be used (a missing file, a checkpoint, a feature cache):
    the command line prints the message as one ``error:`` line and exits 1."""


class ConfigError(InputError, ValueError):
    """A config file or override that cannot be used; the message names the key or file."""


class Config(dict):
    """A dict whose keys also read as attributes: ``cfg.encoder.hidden``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo: dict) -> Config:
        return _wrap(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))

    def hash(self, keys: Iterable[str] | None = None) -> str:
        """A short, stable hash of the whole config or of the listed top-level keys."""
        part = self.to_dict() if keys is None else {k: self.to_dict().get(k) for k in keys}
        blob = json.dumps(part, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically (a full disk leaves no half-written copy)."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _wrap(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return Config({k: _wrap(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_wrap(v) for v in obj]
    return obj


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``: sections present in both merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _base_path(name: str, child: Path) -> Path:
    """``base: <name>`` of ``child``: beside it, else under ``configs/``; ``.yaml`` may be left out."""
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for folder in (child.parent, *config_dirs()):
        if (folder / name).is_file():
            return folder / name
    where = " or ".join(map(str, config_dirs()))
    raise ConfigError(f"{child}: base {name!r} not found beside it or in {where}")


def read_config(path: str | Path, _seen: frozenset[Path] = frozenset()) -> tuple[dict, list[tuple[str, Any, Path]]]:
    """A config file resolved through its ``base`` chain: the merged mapping, and its dotted keys as
    ``(key, value, file)`` overrides (the base's first) to apply once components are loaded."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    dotted = [(key, data.pop(key), path) for key in [k for k in data if "." in str(k)]]
    if base is None:
        return data, dotted
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name a config file, got {base!r}")
    parent = _base_path(base, path)
    if parent.resolve() in _seen | {path.resolve()}:
        raise ConfigError(f"{path}: base {base!r} leads back to itself")
    merged, parent_dotted = read_config(parent, _seen | {path.resolve()})
    # a component this file names again (encoder: lstm) replaces the base's, field overrides included
    renamed = {group for group in GROUPS if group in data and data[group] != merged.get(group)}
    parent_dotted = [d for d in parent_dotted if d[0].split(".")[0] not in renamed]
    # likewise another structure: the base's options of its own structure alone are left behind
    for section in SUBGROUPS:
        if _named(data, section) is not None:
            parent_dotted = _leave_component(merged, parent_dotted, section, _named(merged, section),
                                             _named(data, section))
    return merge(merged, data), parent_dotted + dotted


def experiment_names() -> list[str]:
    return _config_names("experiments")


def experiment_path(name: str) -> Path:
    """``configs/experiments/<name>.yaml``, refusing an unknown name with the list of known ones."""
    if not isinstance(name, str) or not (path := config_file(f"experiments/{name}.yaml")).is_file():
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(experiment_names())}")
    return path


def _describe(allowed: Collection[Any] | Pattern) -> str:
    if isinstance(allowed, Pattern):
        return str(allowed)
    return "one of " + ", ".join("null" if v is None else str(v) for v in allowed)


def _allowed(value: Any, allowed: Collection[Any] | Pattern) -> bool:
    if isinstance(allowed, Pattern):
        return value in allowed
    return any(value == v and type(value) is type(v) for v in allowed)  # True is not 1, "1" is not 1


def check_choices(cfg: Mapping, choices: Choices) -> None:
    """Refuse a value outside the choices its key declares (each item of a list value is checked);
    keys absent from ``cfg`` (a section of another component) are skipped."""
    for key, allowed in choices.items():
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            for value in node if isinstance(node, list) else [node]:
                if not _allowed(value, allowed):
                    raise ConfigError(f"config key {key!r} = {value!r}: choose {_describe(allowed)}")


def component_names(group: str) -> list[str]:
    """Names of the YAMLs available for a group, e.g. ``component_names('encoder')``."""
    return _config_names(GROUPS[group])


def load_component(group: str, name: str) -> dict:
    """Load ``configs/<group folder>/<name>.yaml``, or a YAML file given by its path (named by its
    stem); a ``module:function`` name needs no YAML."""
    path = config_file(f"{GROUPS[group]}/{name}.yaml")
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        path, name = Path(name), Path(name).stem
    if path.is_file():
        data = read_yaml(path)
    elif ":" in name:  # a plug-in such as ``my_package.my_module:build``
        data = plugin_options(group, name)
    else:
        raise ConfigError(
            f"unknown {group} {name!r}: no {GROUPS[group]}/{name}.yaml in {' or '.join(map(str, config_dirs()))}; "
            f"choose one of {', '.join(component_names(group))}"
        )
    data["name"] = name
    return data


# Leading parameters of a plug-in's callable that the pipeline passes itself (an encoder's d_in).
PLUGIN_SUPPLIED = {"encoder": 1}


def _plugin_parameters(group: str, name: str) -> list:
    """The parameters of the class or function a plug-in ``package.module:attribute`` names that its
    config sets; a module that does not import, or has no such attribute, is refused naming it."""
    import importlib
    import inspect

    module, _, attr = name.partition(":")
    try:
        target = getattr(importlib.import_module(module), attr)
    except AttributeError:
        raise ConfigError(f"{group} plug-in {name!r}: module {module!r} has no attribute {attr!r}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import, for whatever reason
        raise ConfigError(f"{group} plug-in {name!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(target):
        raise ConfigError(f"{group} plug-in {name!r} is a {type(target).__name__}, not a class or function")
    params = list(inspect.signature(target).parameters.values())[PLUGIN_SUPPLIED.get(group, 0):]
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def plugin_options(group: str, name: str) -> dict:
    """The options of a plug-in: its keyword parameters with their defaults (None for one without a
    default, which must then be given), set as ``<group>.<option>=...`` like a built-in component's."""
    options = {}
    for p in _plugin_parameters(group, name):
        default = None if p.default is p.empty else p.default
        options[p.name] = list(default) if isinstance(default, tuple) else default
    return options


def check_plugins(cfg: Mapping) -> None:
    """Refuse a plug-in component whose parameters without a default are left unset, naming them."""
    for group in GROUPS:
        section = cfg.get(group)
        name = section.get("name") if isinstance(section, Mapping) else None
        if isinstance(name, str) and ":" in name:
            unset = [p.name for p in _plugin_parameters(group, name)
                     if p.default is p.empty and section.get(p.name) is None]
            if unset:
                raise ConfigError(f"{group} plug-in {name!r} needs {', '.join(f'{group}.{n}=...' for n in unset)}")


POOLING_STAGES = ("train", "evaluate")  # a run over several data sets, and the scoring of its predictions


def pooled_data(stage: str, names: list) -> dict:
    """``data: [a, b]``: several data sets in one training run, each labelling the tasks it has
    (and in the evaluate stage, which scores such a run's predictions). The section is named
    ``a+b`` and holds each data set's own section under ``members``."""
    if stage not in POOLING_STAGES:
        raise ConfigError(f"data={names}: several data sets train together; the {stage} stage reads one at a time")
    if not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
        raise ConfigError(f"data={names}: name each data set once")
    members = [load_component("data", n) for n in names]
    sets = {m["name"]: m.get("expressions", "abaw8") for m in members}
    if len(set(sets.values())) > 1:
        raise ConfigError(f"data={names}: the data sets use different expression sets {sets}; choose one")
    return {"name": "+".join(m["name"] for m in members), "expressions": next(iter(sets.values())),
            "members": members}


def parse_value(text: str) -> Any:
    """Parse an override value as YAML: ``3`` is an int, ``1e-3`` a float, ``[1,2]`` a list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(key: str, old: Any, new: Any) -> Any:
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int):
        return float(new)
    elif isinstance(old, type(new)) or isinstance(new, type(old)):
        return new
    raise ConfigError(
        f"config key {key!r} expects {type(old).__name__} (default {old!r}), got {type(new).__name__} {new!r}"
    )


# Sections that map names the user chooses to values (extractor name -> weights file, a model part
# -> the run it starts from).
OPEN_SECTIONS = ("extractor_weights", "init_sources")


def _unknown(key: str, where: Mapping, prefix: str) -> ConfigError:
    section = prefix.rstrip(".")
    if section in SUBGROUPS and SUBGROUPS[section][0] in where:  # an option of another component?
        owners = _owners(section, key.split(".")[-1])
        if owners:
            named = f"{section}.{SUBGROUPS[section][0]}"
            return ConfigError(f"config key {prefix + key.split('.')[-1]!r} is an option of {named} "
                               f"{' or '.join(owners)}, not of {where[SUBGROUPS[section][0]]!r}")
    close = difflib.get_close_matches(key.split(".")[-1], list(where), n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix + key.split('.')[-1]!r}{hint}")


def check_keys(given: Mapping, known: Mapping, where: str = "", prefix: str = "") -> None:
    """Refuse keys of a stage YAML that its default (``known``) lacks, e.g. a misspelling that
    would otherwise be silently ignored; sections named by component groups are not checked."""
    for key, value in given.items():
        if key not in known:
            raise ConfigError(where + str(_unknown(str(key), known, prefix)))
        open_map = (not prefix and key in GROUPS) or f"{prefix}{key}" in OPEN_SECTIONS
        if isinstance(value, Mapping) and isinstance(known[key], Mapping) and not open_map:
            check_keys(value, known[key], where, f"{prefix}{key}.")


def apply_override(cfg: dict, key: str, value: Any) -> None:
    """Set ``a.b.c = value`` in place, refusing unknown keys and type changes."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise _unknown(part, node if isinstance(node, dict) else {}, ".".join(parts[:i]) + ("." if i else ""))
        node = node[part]
    leaf = parts[-1]
    prefix = ".".join(parts[:-1]) + ("." if len(parts) > 1 else "")
    if isinstance(node, dict) and leaf not in node and prefix.rstrip(".") in OPEN_SECTIONS:
        node[leaf] = value  # a map whose keys the user names
        return
    if not isinstance(node, dict) or leaf not in node:
        raise _unknown(leaf, node if isinstance(node, dict) else {}, prefix)
    old = node[leaf]
    if isinstance(old, dict) and not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(old), '...')}")
    node[leaf] = _check_type(key, old, value)


def load_config(
    stage: str, path: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Resolve a stage config: the YAML and its bases, its components, then ``key=value``
    overrides in order (``experiment=<name>`` picks the training config file).

    Overrides that select a component (``encoder=lstm``) are applied before field overrides, so
    ``encoder.hidden=64 encoder=lstm`` sets the LSTM's hidden size whatever the order.
    """
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), parse_value(text)))
    experiments = [v for k, v in pairs if k == "experiment"]
    if experiments:
        if stage != "train":
            raise ConfigError(f"experiment= selects a training config; the {stage} stage has none")
        if path:
            raise ConfigError(f"give a config file ({path}) or experiment={experiments[-1]}, not both")
        path = experiment_path(experiments[-1])
        pairs = [(k, v) for k, v in pairs if k != "experiment"]

    default = config_file(f"{stage}.yaml")
    path = Path(path) if path else default
    cfg, dotted = read_config(path)
    known = read_yaml(default) if default.is_file() else None
    for section, (key, _) in SUBGROUPS.items():  # the options of the component a section names join it
        if _named(cfg, section) is None:
            continue
        named = [d[1] for d in dotted if d[0] == f"{section}.{key}"] + [v for k, v in pairs if k == f"{section}.{key}"]
        chosen = named[-1] if named else _named(cfg, section)
        dotted = _leave_component(cfg, dotted, section, _named(cfg, section), chosen)
        options = sub_options(section, chosen)
        cfg[section] = {**dict.fromkeys(cfg[section]), **merge(options, cfg[section])}  # its own keys first
        if known is not None and isinstance(known.get(section), Mapping):
            known[section] = {**merge(options, known[section]), key: chosen}
    if path.resolve() != default.resolve() and known is not None:
        check_keys(cfg, known, f"{path}: ")

    for group in GROUPS:
        if group not in cfg:
            continue
        chosen = [v for k, v in pairs if k == group]
        name = chosen[-1] if chosen else cfg[group]
        if isinstance(name, dict):  # a section written inline in the stage YAML
            continue
        if group == "data" and isinstance(name, list) and len(name) == 1:
            name = name[0]
        if group == "data" and isinstance(name, list):
            cfg[group] = pooled_data(stage, name)
            continue
        if not isinstance(name, str):
            raise ConfigError(f"config key {group!r} names a component and must be a string, got {name!r}")
        cfg[group] = load_component(group, name)

    for key, value, where in dotted:
        try:
            apply_override(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    for key, value in pairs:
        if key in GROUPS and key in cfg:
            continue
        apply_override(cfg, key, value)
    check_plugins(cfg)
    return _wrap(cfg)
