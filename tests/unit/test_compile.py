"""parallelism.compile: packed rows whose document layout changes every step must not recompile the
compiled blocks; a new shape recompiles once, then the dimension is dynamic. Dynamo's graph counter is
the evidence; the backend is "eager" so the test measures dynamo's guards, not inductor's codegen
(tests/distributed/test_equivalence.py trains with inductor)."""

import torch
from helpers import tiny_model
from torch._dynamo.utils import counters

from posttrain.parallel.parallelize import apply_compile


def _packed(rows: int, T: int, cuts: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 896, (rows, T), generator=g)
    doc, pos = torch.zeros(rows, T, dtype=torch.long), torch.zeros(rows, T, dtype=torch.long)
    for start, end, i in zip([0, *cuts], [*cuts, T], range(len(cuts) + 1)):
        doc[:, start:end], pos[:, start:end] = i, torch.arange(end - start)
    return ids, pos, doc


def test_layouts_reuse_the_graph_and_shapes_recompile_once():
    torch._dynamo.reset()
    counters.clear()
    model, _ = tiny_model()
    apply_compile(model, backend="eager")
    graphs = []
    steps = [
        (2, 64, [10, 30]),
        (2, 64, [5]),
        (2, 64, [20, 40, 50]),
        (2, 64, []),
        (2, 48, [7]),
        (2, 32, [3, 9]),
    ]
    for seed, (rows, T, cuts) in enumerate(steps):
        model(*_packed(rows, T, cuts, seed)).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[:4] == [1, 1, 1, 1]  # four layouts of the same shape: one graph
    assert graphs[4] == 2  # a new row length: one recompile, T becomes dynamic
    assert graphs[5] == 2  # a third row length reuses the dynamic graph
