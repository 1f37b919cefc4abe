"""Recipe-level parity: the dpo and rm recipes' own loss paths (`doc_logprobs`, `doc_scores`: pairs
rendered, packed by our packer several to a row, collated) == TRL's trainers on the same pairs.
(tests/parity/test_preference_losses.py checks the loss functions themselves, with TRL's own reference
forward; this file checks what the recipes feed them.)

DPO: TRL's DPOTrainer._compute_loss runs on transformers' Qwen3 with the pairs padded its way (chosen
rows, then rejected rows, completion masks); ours runs on our Qwen3 with the same weights and the pairs
PACKED (several pairs per row, document masks). Reference log-probabilities are given to both (TRL's
precomputed-reference path), so the comparison is the policy log-probabilities plus the loss formula,
and the gradient of every weight is compared too. Reward model: TRL's RewardTrainer.compute_loss on
transformers' Qwen3ForSequenceClassification vs our scalar head on packed pairs.
"""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.labels import IGNORE
from posttrain.data.packing import BestFitPacker, collate
from posttrain.data.pairs import render_pair
from posttrain.data.samples import Sample
from posttrain.models.heads import ScoreHead, add_head
from posttrain.models.hf_io import save_pretrained, save_sequence_classifier
from posttrain.models.qwen3 import to_hf_state_dict
from posttrain.recipes.dpo import doc_logprobs
from posttrain.recipes.rm import doc_scores
from posttrain.train.preference import bradley_terry_loss, dpo_loss
from tests.helpers import ROOT, tiny_model, tokenizer

ROWS = [json.loads(line) for line in (ROOT / "data/tiny/pref_train.jsonl").read_text().splitlines()[:6]]
TOL = 1e-5


def _pairs(tok):
    return [render_pair(tok, row) for row in ROWS]


def _trl_batch(tok, pairs):
    """TRL's layout: [chosen_1..P, rejected_1..P], right-padded, completion_mask = labelled tokens."""
    halves = [(ids[:n_c], labels[:n_c]) for ids, labels, (n_c, _) in pairs]
    halves += [(ids[n_c:], labels[n_c:]) for ids, labels, (n_c, _) in pairs]
    T = max(len(i) for i, _ in halves)
    input_ids = torch.full((len(halves), T), tok.pad_id)
    attn = torch.zeros((len(halves), T), dtype=torch.long)
    comp = torch.zeros((len(halves), T), dtype=torch.long)
    for r, (ids, labels) in enumerate(halves):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attn[r, : len(ids)] = 1
        comp[r, : len(ids)] = torch.tensor([int(y != IGNORE) for y in labels])
    return {"input_ids": input_ids, "attention_mask": attn, "completion_mask": comp}


def _packed_batch(tok, pairs):
    packer = BestFitPacker(256, 4)
    rows = [
        r for ids, labels, parts in pairs for r in packer.add(Sample(ids, labels, 0, parts))
    ] + packer.flush()
    assert len(rows) < len(pairs)  # several pairs share a row: the packed path is what is compared
    return collate(rows, tok.pad_id, 256), rows


def _pair_order(rows, pairs):
    """Index (in `pairs`) of each packed pair, in document order."""
    flat = [s.input_ids for r in rows for s in r]
    return [next(i for i, (ids, _, _) in enumerate(pairs) if ids == f) for f in flat]


def _trl_dpo_trainer(tmp_path, hf_model, tok, loss_type: str, beta: float):
    import datasets
    from trl import DPOConfig, DPOTrainer

    ds = datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        bf16=False,  # TRL defaults to bf16 even on CPU
    )
    trainer = DPOTrainer(model=hf_model, ref_model=None, args=args, train_dataset=ds, processing_class=tok.hf)
    trainer.precompute_ref_logps = True  # use the reference log-probabilities given in the batch
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_recipe_loss_and_gradients_equal_trl(tmp_path, loss_type):
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    ours, cfg = tiny_model(vocab_size=896)
    save_pretrained(ours, cfg, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    pairs = _pairs(tok)
    beta = 0.1 if loss_type == "sigmoid" else 0.5
    gen = torch.Generator().manual_seed(0)
    average = loss_type == "ipo"
    ref_c = -30.0 * torch.rand(len(pairs), generator=gen)
    ref_r = -30.0 * torch.rand(len(pairs), generator=gen)

    trainer = _trl_dpo_trainer(tmp_path, hf, tok, loss_type, beta)
    trl_inputs = _trl_batch(tok, pairs)
    if average:  # TRL divides each log-ratio by the completion length; ours averages both log-probs
        comp = trl_inputs["completion_mask"][:, 1:].sum(1).float()
        trl_inputs |= {
            "ref_chosen_logps": ref_c * comp[: len(pairs)],
            "ref_rejected_logps": ref_r * comp[len(pairs) :],
        }
    else:
        trl_inputs |= {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    hf.train()
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs, False)
    trl_loss.backward()

    batch, rows = _packed_batch(tok, pairs)
    order = _pair_order(rows, pairs)
    ours.train()
    # transformers' softmax runs over all 896 rows; ours masks the rows past the tokenizer's 843 in
    # training (they are padding, not tokens): the parity check uses transformers' full vocabulary.
    logps = doc_logprobs(ours, batch, average=average, chunk_size=7, num_real_vocab=896)
    roles = batch["doc_roles"]
    losses, _, _ = dpo_loss(
        logps[roles == 0], logps[roles == 1], ref_c[order], ref_r[order], beta=beta, loss_type=loss_type
    )
    loss = losses.mean()
    loss.backward()
    print(f"{loss_type}: TRL {trl_loss.item():.7f} ours {loss.item():.7f}")
    assert abs(loss.item() - trl_loss.item()) <= TOL * max(1.0, abs(trl_loss.item()))

    ours_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, cfg)
    hf_params = dict(hf.named_parameters())
    worst = 0.0
    for name, g in ours_grads.items():
        ref = hf_params[name].grad
        scale = max(float(ref.abs().max()), 1e-8)
        worst = max(worst, float((g - ref).abs().max()) / scale)
    print(f"{loss_type}: max relative gradient difference {worst:.2e}")
    assert worst <= 1e-4


def test_reward_recipe_loss_equals_trl_reward_trainer(tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer()
    ours, cfg = tiny_model(vocab_size=896)
    torch.manual_seed(3)
    add_head(ours, "reward", ScoreHead(cfg.hidden_size, 1))
    save_sequence_classifier(ours, cfg, "reward", tmp_path / "rm", pad_token_id=tok.pad_id)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    pairs = _pairs(tok)

    ds = datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, center_rewards_coefficient=0.01
    )
    trainer = RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok.hf)
    halves = [(ids[:n_c], ids[n_c:]) for ids, _, (n_c, _) in pairs]
    T = max(max(len(c), len(r)) for c, r in halves)

    def pad(seqs):
        ids = torch.full((len(seqs), T), tok.pad_id)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids, mask

    c_ids, c_mask = pad([c for c, _ in halves])
    r_ids, r_mask = pad([r for _, r in halves])
    inputs = {
        "input_ids": torch.cat([c_ids, r_ids]),
        "attention_mask": torch.cat([c_mask, r_mask]),
    }
    hf.train()
    trl_loss = trainer.compute_loss(hf, inputs)

    batch, rows = _packed_batch(tok, pairs)
    ours.train()
    scores = doc_scores(ours, batch, "reward")
    roles = batch["doc_roles"]
    loss = bradley_terry_loss(scores[roles == 0], scores[roles == 1], center_rewards_coef=0.01).mean()
    print(f"reward: TRL {trl_loss.item():.7f} ours {loss.item():.7f}")
    assert abs(loss.item() - trl_loss.item()) <= TOL * max(1.0, abs(trl_loss.item()))
    _ = to_hf_state_dict  # (the heads are not part of the causal-LM key map)
