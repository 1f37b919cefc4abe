"""Distillation from teacher top-k stored with the data (`posttrain teacher-topk`, then
`distill.source: offline_topk`): with k = the whole vocabulary it is the online teacher's forward KL;
with small k it is the forward KL from the renormalised top-k, computed here by hand from the file's
rows; packing carries each row to its token; a tiny run's loss falls; bad set-ups name the key or row.

The teacher is a small randomly initialised model (init_std 0.2, so its distributions are far from
uniform); the student is configs/tiny/distill.yaml's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.cli import main as cli
from posttrain.config import load_job
from posttrain.data.labels import IGNORE
from posttrain.data.packing import BestFitPacker, collate, rows_from_state, rows_to_state
from posttrain.errors import ConfigError, DataError
from tests.helpers import ROOT, write_jsonl

CONFIG = ROOT / "configs/tiny/distill.yaml"
TEACHER = (
    "distill.teacher={arch: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16}, init_std: 0.2}"
)
VOCAB = 843  # the builtin tokenizer's real vocabulary (rows padded to 896 in the model)


def _job(data: Path, *overrides: str, out: Path | None = None):
    return load_job(
        CONFIG,
        [
            f"output_dir={out or data.parent / 'out'}",
            "metrics.progress=quiet",
            "metrics.peak_flops_per_s=1e11",
            f"data.train.path={data}",
            "data.eval=null",
            "training.export_hf=false",
            "distill.teacher=null",  # offline unless an override brings TEACHER back
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """24 distill records; their teacher top-k at k = the vocabulary (T=1) and k = 3 (T=2)."""
    d = tmp_path_factory.mktemp("distill")
    lines = (ROOT / "data/tiny/distill_train.jsonl").read_text().splitlines()[:24]
    plain = write_jsonl(d / "plain.jsonl", [json.loads(x) for x in lines])
    out = {"plain": plain}
    for name, k, temperature in (("full", VOCAB, 1.0), ("top3", 3, 2.0)):
        out[name] = d / f"{name}.jsonl"
        args = [str(CONFIG), f"data.train.path={plain}", TEACHER, f"distill.temperature={temperature}"]
        assert cli(["teacher-topk", *args, "--k", str(k), "--out", str(out[name])]) == 0
    return out


def _tokenizer():
    from posttrain.data.tokenizer import Tokenizer

    return Tokenizer.from_dir("builtin")


def _samples(path: Path, max_len: int = 256, overlong: str = "truncate"):
    from posttrain.config import SourceConfig
    from posttrain.data.samples import load_samples

    return load_samples(
        SourceConfig(path=str(path), format="distill"), _tokenizer(), max_len=max_len, overlong=overlong
    )[0]


def _packed(samples, row_len: int = 256):
    packer = BestFitPacker(row_len, 4)
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    assert len(rows) < len(samples)  # several records share a row
    return rows


def _student_and_loss(cfg):
    from posttrain.parallel.build import build_model_for
    from posttrain.recipes import distill

    tok = _tokenizer()
    student = build_model_for(cfg.model, tok, cfg.seed).module
    if cfg.distill.resolved_source == "online":
        teacher = build_model_for(cfg.distill.teacher, tok, cfg.seed).module.requires_grad_(False).eval()
        divergence = distill.online_teacher(cfg, teacher, tok.vocab_size, copy_teacher_head=False)
    else:
        divergence = distill.offline_topk(cfg, tok.vocab_size)
    return student, distill.distill_loss_fn(cfg, divergence, tok.vocab_size)


def test_the_file_has_one_row_per_completion_token(files):
    tok = _tokenizer()
    for name, k in (("full", VOCAB), ("top3", 3)):
        for line in files[name].read_text().splitlines()[:3]:
            rec = json.loads(line)
            messages = [*rec["messages"], {"role": "assistant", "content": rec["completion"]}]
            _, labels = tok.render_chat(messages, mask="last_assistant")
            rows = rec["teacher_topk"]
            assert len(rows["ids"]) == sum(y != IGNORE for y in labels[1:]) and len(rows["ids"][0]) == k
            assert rows["logprobs"][0] == sorted(rows["logprobs"][0], reverse=True)  # the k most likely
            if k == VOCAB:  # the whole distribution: probabilities sum to 1
                assert abs(sum(np.exp(rows["logprobs"][0])) - 1.0) < 1e-4


def test_topk_over_the_whole_vocabulary_equals_the_online_teacher(files):
    """Same student, same packed batch: offline (stored rows, k = V) == online (the teacher model)."""
    offline_cfg = _job(files["full"], "distill.alpha=0.5")
    online_cfg = _job(files["full"], "distill.alpha=0.5", TEACHER)
    assert (offline_cfg.distill.resolved_source, online_cfg.distill.resolved_source) == (
        "offline_topk",
        "online",
    )
    batch = collate(_packed(_samples(files["full"])), _tokenizer().pad_id, 256)
    results = []
    for cfg in (offline_cfg, online_cfg):
        student, loss_fn = _student_and_loss(cfg)
        loss, metrics = loss_fn(student, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters()])
        results.append((float(loss.detach()), float(metrics["distill_loss"]), grads))
    (off, off_kd, g_off), (on, on_kd, g_on) = results
    n = int((batch["targets"] != IGNORE).sum())
    grad_rel = float((g_off - g_on).abs().max() / g_on.abs().max())
    print(f"per token: offline {off / n:.7f} online {on / n:.7f}; kd {off_kd / n:.7f} vs {on_kd / n:.7f}")
    print(f"grad max rel diff {grad_rel:.1e}")
    assert abs(off - on) / n <= 1e-5 and abs(off_kd - on_kd) / n <= 1e-5
    assert off_kd / n > 0.1  # a real divergence, not two zeros
    assert grad_rel <= 1e-4


def test_small_k_is_the_forward_kl_from_the_renormalised_topk_by_hand(files):
    """The packed offline loss (T=2, k=3) == sum over each record's stored rows t of
    sum_j p'_tj (log p'_tj - log p_s(id_tj)), p' = the stored probabilities renormalised over the k ids,
    log p_s the student's log-softmax(logits / 2) at the position predicting token t, record by record
    from the JSON (unpacked) forward."""
    from posttrain.data.topk import loss_positions

    cfg = _job(files["top3"], "distill.alpha=1.0", "distill.temperature=2.0")
    student, loss_fn = _student_and_loss(cfg)
    batch = collate(_packed(_samples(files["top3"])), _tokenizer().pad_id, 256)
    with torch.no_grad():
        ours = float(loss_fn(student, batch)[0])
        tok, hand = _tokenizer(), 0.0
        for line in files["top3"].read_text().splitlines():
            rec = json.loads(line)
            ids, labels = tok.render_chat(
                [*rec["messages"], {"role": "assistant", "content": rec["completion"]}], mask="last_assistant"
            )
            h, w = student(torch.tensor([ids]), head_fn=lambda h, w: (h, w))
            s_logp = ((h[0] @ w[:VOCAB].T) / 2.0).log_softmax(-1)  # row j predicts token j + 1
            t_ids = torch.tensor(rec["teacher_topk"]["ids"])
            t_logp = torch.tensor(rec["teacher_topk"]["logprobs"], dtype=torch.float64)
            p = (t_logp - t_logp.logsumexp(-1, keepdim=True)).exp()
            s = s_logp[torch.from_numpy(loss_positions(labels) - 1)].double().gather(-1, t_ids)
            hand += float((p * (p.log() - s)).sum())
    print(f"packed offline loss {ours:.6f}, by hand {hand:.6f}, rel {abs(ours - hand) / hand:.1e}")
    assert abs(ours - hand) <= 1e-5 * hand
    assert hand > 1.0


def _marked_records(path: Path, out: Path) -> Path:
    """Records whose row t stores ids [the token it describes, the record's number, t] (k = 3)."""
    tok, rows = _tokenizer(), []
    for r, line in enumerate(path.read_text().splitlines()):
        rec = json.loads(line)
        ids, labels = tok.render_chat(
            [*rec["messages"], {"role": "assistant", "content": rec["completion"]}], mask="last_assistant"
        )
        targets = [y for y in labels[1:] if y != IGNORE]
        topk = {
            "ids": [[y, r, t] for t, y in enumerate(targets)],
            "logprobs": [[-0.5, -1.0, -2.0]] * len(targets),
        }
        rows.append({**rec, "teacher_topk": topk})
    return write_jsonl(out, rows)


@pytest.mark.parametrize("overlong", ["truncate", "split"])
def test_packing_carries_each_row_to_its_token(files, tmp_path, overlong):
    """Packed == unpacked: each loss position gets the row of the token it predicts (column 0 == its
    target), of its own record (column 1), in order (column 2); truncation and splitting (max_len 40
    cuts the longer records) drop rows with their tokens; a checkpointed row restores them."""
    marked = _marked_records(files["plain"], tmp_path / "marked.jsonl")
    samples = _samples(marked, max_len=40, overlong=overlong)
    assert any(len(s.input_ids) == 40 for s in samples)  # some records were cut
    pad = _tokenizer().pad_id
    packed = collate(rows_from_state(rows_to_state(_packed(samples, 80))), pad, 80)
    unpacked = [collate([[s]], pad) for s in samples]

    def rows_by_token(batch):
        keep = batch["targets"] != IGNORE
        ids = batch["teacher_topk_ids"]
        assert ids.shape == (int(keep.sum()), 3) and torch.equal(ids[:, 0], batch["targets"][keep])
        return sorted(map(tuple, ids.tolist()))

    one_by_one = sorted(r for b in unpacked for r in rows_by_token(b))
    assert rows_by_token(packed) == one_by_one
    # Within a document the rows are the record's rows t in increasing order.
    for b in unpacked:
        r, t = b["teacher_topk_ids"][:, 1], b["teacher_topk_ids"][:, 2]
        assert (r == r[0]).all() and (t.diff() >= 1).all()
    # The loss agrees too: sum over the packed batch == sum over the records one by one.
    cfg = _job(marked, "distill.alpha=0.5")
    student, loss_fn = _student_and_loss(cfg)
    with torch.no_grad():
        whole = float(loss_fn(student, packed)[0])
        parts = sum(float(loss_fn(student, b)[0]) for b in unpacked)
    assert abs(whole - parts) <= 1e-5 * abs(parts)


def test_a_tiny_offline_distillation_run_learns(files, tmp_path):
    from posttrain.recipes import distill

    cfg = _job(
        files["top3"],
        "distill.temperature=2.0",
        "training.max_steps=10",
        "training.global_batch_size=4",
        "training.micro_batch_size_per_device=4",
        "schedule.warmup_steps=0",
        "optim.lr=2e-2",
        out=tmp_path / "run",
    )
    summary = distill.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    print(f"distill_loss {first['distill_loss']:.3f} -> {last['distill_loss']:.3f}")
    # measured 5.66 -> 4.29 (a random student starts near log(843) minus the renormalised teacher's
    # entropy; matching a random teacher's top 3 is slow, so the bound is loose)
    assert summary["steps"] == 10 and last["distill_loss"] < 0.85 * first["distill_loss"]


def test_chat_records_become_distill_records(tmp_path):
    """teacher-topk also reads chat data: the last (assistant) message becomes the completion, other
    fields stay, and the rows match the completion as the distill renderer renders it."""
    lines = (ROOT / "data/tiny/sft_train.jsonl").read_text().splitlines()[:4]
    chats = write_jsonl(tmp_path / "chat.jsonl", [json.loads(x) for x in lines])
    out = tmp_path / "topk.jsonl"
    args = [str(CONFIG), f"data.train.path={chats}", "data.train.format=chat", TEACHER]
    assert cli(["teacher-topk", *args, "--k", "5", "--out", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    source = json.loads(lines[0])
    assert records[0]["completion"] == source["messages"][-1]["content"] == source["answer"]
    assert records[0]["messages"] == source["messages"][:-1] and records[0]["task"] == source["task"]
    samples = _samples(out)  # loads as distill records: the rows line up with the completion tokens
    assert len(samples) == 4 and all(s.topk_ids is not None and s.topk_ids.shape[1] == 5 for s in samples)


def test_bad_setups_name_the_key_or_the_row(files, tmp_path):
    from posttrain.recipes import distill

    with pytest.raises(ConfigError, match=r"data.train.format='chat' stores no teacher top-k"):
        distill.train(_job(files["plain"], "data.train.format=chat"))
    with pytest.raises(ConfigError, match="kind=jsd needs the teacher's whole distribution"):
        _job(files["top3"], "distill.kind=jsd")
    with pytest.raises(ConfigError, match="source=online needs distill.teacher"):
        _job(files["top3"], "distill.source=online")
    # A record without teacher_topk (eval set: read before any model is built).
    with pytest.raises(DataError, match=r"plain\.jsonl:1: no field 'teacher_topk'"):
        distill.train(_job(files["top3"], f"data.eval={{path: {files['plain']}, format: distill}}"))
    # Rows that do not match the rendered completion.
    rec = json.loads(files["top3"].read_text().splitlines()[0])
    rec["teacher_topk"] = {k: v[:-1] for k, v in rec["teacher_topk"].items() if k != "temperature"}
    short = write_jsonl(tmp_path / "short.jsonl", [rec])
    with pytest.raises(DataError, match=r"short\.jsonl:1: field 'teacher_topk' has \d+ rows, but the record"):
        _samples(short)
    # The command needs a teacher, and k within the vocabulary.
    from posttrain.train.offline import write_teacher_topk

    with pytest.raises(ConfigError, match="teacher-topk needs distill.teacher"):
        write_teacher_topk(_job(files["plain"]), 3, tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match=r"--k 844: must lie in \[1, 843\]"):
        write_teacher_topk(_job(files["plain"], TEACHER), 844, tmp_path / "x.jsonl")
    assert cli(["teacher-topk", str(CONFIG), "distill.teacher=null", "--k", "3", "--out", "x"]) == 2
