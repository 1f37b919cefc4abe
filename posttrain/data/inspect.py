"""`posttrain data inspect`: show the first training samples exactly as the trainer sees them.

Text mode prints each sample rendered back from its ids, with loss-bearing tokens highlighted
(colour on a terminal, `{{...}}` otherwise). `--json` prints one object per sample with
`input_ids` and `labels` (-100 where ignored), so masks can be checked with any tool.
"""

from __future__ import annotations

import json
import sys

from posttrain.config import JobConfig
from posttrain.data.labels import IGNORE
from posttrain.data.samples import Sample, load_samples
from posttrain.data.tokenizer import Tokenizer


def _spans(tokenizer: Tokenizer, sample: Sample) -> list[tuple[bool, str]]:
    """Consecutive runs of tokens with the same loss flag, decoded (special tokens kept)."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(sample.input_ids, sample.labels):
        flag = lab != IGNORE
        if runs and runs[-1][0] == flag:
            runs[-1][1].append(tok)
        else:
            runs.append((flag, [tok]))
    return [(flag, tokenizer.decode(ids, skip_special_tokens=False)) for flag, ids in runs]


def inspect(cfg: JobConfig, num_samples: int = 3, as_json: bool = False, out=None) -> list[Sample]:
    out = out or sys.stdout
    tokenizer = Tokenizer.from_dir(cfg.tokenizer.path, cfg.tokenizer.extra_special_tokens)
    source = cfg.data.train_sources[0].model_copy(update={"max_samples": num_samples})
    samples, skips = load_samples(
        source,
        tokenizer,
        max_len=cfg.data.max_tokens_per_pack,
        overlong=cfg.data.overlong,
        mask=cfg.data.mask,
    )
    samples = samples[:num_samples]
    color = not as_json and hasattr(out, "isatty") and out.isatty()
    for i, sample in enumerate(samples):
        if as_json:
            out.write(json.dumps({"index": i, "input_ids": sample.input_ids, "labels": sample.labels}) + "\n")
            continue
        n_loss = sum(1 for y in sample.labels if y != IGNORE)
        out.write(f"--- sample {i}: {len(sample.input_ids)} tokens, {n_loss} bear loss ---\n")
        for flag, text in _spans(tokenizer, sample):
            if flag:
                text = f"\x1b[1;32m{text}\x1b[0m" if color else "{{" + text + "}}"
            out.write(text)
        out.write("\n")
    if skips and not as_json:
        out.write(f"skipped while reading: {dict(skips)}\n")
    return samples
