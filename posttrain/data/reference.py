"""Precomputed DPO reference log-probabilities, stored beside the data and joined back to the pairs.

`posttrain precompute-reference` runs the job's starting weights once over every preference pair of
`data.train` and `data.eval` and writes one JSONL file:

  line 1   {"posttrain": "reference_logps", "version": 1, "reference": {model and tokenizer identity}}
  then     {"key": "<32 hex>", "chosen": -12.5, "rejected": -20.25, "row": "pref_train.jsonl:17"}

`chosen` / `rejected` are each half's summed log p(token) over its labelled tokens, in fp32 (IPO's
length-averaged values are derived from them in training). The key is a hash of the TOKENISED pair
(ids, labels and the two halves' lengths), so an entry joins back to exactly the sample it was computed
for whatever shuffling, mixing, sharding or packing did to the order, and a changed tokenizer, chat
template or record cannot silently pick up a stale value: it misses, and the miss is an error naming
the record's `path:line`. `row` is only there for people reading the file.

With `dpo.reference: precomputed` the DPO recipe attaches the values to every pair as it is rendered
(`ReferenceLogps.attach`, a pipeline annotation); collation turns them into `batch["ref_logps"]`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from posttrain.config import ModelConfig, TokenizerConfig
from posttrain.data.samples import Sample
from posttrain.errors import ConfigError, DataError

HEADER = {"posttrain": "reference_logps", "version": 1}
DEFAULT_NAME = "reference_logps.jsonl"


def reference_file(path: str | Path) -> Path:
    """dpo.reference_logps / --out as a file: a folder (existing, or written with a trailing /) holds
    reference_logps.jsonl."""
    p = Path(path)
    return p / DEFAULT_NAME if p.is_dir() or str(path).endswith("/") else p


def reference_identity(model: ModelConfig, tokenizer: TokenizerConfig, seed: int) -> dict:
    """What determines the reference's weights and tokens. The dtype is left out on purpose: a reference
    precomputed in fp32 for a bf16 run is a legitimate (more exact) choice; LoRA is left out because the
    starting policy with zero-initialised adapters IS the base model."""
    ident = {
        "family": model.family,
        "path": model.path,
        "arch": model.arch.model_dump(mode="json") if model.arch is not None else None,
        "backend": model.backend,
        "tokenizer": tokenizer.model_dump(mode="json"),
    }
    if model.arch is not None:  # weights drawn from the seed
        ident |= {"seed": seed, "init_std": model.init_std}
    return ident


def pair_key(sample: Sample) -> str:
    """Content hash of a tokenised pair: lengths of its halves, ids, labels."""
    data = np.asarray([*sample.parts, *sample.input_ids, *sample.labels], dtype=np.int64)
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def write_reference_logps(
    path: Path, identity: dict, entries: Iterable[tuple[str, float, float, str]]
) -> int:
    """Write the header and one line per (key, chosen, rejected, row); atomic (a temporary file renamed
    into place). Returns the number of pairs written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w") as f:
        f.write(json.dumps({**HEADER, "reference": identity}) + "\n")
        for key, chosen, rejected, row in entries:
            f.write(json.dumps({"key": key, "chosen": chosen, "rejected": rejected, "row": row}) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


class ReferenceLogps:
    """The (chosen, rejected) reference log-probabilities of a job's pairs, by `pair_key`."""

    def __init__(self, path: Path, logps: dict[str, tuple[float, float]]):
        self.path, self.logps = path, logps

    @classmethod
    def load(cls, path: str | Path, identity: dict) -> ReferenceLogps:
        """Read a file `write_reference_logps` wrote; its reference must be `identity` (this job's)."""
        file = reference_file(path)
        if not file.is_file():
            raise ConfigError(
                f"dpo.reference_logps: {file} does not exist; write it with "
                "`posttrain precompute-reference CONFIG` (same config and overrides as the DPO job)"
            )
        logps: dict[str, tuple[float, float]] = {}
        with file.open() as f:
            cls._check_header(file, f.readline(), identity)
            for line_no, line in enumerate(f, start=2):
                try:
                    entry = json.loads(line)
                    chosen, rejected = float(entry["chosen"]), float(entry["rejected"])
                    key = str(entry["key"])
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{file}:{line_no}: not a reference entry ({err})", "malformed_json"
                    ) from None
                if not (math.isfinite(chosen) and math.isfinite(rejected)):
                    raise DataError(f"{file}:{line_no}: non-finite reference log-probability", "nonfinite")
                logps[key] = (chosen, rejected)
        return cls(file, logps)

    @staticmethod
    def _check_header(file: Path, line: str, identity: dict) -> None:
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or any(header.get(k) != v for k, v in HEADER.items()):
            raise ConfigError(
                f"dpo.reference_logps: {file} is not a file `posttrain precompute-reference` wrote "
                f"(its first line should be a header with {HEADER})"
            )
        theirs = header.get("reference", {})
        differ = sorted(k for k in {*theirs, *identity} if theirs.get(k) != identity.get(k))
        if differ:
            shown = "; ".join(f"{k}: file {theirs.get(k)!r}, job {identity.get(k)!r}" for k in differ)
            raise ConfigError(
                f"dpo.reference_logps: {file} was computed from another reference model ({shown}); "
                "rerun `posttrain precompute-reference` with this job's config"
            )

    def attach(self, sample: Sample) -> Sample:
        """The sample with its reference log-probabilities (a pipeline annotation, see samples.Annotate)."""
        key = pair_key(sample)
        found = self.logps.get(key)
        if found is None:
            raise DataError(
                f"no precomputed reference log-probabilities for this pair (key {key}) in {self.path}; "
                "rerun `posttrain precompute-reference` over this data with this tokenizer",
                "missing_reference",
            )
        return replace(sample, ref_logps=found)
