"""Verify a checkpoint's model definition on its first load, so a job never trains a model we compute wrongly.

`build_model_for` calls `verify_on_load(model.path)` for every native-backend load (policy, DPO reference,
distillation teacher, RL workers). It runs a short `verify_dir` (QUICK_SIZES: ~128 tokens of text plus a
packed row; fp64 and fp32 gates, no bf16) on the CPU and caches the outcome under
$POSTTRAIN_CACHE/verify (default ~/.cache/posttrain/verify), keyed by the checkpoint's content and the code
that defines the model: the second load of the same checkpoint, by any process, reads the cache. A FAILED
definition raises ModelError naming the first diverging module; `model.verify: false` skips the check.

Checkpoints above VERIFY_MAX_BYTES are not checked here (fp64 copies of both implementations would not fit
a laptop, and the CPU forwards would take minutes): the note says to run `posttrain verify-model --hf-dir
DIR --device cuda` once instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError
from posttrain.models.gguf import file_fingerprint

CACHE_VERSION = 1  # bump when the meaning of a cached record changes
VERIFY_MAX_BYTES = 4 * 2**30  # weights on disk; larger checkpoints are left to `verify-model`
# Modules whose source, if edited, changes what a cached verdict means (the families are added from hf_io).
_DEFINITION_MODULES = (
    "posttrain.models.components",
    "posttrain.models.decoder",
    "posttrain.models.moe",
    "posttrain.models.hf_io",
    "posttrain.models.verify",
    "posttrain.models.verify_compare",
    "posttrain.models.verify_inputs",
)


def cache_dir() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root) / "verify"


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _code_digest() -> str:
    """sha256 of the source of every module that defines or verifies a model, and the library versions."""
    import torch

    from posttrain.models.hf_io import FAMILIES

    modules = {importlib.import_module(name) for name in _DEFINITION_MODULES}
    modules |= {sys.modules[cls.__module__] for _, cls, _, _ in FAMILIES.values()}
    # transformers' version from its metadata: importing it takes seconds, a cache hit should not
    versions = f"{CACHE_VERSION} {torch.__version__} {importlib.metadata.version('transformers')}"
    digest = hashlib.sha256(versions.encode())
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def checkpoint_key(path: str | Path) -> str:
    """Cache key: config.json's bytes, each weight file's name + fingerprint (size, first and last MiB),
    and _code_digest(). Content-based, so a copy of a checkpoint elsewhere hits the same entry."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in _weight_files(path):
        digest.update(f"{file.name} {file_fingerprint(file)}".encode())
    digest.update(_code_digest().encode())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def _locked(root: Path):
    """One verification at a time per cache (ranks and RL workers of one job load the same checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "verify.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def verify_on_load(path: str | Path) -> str:
    """Verify the checkpoint at `path` unless cached; raise ModelError if our definition fails on it.

    Returns a one-line note for the run summary."""
    from posttrain.models import verify  # torch + our models; transformers only if a check runs

    path = Path(path)
    size = sum(f.stat().st_size for f in _weight_files(path))
    if size > VERIFY_MAX_BYTES:
        return (
            f"model definition not verified on load ({size / 2**30:.1f} GiB of weights > "
            f"{VERIFY_MAX_BYTES / 2**30:.0f} GiB): run `posttrain verify-model --hf-dir {path} --device cuda`"
        )
    root = cache_dir()
    file = root / f"{checkpoint_key(path)}.json"
    with _locked(root):
        cached = file.is_file()
        if cached:
            record: dict[str, Any] = json.loads(file.read_text())
        else:
            try:
                report = verify.verify_dir(path, 0, sizes=verify.QUICK_SIZES, bf16=False)
            except ModelError:
                raise
            except Exception as e:  # e.g. transformers cannot load the directory: say so, do not cache
                first = (str(e).strip().splitlines() or [""])[0]
                raise ModelError(
                    f"model.path {path}: could not verify our definition against transformers "
                    f"({type(e).__name__}: {first}). `posttrain verify-model --hf-dir {path}` shows the "
                    "whole error; model.verify: false skips the check."
                ) from e
            record = {**report.to_json(), "path": str(path)}
            tmp = file.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, file)
    if not record["passed"]:
        failed = sorted(k for k, ok in record["gates"].items() if not ok)
        raise ModelError(
            f"model.path {path}: our {record['family']} definition does not compute what transformers "
            f"computes on this checkpoint (failed: {', '.join(failed)}; first diverging module: "
            f"{record['first_diverging']}). Full report: `posttrain verify-model --hf-dir {path}`. "
            f"To train anyway, set model.verify: false. (Cached verdict: {file})"
        )
    how = "cached verdict" if cached else f"checked in {record['seconds']:.1f}s"
    return (
        f"model definition verified against transformers on this checkpoint ({how}: fp64 rel diff "
        f"{record['fp64_rel_diff']:.1e}, fp32 err {record['fp32_ours_err']:.1e} vs transformers' "
        f"{record['fp32_hf_err']:.1e})"
    )
