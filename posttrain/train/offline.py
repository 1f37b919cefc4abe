"""Offline passes of a frozen model over a job's data, so that training needs no second model:

* `precompute_reference` (`posttrain precompute-reference`): the DPO reference, i.e. the job's starting
  weights, scores every pair of data.train and data.eval; the per-pair log-probabilities go to one
  file keyed by the tokenised pair (posttrain/data/reference.py), which `dpo.reference: precomputed`
  reads.
* `write_teacher_topk` (`posttrain teacher-topk`): the distillation teacher scores every record's
  completion; the records are written back with their `teacher_topk` rows (posttrain/data/topk.py),
  which `distill.source: offline_topk` trains on.

Both read every record of their sources once, in file order, rendered exactly as training renders them
(same renderer, `on_error` policy and tokenizer; no `max_samples` cap, no overlong cut: training cuts
per-position rows along with the tokens). One record per row, padded, a training micro-batch's worth
of tokens per forward; one process on one device (the GPU when there is one).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from posttrain.config import JobConfig, SourceConfig
from posttrain.data.labels import IGNORE
from posttrain.data.packing import collate
from posttrain.data.reference import pair_key, reference_file, reference_identity, write_reference_logps
from posttrain.data.render import renderer
from posttrain.data.samples import Sample, render_record
from posttrain.data.schemas import validate
from posttrain.data.sources import SourceStream
from posttrain.errors import ConfigError, DataError
from posttrain.train.losses import AUTO_CHUNK_BYTES

Item = tuple[str, dict, Sample, str]  # (path:line, record, its sample, the source's format)


def _sources(cfg: JobConfig, split: str, formats: tuple[str, ...]) -> list[tuple[str, SourceConfig]]:
    """(config key, source) of data.train ("train"), data.eval ("eval") or both ("all"); formats checked."""
    train = cfg.data.train_sources
    named = [(f"data.train[{i}]" if len(train) > 1 else "data.train", s) for i, s in enumerate(train)]
    if cfg.data.eval is not None:
        named.append(("data.eval", cfg.data.eval))
    picked = [(k, s) for k, s in named if split == "all" or k.startswith(f"data.{split}")]
    if not picked:
        raise ConfigError(f"data.{split} is not set: nothing to read")
    for key, source in picked:
        if source.format not in formats:
            raise ConfigError(f"{key}.format={source.format!r}: this command reads {' or '.join(formats)}")
    return picked


def _items(sources: list[tuple[str, SourceConfig]], render_for) -> Iterator[Item]:
    """Every usable record of one pass over each source, in file order, with its rendered sample."""
    for index, (_, source) in enumerate(sources):
        stream = SourceStream(source.model_copy(update={"max_samples": None}), index, epochs=1)
        render = render_for(source)
        while (item := stream.next_record()) is not None:
            for sample in render_record(stream, item, render, sys.maxsize, "truncate"):
                yield item[0], item[1], sample, source.format


def _groups(items: Iterator[Item], max_tokens: int) -> Iterator[list[Item]]:
    """Consecutive items whose padded batch (rows x longest) stays within max_tokens (at least one)."""
    group: list[Item] = []
    for item in items:
        longest = max([len(item[2].input_ids), *(len(g[2].input_ids) for g in group)])
        if group and longest * (len(group) + 1) > max_tokens:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _forward(model, group: list[Item], pad_id: int, head_fn):
    """head_fn(h, w, batch) of one record per row (a pair keeps its two documents apart)."""
    batch = collate([[g[2]] for g in group], pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        return model(
            batch["input_ids"],
            batch["position_ids"],
            batch.get("doc_ids"),
            head_fn=lambda h, w: head_fn(h, w, batch),
        )


def _frozen(model_cfg, tokenizer, seed: int):
    from posttrain.parallel.build import build_model_for

    model = build_model_for(model_cfg, tokenizer, seed).module
    return model.to("cuda" if torch.cuda.is_available() else "cpu").requires_grad_(False).eval()


def precompute_reference(cfg: JobConfig, out: str | None = None) -> tuple[Path, int]:
    """Score every pair of data.train and data.eval with the job's starting weights; write the file
    `dpo.reference_logps` names (or `out`). Returns (file, pairs written)."""
    from posttrain.train.preference import sequence_logprobs
    from posttrain.train.setup import build_tokenizer

    if out is None and cfg.dpo.reference_logps is None:
        raise ConfigError("give --out FILE_OR_DIR or set dpo.reference_logps: where to write the reference")
    path = reference_file(out if out is not None else cfg.dpo.reference_logps)
    sources = _sources(cfg, "all", ("preference",))
    tokenizer = build_tokenizer(cfg.tokenizer)
    # The starting policy: LoRA adapters start at zero, so the reference is the base model.
    model = _frozen(
        cfg.model.model_copy(update={"lora": None, "train_new_token_rows_only": False}), tokenizer, cfg.seed
    )

    def head(h, w, batch):
        n = batch["doc_lens"].numel()
        return sequence_logprobs(
            h,
            w,
            batch["targets"],
            batch["doc_index"],
            n,
            chunk_size=cfg.training.loss_chunk_size_tokens,
            num_real_vocab=tokenizer.vocab_size,
        )

    def entries():
        items = _items(sources, lambda s: renderer(s.format, tokenizer, cfg.data.mask))
        for group in _groups(items, _tokens_per_forward(cfg)):
            logps = _forward(model, group, tokenizer.pad_id, head).tolist()  # chosen, rejected per pair
            for i, (loc, _, sample, _) in enumerate(group):
                yield pair_key(sample), logps[2 * i], logps[2 * i + 1], loc

    identity = reference_identity(cfg.model, cfg.tokenizer, cfg.seed)
    return path, write_reference_logps(path, identity, entries())


def as_distill_record(fmt: str, record: dict) -> dict:
    """A `distill` or `chat` record as a distill record (prompt + completion), other fields kept and any
    old teacher_topk dropped. A chat record's last message must be the assistant's answer."""
    out = {k: v for k, v in record.items() if k != "teacher_topk"}
    if fmt == "distill":
        return out
    messages = validate("chat", record)
    if messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's (the completion to score)", "no_completion")
    del out["messages"]
    return {"messages": messages[:-1], "completion": messages[-1]["content"], **out}


def write_teacher_topk(cfg: JobConfig, k: int, out: str | Path, split: str = "train") -> int:
    """Write data.train's (or data.eval's) records to `out` as distill records with the teacher's top-k
    log-probabilities at distill.temperature for every completion token. Returns the records written."""
    from posttrain.data.topk import render_distill
    from posttrain.train.setup import build_tokenizer

    if cfg.distill is None or cfg.distill.teacher is None:
        raise ConfigError(
            "teacher-topk needs distill.teacher: the model whose top-k log-probabilities to store"
        )
    sources = _sources(cfg, split, ("distill", "chat"))
    tokenizer = build_tokenizer(cfg.tokenizer)
    vocab, temperature = tokenizer.vocab_size, cfg.distill.temperature
    if not 1 <= k <= vocab:
        raise ConfigError(f"--k {k}: must lie in [1, {vocab}] (the tokenizer's vocabulary)")
    from posttrain.train.distill import check_teacher_tokenizer

    check_teacher_tokenizer(cfg.distill.teacher.path, tokenizer)
    teacher = _frozen(cfg.distill.teacher, tokenizer, cfg.seed)
    # positions per log-softmax block: as the losses size theirs (~AUTO_CHUNK_BYTES of fp32 logits)
    chunk = cfg.training.loss_chunk_size_tokens or max(64, AUTO_CHUNK_BYTES // (4 * vocab))

    def head(h, w, batch):  # per row: top-k of log_softmax(logits / T) at its loss positions
        keep = batch["targets"] != IGNORE
        rows = []
        for b in range(h.shape[0]):
            h_LD = h[b][keep[b]]
            parts = [
                torch.log_softmax((h_LD[i : i + chunk] @ w[:vocab].T).float() / temperature, -1).topk(k, -1)
                for i in range(0, h_LD.shape[0], chunk)
            ]
            rows.append((torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])))
        return rows

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, n = path.with_name(f".{path.name}.tmp"), 0
    render_for = lambda s: lambda obj: render_distill(tokenizer, as_distill_record(s.format, obj))  # noqa: E731
    with tmp.open("w") as f:
        for group in _groups(_items(sources, render_for), _tokens_per_forward(cfg)):
            for (_, record, _, fmt), (ids, logps) in zip(
                group, _forward(teacher, group, tokenizer.pad_id, head)
            ):
                topk = {"ids": ids.tolist(), "logprobs": logps.tolist(), "temperature": temperature}
                f.write(json.dumps({**as_distill_record(fmt, record), "teacher_topk": topk}) + "\n")
                n += 1
    os.replace(tmp, path)
    return n


def _tokens_per_forward(cfg: JobConfig) -> int:
    """A training micro-batch's worth of (padded) tokens."""
    return cfg.data.max_tokens_per_pack * cfg.training.micro_batch_size_per_device
