"""The README's seed-system tables against the recipes: every key a table names exists in its
recipe's resolved config with the value the table gives, and every test it names exists; so the
tables cannot drift from the recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TITLE = re.compile(r"^\| Their setting \(`(?P<recipe>[a-z0-9_]+)`\) \| Where \| Key \| Test \|$")
SPAN = re.compile(r"`([^`]+)`")


def tables() -> dict[str, list[list[str]]]:
    """Per recipe, the rows of its table in the README's Seed systems section, as cells."""
    found: dict[str, list[list[str]]] = {}
    recipe = None
    for line in (ROOT / "README.md").read_text().splitlines():
        title = TITLE.match(line)
        if title:
            recipe = title["recipe"]
            found[recipe] = []
        elif recipe and line.startswith("|"):
            if not set(line) <= set("|- "):
                found[recipe].append([c.strip() for c in line.strip("|").split("|")])
        else:
            recipe = None
    return found


def test_every_seed_recipe_has_its_table() -> None:
    assert set(tables()) == {"zhang2022_transformer", "zhang2022_lstm", "zhang2022_gru", "nguyen2022_amtl"}


def lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"no config key {dotted!r}"
        node = node[part]
    return node


@pytest.mark.parametrize("recipe", sorted(tables()))
def test_each_key_in_the_table_has_the_recipes_value(recipe: str) -> None:
    cfg = load_config("train", overrides=[f"experiment={recipe}"])
    rows = tables()[recipe]
    assert rows
    for setting, where, keys, _ in rows:
        assert SPAN.search(where), f"{setting}: no file and line of their code"
        spans = SPAN.findall(keys)
        assert spans, f"{setting}: no key"
        for span in spans:
            key, sep, text = span.partition(": ")
            assert sep, f"{setting}: {span!r} is not `key: value`"
            assert lookup(cfg, key) == yaml.safe_load(text), f"{recipe} {key}: {lookup(cfg, key)!r}, table {text}"


@pytest.mark.parametrize("recipe", sorted(tables()))
def test_each_test_the_table_names_exists(recipe: str) -> None:
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
    for setting, _, _, tests in tables()[recipe]:
        names = SPAN.findall(tests)
        assert names, f"{setting}: no test named"
        assert set(names) <= defined, f"{setting}: {sorted(set(names) - defined)} not in tests/"
