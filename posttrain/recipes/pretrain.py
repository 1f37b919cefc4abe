"""Pretraining (or continued pretraining) on raw text: every token bears loss, documents are
packed into rows with document masks. The flow is SFT's (see posttrain.recipes.sft.train); only the
accepted data format differs, so the two recipes cannot drift apart."""

from __future__ import annotations

from posttrain.config import JobConfig
from posttrain.recipes import sft


def train(cfg: JobConfig) -> dict:
    return sft.train(cfg, formats=("text",))


main = train
