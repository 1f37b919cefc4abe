"""Every YAML block in docs/*.md validates against posttrain/config.py, so no page documents a key
that does not exist.

* a block with `recipe:` is a whole job and validates as it is;
* any other block is a set of sections, merged over a small job of the page's recipe (sft unless
  the page is named after a recipe) and validated; a `model` section replaces the small job's;
* a block fenced as ```yaml invalid shows a mistake: it must fail, and its `# error: ...` comment
  must be part of the message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from posttrain.config import JobConfig, validate_job
from posttrain.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```yaml( invalid)?\n(.*?)^```", re.S | re.M)
RECIPES = JobConfig.model_fields["recipe"].annotation.__args__
BASE = {
    "output_dir": "runs/doc",
    "model": {"arch": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}},
    "data": {"train": {"path": "data/tiny/sft_train.jsonl", "format": "chat"}, "max_tokens_per_pack": 256},
    "optim": {"lr": 1e-3},
    "training": {"global_batch_size": 8, "micro_batch_size_per_device": 8, "max_steps": 10},
}  # fmt: skip


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def blocks() -> list:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            found.append(pytest.param(page, bool(m.group(1)), m.group(2), id=f"{page.name}-{i}"))
    return found


def test_the_docs_have_yaml_blocks():
    pages = {p.values[0].name for p in blocks()}
    assert {
        "sft.md",
        "dpo.md",
        "rm.md",
        "distill.md",
        "grpo.md",
        "troubleshooting.md",
        "tracking.md",
    } <= pages


@pytest.mark.parametrize("page, invalid, text", blocks())
def test_yaml_block_validates(page: Path, invalid: bool, text: str):
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), f"{page.name}: a YAML block must be a mapping"
    if "recipe" not in raw:
        recipe = page.stem if page.stem in RECIPES else "sft"
        # a block's model section replaces the base's (model.path and model.arch exclude each other)
        base = {**BASE, "recipe": recipe} | ({"model": {}} if "model" in raw else {})
        raw = merge(base, raw)
    if not invalid:
        validate_job(raw, source=page.name)
        return
    expected = re.search(r"^# error: (.*)$", text, re.M)
    with pytest.raises(ConfigError) as err:
        validate_job(raw, source=page.name)
    assert expected is None or expected.group(1) in str(err.value)
