"""`import posttrain` (and the config, CLI and metrics modules every command loads) stays light: no
torch, no Ray, no vLLM and no tracker backend until a command needs one (STYLE.md, principle 10)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "ray", "vllm", "mlflow", "tensorboard", "wandb", "matplotlib", "transformers")


def imported_after(code: str) -> list[str]:
    probe = f"import json, sys; {code}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_posttrain_stays_light():
    modules = "posttrain, posttrain.config, posttrain.metrics.trackers, posttrain.metrics.runs, "
    modules += "posttrain.metrics.report, posttrain.cli"
    assert imported_after(f"import {modules}") == []


def test_the_probe_sees_a_heavy_import():
    assert imported_after("import posttrain, torch") == ["torch"]
