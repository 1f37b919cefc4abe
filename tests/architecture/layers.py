"""The layers of posttrain (../shared/STYLE.md's layout) and a scan of the package's imports.

A module may import modules of its own layer or of a lower one. Every import counts, including those
inside functions (a lazy import is still a dependency). Besides the layering, the module graph must
have no cycle, and recipes do not import each other (what two recipes share lives in train/) except
where a module orchestrates recipes (the demos) or is by design another's data flow (pretrain = SFT on
raw text).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

# Lowest first. The top-level name of a module (posttrain.<name>[.sub]) picks its layer.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "config"),  # typed sections and errors: everything may use them
    ("metrics",),  # trackers, progress, MFU arithmetic, run status
    ("data",),  # tokenizer wrapper, chat masks, sources, packing, loaders
    ("models",),  # single-device definitions, LoRA, heads, HF I/O, verification
    ("parallel",),  # meshes, FSDP2/TP applied from outside, sharded load, Ray connection
    ("train",),  # the training core, losses, checkpoints, the shared setup
    ("rl",),  # engines, workers, controller, RL losses
    ("events",),  # event sequences and semantic IDs, and their hooks into train/ and rl/
    ("evaluate", "generate"),  # scoring and sampling of exported checkpoints
    ("recipes",),  # one readable file per method
    ("plan", "launch", "launch_ray", "cli", "__main__", "__init__"),  # entry points
]

# (importer, imported) pairs of recipes allowed to import another recipe, and why.
RECIPE_EDGES = {
    ("posttrain.recipes.pretrain", "posttrain.recipes.sft"): "pretraining is the SFT flow on raw text",
    ("posttrain.recipes.demo", "posttrain.recipes.dpo"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo", "posttrain.recipes.grpo"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo", "posttrain.recipes.pretrain"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo", "posttrain.recipes.sft"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo", "posttrain.recipes.demo_real"): "--model smollm2 dispatches to it",
    ("posttrain.recipes.demo", "posttrain.recipes.demo_common"): "the demos' shared scoring",
    ("posttrain.recipes.demo_real", "posttrain.recipes.grpo"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo_real", "posttrain.recipes.sft"): "the demo runs the recipes in turn",
    ("posttrain.recipes.demo_real", "posttrain.recipes.demo_common"): "the demos' shared scoring",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise KeyError(f"{module}: no layer in tests/architecture/layers.py LAYERS; add its package there")


def module_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported posttrain module: line}} for every .py under root/posttrain."""
    pkg = root / "posttrain"
    files = {}
    for f in sorted(pkg.rglob("*.py")):
        name = ".".join(f.relative_to(root).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, f in files.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("posttrain")
            ):
                for alias in node.names:  # `from posttrain.models import lora` imports the module lora
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "posttrain"]
            for t in targets:
                if t != name:
                    graph[name].setdefault(t, node.lineno)
        graph.setdefault(name, {})
    return dict(graph)


def violations(root: Path) -> list[str]:
    """Every upward import, sideways recipe import and module cycle, as 'file:line: why' lines."""
    graph = module_graph(root)
    out = []
    for src, targets in sorted(graph.items()):
        for dst, line in sorted(targets.items()):
            where = f"{src.replace('.', '/')}.py:{line}"
            if layer_of(dst) > layer_of(src):
                out.append(
                    f"{where}: imports {dst} (layer {layer_of(dst)}) from layer {layer_of(src)}: upward"
                )
            elif (
                src.startswith("posttrain.recipes.")
                and dst.startswith("posttrain.recipes.")
                and (src, dst) not in RECIPE_EDGES
            ):
                out.append(f"{where}: recipe imports recipe {dst}: move what they share into train/")
    out.extend(f"import cycle: {' -> '.join(c)}" for c in cycles(graph))
    return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each closed into a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found
