"""The vocabulary service end to end: adding 1,000 semantic-ID tokens, training and exporting gives a
checkpoint whose vocab matches its tokenizer and loads in transformers; train_new_token_rows_only leaves
every old weight bit-identical; from-scratch exports drop the padding rows, which never win generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_ARCH, tiny_model, tokenizer, write_jsonl
from safetensors.torch import load_file

from posttrain.config import load_job
from posttrain.generate import greedy_generate
from posttrain.metrics.jsonl import read_jsonl
from posttrain.models import hf_io, vocab
from posttrain.recipes import sft
from posttrain.train import checkpoint as ckpt

TOL = 1e-4
OLD_VOCAB = 843  # the builtin tokenizer
NUM_SIDS = 1000
NEW_VOCAB = OLD_VOCAB + NUM_SIDS  # 1843
TRAIN_ROWS = 1856  # 1843 padded up to a multiple of 64 (29 * 64)
STEPS = 12


def sid_rows(i: int) -> list[int]:
    """The three semantic IDs of item i (ids 843 + sid)."""
    return [i, 400 + i, 999 - i]


USED_SIDS = sorted({s for i in range(24) for s in sid_rows(i)})


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    """A tiny untied Qwen3 with the builtin tokenizer's 843 rows, and chats whose answers are <sid_N>s."""
    tmp = tmp_path_factory.mktemp("vocab")
    tok = tokenizer()
    torch.manual_seed(0)
    model, config = hf_io.build_model("qwen3", {"vocab_size": tok.vocab_size, **TINY_ARCH})
    base = tmp / "base"
    hf_io.save_pretrained(model, config, base)
    tok.save(base)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Semantic ID of item {i}?"},
                {"role": "assistant", "content": "".join(f"<sid_{s}>" for s in sid_rows(i))},
            ]
        }
        for i in range(24)
    ]
    data = write_jsonl(tmp / "sids.jsonl", rows)
    return tmp, base, data


def run_job(tmp: Path, base: Path, data: Path, name: str, *overrides: str) -> Path:
    out = tmp / name
    cfg = load_job(
        ROOT / "configs/tiny/sft.yaml",
        [
            f"output_dir={out}",
            "model.arch=null",
            f"model.path={base}",
            f"tokenizer.semantic_id_tokens={NUM_SIDS}",
            f"data.train.path={data}",
            "data.eval=null",
            "data.max_tokens_per_pack=64",
            f"training.max_steps={STEPS}",
            f"training.save_every_steps={STEPS}",
            "training.eval_every_steps=0",
            "training.global_batch_size=4",
            "training.micro_batch_size_per_device=4",
            "optim.lr=1e-2",
            "schedule.warmup_steps=0",
            "metrics.progress=quiet",
            "metrics.peak_flops_per_s=1e11",
            *overrides,
        ],
    )
    sft.train(cfg)
    return out


@pytest.fixture(scope="module")
def full_run(base_and_data):
    return run_job(*base_and_data, "full")


@pytest.fixture(scope="module")
def new_rows_run(base_and_data):
    return run_job(
        *base_and_data, "new_rows", "model.train_new_token_rows_only=true", "optim.weight_decay=0.1"
    )


def test_semantic_ids_export_matches_tokenizer_and_loads_in_transformers(full_run):
    """1,000 <sid_N> tokens: config.json vocab_size == len(tokenizer) == 1843, <sid_999> is one id, and
    transformers computes our logits on OUTPUT/hf within 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = full_run
    hf_dir = out / "hf"
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == len(hf_tok) == NEW_VOCAB
    assert hf_tok.encode("<sid_999>", add_special_tokens=False) == [NEW_VOCAB - 1]
    assert hf_tok.encode("<sid_0><sid_500>", add_special_tokens=False) == [OLD_VOCAB, OLD_VOCAB + 500]
    weights = load_file(hf_dir / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (NEW_VOCAB, 64)
    assert weights["lm_head.weight"].shape == (NEW_VOCAB, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert any("vocabulary grown 843 -> 1843 tokens (1000 new rows" in n for n in summary["model_notes"])
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < 0.7 * losses[0]

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, ours_cfg = hf_io.load_pretrained(hf_dir)
    assert ours_cfg.vocab_size == NEW_VOCAB
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": "Semantic ID of item 3?"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    ids = torch.tensor([prompt + [OLD_VOCAB + 3, OLD_VOCAB + 403, NEW_VOCAB - 1]])
    with torch.no_grad():
        hf_logits = hf(ids).logits
        our_logits = ours.logits(ours.eval()(ids))
    assert hf_logits.shape == (1, ids.shape[1], NEW_VOCAB)
    assert (hf_logits - our_logits).abs().max().item() <= TOL


def test_train_new_token_rows_only_keeps_old_weights_bitwise(base_and_data, new_rows_run):
    """With train_new_token_rows_only and weight_decay 0.1, every non-vocabulary weight and rows < 843 equal
    the base bit for bit; the used <sid_N> embedding rows moved, unused ones stayed at the mean init."""
    _, base, _ = base_and_data
    out = new_rows_run
    base_sd = hf_io.load_pretrained(base)[0].state_dict()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["model"]
    summary = json.loads((out / "summary.json").read_text())
    # trainable: the two vocabulary matrices (1856 x 64 each), old rows masked by the hook
    assert summary["num_trainable_params"] == 2 * TRAIN_ROWS * 64
    assert any(
        "training only vocabulary rows >= 843 (1013 rows incl. padding)" in n for n in summary["model_notes"]
    )
    assert sorted(state) == sorted(base_sd)
    for name, tensor in state.items():
        if name in ("tok_embeddings.weight", "lm_head.weight"):
            assert tensor.shape == (TRAIN_ROWS, 64)
            assert torch.equal(tensor[:OLD_VOCAB], base_sd[name]), name
        else:
            assert torch.equal(tensor, base_sd[name]), name
    emb, head = state["tok_embeddings.weight"], state["lm_head.weight"]
    mean_emb = base_sd["tok_embeddings.weight"].mean(0)
    used = torch.tensor(USED_SIDS) + OLD_VOCAB
    unused = torch.tensor(sorted(set(range(NUM_SIDS)) - set(USED_SIDS))) + OLD_VOCAB
    # the embedding rows of sids in the data moved; the others were never looked up
    assert ((emb[used] - mean_emb).abs().amax(dim=1) > 1e-3).all()
    assert torch.equal(emb[unused], mean_emb.expand(len(unused), 64))
    # the output rows of used sids moved (they are targets); padding rows 1843.. never get gradient
    assert ((head[used] - base_sd["lm_head.weight"].mean(0)).abs().amax(dim=1) > 1e-3).all()
    assert torch.equal(head[NEW_VOCAB:], base_sd["lm_head.weight"].mean(0).expand(TRAIN_ROWS - NEW_VOCAB, 64))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    # the export still matches its tokenizer
    assert json.loads((out / "hf/config.json").read_text())["vocab_size"] == NEW_VOCAB


def test_resize_vocab_initialises_new_rows_at_the_mean_of_old_rows():
    """resize_vocab keeps old rows, fills new rows with the mean of rows [0, num_init_rows) only, and
    updates config.vocab_size; shrinking trims."""
    model, config = tiny_model(vocab_size=896)
    with torch.no_grad():
        model.tok_embeddings.weight[843:] = 100.0  # padding rows must not enter the mean
        model.lm_head.weight[843:] = -100.0
    emb_before = model.tok_embeddings.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    assert vocab.resize_vocab(model, 1920, num_init_rows=843) == 896
    emb, head = model.tok_embeddings.weight, model.lm_head.weight
    assert emb.shape == head.shape == (1920, 64) and config.vocab_size == 1920
    assert model.tok_embeddings.num_embeddings == 1920 and model.lm_head.out_features == 1920
    assert torch.equal(emb[:896], emb_before) and torch.equal(head[:896], head_before)
    expected_emb = emb_before[:843].sum(0) / 843
    expected_head = head_before[:843].sum(0) / 843
    assert torch.allclose(emb[896:], expected_emb.expand(1024, 64), atol=1e-7, rtol=0)
    assert torch.allclose(head[896:], expected_head.expand(1024, 64), atol=1e-7, rtol=0)
    assert emb[896:].abs().max().item() < 1.0  # the +100 padding rows were left out
    assert emb.requires_grad and head.requires_grad
    assert vocab.resize_vocab(model, 843, num_init_rows=843) == 1920
    assert torch.equal(model.tok_embeddings.weight, emb_before[:843]) and config.vocab_size == 843
    assert (vocab.padded(843), vocab.padded(1843), vocab.padded(896)) == (896, 1856, 896)
    assert vocab.export_vocab_size(1843, 843) == 1843 and vocab.export_vocab_size(151_669, 151_936) == 151_936


def test_from_scratch_export_trims_padding_rows(tmp_path):
    """configs/tiny/sft.yaml (model.arch) trains on 896 rows but exports vocab_size 843, like its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    cfg = load_job(
        ROOT / "configs/tiny/sft.yaml",
        [
            f"output_dir={out}",
            "training.max_steps=3",
            "training.eval_every_steps=0",
            "training.save_every_steps=0",
            "training.global_batch_size=4",
            "training.micro_batch_size_per_device=4",
            "data.max_tokens_per_pack=128",
            f"data.train.path={ROOT / 'data/tiny/sft_train.jsonl'}",
            "data.train.max_samples=64",
            "data.eval=null",
            "metrics.progress=quiet",
            "metrics.peak_flops_per_s=1e11",
        ],
    )
    summary = sft.train(cfg)
    assert summary["steps"] == 3
    hf_dir = out / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == OLD_VOCAB
    assert len(AutoTokenizer.from_pretrained(hf_dir)) == OLD_VOCAB
    # tied (configs/tiny/sft.yaml): one [843, 128] matrix
    assert load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"].shape == (OLD_VOCAB, 128)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, _ = hf_io.load_pretrained(hf_dir)
    ids = torch.randint(0, OLD_VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ours.eval()(ids))).abs().max().item() <= TOL


def test_padded_logits_never_win_greedy_generation():
    """Even with huge padded output rows, greedy_generate only emits ids < 843, the same ids as without them."""
    model, _ = tiny_model(vocab_size=896)
    model.eval()
    tok = tokenizer()
    prompts = [tok.encode("What is 2 + 2?"), tok.encode("Reverse: a b c d"), [5]]
    kwargs = dict(max_new_tokens=6, stop_ids=[tok.end_of_turn_id], pad_id=tok.pad_id)
    reference = greedy_generate(model, prompts, num_real_vocab=OLD_VOCAB, **kwargs)
    with torch.no_grad():
        # padded logits now dwarf every real one: +-1e4 in every coordinate, so for any hidden state
        # half the padded rows score about 1e4 * |sum(h)|
        model.lm_head.weight[OLD_VOCAB:869] = 1e4
        model.lm_head.weight[869:] = -1e4
    masked = greedy_generate(model, prompts, num_real_vocab=OLD_VOCAB, **kwargs)
    unmasked = greedy_generate(model, prompts, num_real_vocab=896, **kwargs)
    assert all(t < OLD_VOCAB for row in masked for t in row)
    assert masked == reference
    # the setup bites: without the mask every generated id is a padding row
    assert all(t >= OLD_VOCAB for row in unmasked for t in row)
