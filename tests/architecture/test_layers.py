"""The package's imports respect the layers of STYLE.md; the scan itself is tested on planted faults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.architecture.layers import LAYERS, layer_of, module_graph, violations

ROOT = Path(__file__).resolve().parents[2]


def test_no_upward_imports_no_cycles():
    assert violations(ROOT) == []


def test_every_package_has_a_layer():
    for module in module_graph(ROOT):
        layer_of(module)  # KeyError names a module whose package LAYERS does not list


@pytest.fixture
def tree(tmp_path) -> Path:
    shutil.copytree(
        ROOT / "posttrain", tmp_path / "posttrain", ignore=shutil.ignore_patterns("__pycache__", "assets")
    )
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_planted_upward_import_is_named(tree):
    plant(tree, "posttrain.data.labels", "from posttrain.recipes import sft  # noqa")
    found = violations(tree)
    assert (
        found[0] == "posttrain/data/labels.py:9: imports posttrain.recipes.sft (layer 9) from layer 2: upward"
    )
    assert all(v.startswith("import cycle:") for v in found[1:])  # sft imports data back


def test_planted_cycle_and_sideways_recipe_import_are_named(tree):
    plant(tree, "posttrain.data.chat", "from posttrain.data.render import renderer  # noqa")
    plant(tree, "posttrain.recipes.rm", "from posttrain.recipes.dpo import train  # noqa")
    found = violations(tree)
    assert any(v.startswith("import cycle:") and "posttrain.data.chat" in v for v in found)
    assert any(v.startswith("posttrain/recipes/rm.py:") and "recipe imports recipe" in v for v in found)


def test_layers_are_disjoint():
    names = [n for layer in LAYERS for n in layer]
    assert len(names) == len(set(names))
