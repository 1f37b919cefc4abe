"""Preference losses == TRL 1.16's, end to end on identical pairs (fp32).

`sequence_logprobs` == full logits + log_softmax + gather + per-document sum/mean (values and gradients;
packed rows, padding, prompt positions, padded vocabulary rows, chunks smaller than the batch).

DPO: TRL's `DPOTrainer._compute_loss` runs transformers' Qwen3 (policy and reference saved from OUR tiny
random models) on the pairs laid out its way: [chosen_1..P; rejected_1..P], right-padded, completion
masks. Ours runs our Qwen3 on the same pairs PACKED (several documents per row, per-document positions
and attention), takes `sequence_logprobs` from both models and applies `dpo_loss`. Loss, logged rewards
and every weight's gradient must agree. cDPO: TRL 1.16's "sigmoid" ignores label_smoothing; its
label-smoothed formula survives only in "aot" (applied to SORTED margins), which equals cDPO when the
policy and reference margins sort the same way, so the test builds references that do.

Reward model: TRL's `RewardTrainer.compute_loss` (with margins and reward centring) on transformers'
Qwen3ForSequenceClassification vs our model + scalar head on packed pairs and `bradley_terry_loss`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.data.labels import IGNORE
from posttrain.models.heads import ScoreHead, add_head
from posttrain.models.hf_io import build_model, save_pretrained, save_sequence_classifier
from posttrain.models.qwen3 import to_hf_state_dict
from posttrain.models.verify import TINY_CONFIGS
from posttrain.train.preference import bradley_terry_loss, dpo_loss, sequence_logprobs

TOL = 1e-5
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "posttrain/assets/tokenizer"
ARCH = {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": False}  # untied: lm_head gets its own gradient
ROW_CAPACITY = 40  # tokens per packed row: 2-3 documents each, then padding


# ------------------------------------------------------------------------------ sequence_logprobs


def naive_sequence_logprobs(h_BTD, w_VD, targets_BT, doc_index_BT, num_docs, num_real_vocab, average):
    """Reference: full [B, T, V] logits, log_softmax over the real vocabulary, gather, sum per document."""
    logits_BTV = (h_BTD @ w_VD.T).float()[..., :num_real_vocab]
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    keep_BT = targets_BT != IGNORE
    logp_BT = logp_BTV.gather(-1, targets_BT.clamp(min=0)[..., None]).squeeze(-1) * keep_BT
    docs = []
    for d in range(num_docs):
        in_doc_BT = (doc_index_BT == d) & keep_BT
        total = logp_BT[in_doc_BT].sum()
        docs.append(total / in_doc_BT.sum().clamp(min=1) if average else total)
    return torch.stack(docs)


def _random_packed_batch(seed: int = 0):
    """Two rows: [doc0 (9) | doc1 (6) | doc2 (5) | pad 4], [doc3 (11) | doc4 (3, no loss) | doc5 (7) | pad 3]."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, V, real_V = 2, 24, 16, 48, 41
    h_BTD = torch.randn(B, T, D, generator=g, requires_grad=True)
    w_VD = (torch.randn(V, D, generator=g) * 0.7).requires_grad_()
    with torch.no_grad():
        w_VD[real_V:] *= 50.0  # padded vocabulary rows with huge logits: must not enter any softmax
    targets_BT = torch.randint(0, real_V, (B, T), generator=g)
    doc_index_BT = torch.full((B, T), -1)
    start = 0
    for row, lens, first_doc in ((0, (9, 6, 5), 0), (1, (11, 3, 7), 3)):
        start = 0
        for k, n in enumerate(lens):
            doc_index_BT[row, start : start + n] = first_doc + k
            targets_BT[row, start : start + 2] = IGNORE  # a prompt: no loss on its first positions
            targets_BT[row, start + n - 1] = IGNORE  # a document's last token predicts nothing
            start += n
        targets_BT[row, start:] = IGNORE  # padding
    targets_BT[1, 11:14] = IGNORE  # doc4 has no loss token at all
    return h_BTD, w_VD, targets_BT, doc_index_BT, 6, real_V


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equals_full_logits_values_and_gradients(average):
    h, w, targets, doc_index, num_docs, real_V = _random_packed_batch()
    num_loss_tokens = int((targets != IGNORE).sum())
    chunk = 4
    assert chunk < num_loss_tokens and num_loss_tokens % chunk != 0  # several chunks, a ragged last one
    weights = torch.randn(num_docs, generator=torch.Generator().manual_seed(5))  # a non-uniform upstream grad

    ours = sequence_logprobs(
        h, w, targets, doc_index, num_docs, chunk_size=chunk, num_real_vocab=real_V, average=average
    )
    (ours * weights).sum().backward()
    g_ours = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = naive_sequence_logprobs(h, w, targets, doc_index, num_docs, real_V, average)
    (ref * weights).sum().backward()

    value_diff = float((ours - ref).detach().abs().max())
    grad_diffs = [float((mine - theirs).abs().max()) for mine, theirs in zip(g_ours, (h.grad, w.grad))]
    print(
        f"average={average}: max |value diff| {value_diff:.2e}, max |grad diff| h {grad_diffs[0]:.2e} w {grad_diffs[1]:.2e}"
    )
    assert ours.dtype == torch.float32 and ours.shape == (num_docs,)
    assert ours[4].item() == 0.0  # no loss tokens: 0, not NaN
    assert value_diff <= TOL
    assert max(grad_diffs) <= TOL
    assert float(w.grad[real_V:].abs().max()) == 0.0  # padded rows get no gradient

    # Auto chunking (one chunk here) and the no-grad path give the same values.
    auto = sequence_logprobs(h, w, targets, doc_index, num_docs, num_real_vocab=real_V, average=average)
    with torch.no_grad():
        frozen = sequence_logprobs(h, w, targets, doc_index, num_docs, chunk_size=3, num_real_vocab=real_V)
    assert float((auto - ref).abs().max()) <= TOL
    if not average:
        assert float((frozen - ref).abs().max()) <= TOL


def test_sequence_logprobs_without_loss_tokens_stays_differentiable():
    h, w, targets, doc_index, num_docs, _ = _random_packed_batch()
    out = sequence_logprobs(h, w, torch.full_like(targets, IGNORE), doc_index, num_docs)
    out.sum().backward()
    assert out.abs().max().item() == 0.0 and float(h.grad.abs().max()) == 0.0


# ------------------------------------------------------------------------------ tiny models and pairs


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _tiny(seed: int):
    torch.manual_seed(seed)
    model, cfg = build_model("qwen3", dict(ARCH))
    model.init_weights(0.1)  # std 0.1 (not 0.02): peaked distributions, margins far from 0
    return model, cfg


def _pairs(pad_id: int, num_pairs: int = 5, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of different lengths; no pad id inside (HF pools on it)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        out = torch.randint(0, ARCH["vocab_size"] - 1, (n,), generator=g)
        return (out + (out >= pad_id).long()).tolist()  # skip pad_id

    return [(ids(2, 6), ids(2, 9), ids(2, 9)) for _ in range(num_pairs)]


def _trl_layout(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's DPO batch: chosen sequences then rejected ones, right-padded; completion_mask = answer tokens."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(a) for p, a in seqs)
    input_ids = torch.full((len(seqs), T), pad_id)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention_mask[i, : len(p) + len(a)] = 1
        completion_mask[i, len(p) : len(p) + len(a)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _packed_layout(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Our layout: documents [chosen_1, rejected_1, chosen_2, ...] (document 2i chosen, 2i + 1 rejected)
    packed in order into rows of ROW_CAPACITY tokens, each with its own positions and attention."""
    docs = [(p, a) for p, c, r in pairs for a in (c, r)]
    rows: list[list[int]] = [[]]
    for d, (p, a) in enumerate(docs):
        if sum(len(docs[k][0]) + len(docs[k][1]) for k in rows[-1]) + len(p) + len(a) > ROW_CAPACITY:
            rows.append([])
        rows[-1].append(d)
    B, T = len(rows), ROW_CAPACITY
    batch = {
        "input_ids": torch.full((B, T), pad_id),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "doc_index": torch.full((B, T), -1),
        "targets": torch.full((B, T), IGNORE),
        "last_pos": torch.zeros(len(docs), dtype=torch.long),
        "last_row": torch.zeros(len(docs), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        start = 0
        for d in row:
            p, a = docs[d]
            ids, n = p + a, len(p) + len(a)
            batch["input_ids"][b, start : start + n] = torch.tensor(ids)
            batch["position_ids"][b, start : start + n] = torch.arange(n)
            batch["doc_index"][b, start : start + n] = d
            # Position j predicts token j + 1: a loss target when that token is an answer token.
            batch["targets"][b, start + len(p) - 1 : start + n - 1] = torch.tensor(a)
            batch["last_row"][d], batch["last_pos"][d] = b, start + n - 1
            start += n
    assert all(len(row) >= 2 for row in rows) and B < len(docs)  # really packed, with padding
    batch["num_docs"] = len(docs)
    return batch


def _our_logprobs(model, batch, *, average: bool) -> torch.Tensor:
    def head(h_BTD, w_VD):
        return sequence_logprobs(
            h_BTD,
            w_VD,
            batch["targets"],
            batch["doc_index"],
            batch["num_docs"],
            chunk_size=5,  # far fewer than the batch's loss tokens
            average=average,
        )

    # The doc index doubles as the attention document id (padding: -1, its own block).
    return model(batch["input_ids"], batch["position_ids"], batch["doc_index"], head_fn=head)


def _max_relative_grad_diff(ours_model, cfg, hf_model, extra: dict[str, torch.Tensor] | None = None) -> float:
    """max over tensors of max |ours - TRL| / max |TRL|, our gradients mapped to transformers' names."""
    grads = {n: p.grad for n, p in ours_model.named_parameters() if p.grad is not None and "heads." not in n}
    ours = {**to_hf_state_dict(grads, cfg), **(extra or {})}
    hf_params = dict(hf_model.named_parameters())
    assert set(ours) == set(hf_params), set(ours) ^ set(hf_params)
    worst = 0.0
    for name, g in ours.items():
        ref = hf_params[name].grad
        assert ref is not None and float(ref.abs().max()) > 0, name
        worst = max(worst, float((g - ref).abs().max()) / float(ref.abs().max()))
    return worst


# ------------------------------------------------------------------------------ DPO


@pytest.mark.parametrize(
    "case,beta",
    [("sigmoid", 0.1), ("cdpo", 0.1), ("ipo", 0.5)],
)
def test_dpo_loss_and_gradients_equal_trl_on_identical_pairs(tmp_path, tok, case, beta):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    policy, cfg = _tiny(0)
    reference, _ = _tiny(1)
    save_pretrained(policy, cfg, tmp_path / "policy")
    save_pretrained(reference, cfg, tmp_path / "reference")
    load = lambda d: AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32)  # noqa: E731
    hf_policy, hf_reference = load("policy"), load("reference")

    pairs = _pairs(tok.pad_token_id)
    packed = _packed_layout(pairs, tok.pad_token_id)
    average = case == "ipo"  # TRL's IPO is length-normalised: ours takes averaged log-probabilities
    label_smoothing = 0.1 if case == "cdpo" else 0.0

    # Ours: packed rows, our models.
    policy.train()
    logps = _our_logprobs(policy, packed, average=average)
    with torch.no_grad():
        ref_logps = _our_logprobs(reference.eval(), packed, average=average)
    ref_c, ref_r = ref_logps[0::2], ref_logps[1::2]
    if case == "cdpo":
        # TRL's "aot" sorts policy margins and reference margins separately; references whose margins are
        # an increasing function of the policy's sort the same way, and then aot == cDPO pair by pair.
        ref_c = ref_r + 0.5 * (logps[0::2] - logps[1::2]).detach() + 0.3
    losses, r_chosen, r_rejected = dpo_loss(
        logps[0::2],
        logps[1::2],
        ref_c,
        ref_r,
        beta=beta,
        loss_type="ipo" if average else "sigmoid",
        label_smoothing=label_smoothing,
    )
    loss = losses.mean()
    loss.backward()

    # TRL: its own layout, transformers' models, its own reference forward (cdpo: given references).
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=["aot" if case == "cdpo" else case],
        label_smoothing=label_smoothing,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 mixed precision (even on CPU), which casts the reference model
    )
    ds = datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    trainer = DPOTrainer(
        model=hf_policy, ref_model=hf_reference, args=args, train_dataset=ds, processing_class=tok
    )
    inputs = _trl_layout(pairs, tok.pad_token_id)
    if case == "cdpo":
        trainer.precompute_ref_logps = True  # TRL's path for references given in the batch
        inputs |= {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
        margins = logps.detach()[0::2] - logps.detach()[1::2]
        assert torch.equal(margins.argsort(), (ref_c - ref_r).argsort())  # same sort: aot == cDPO
    hf_policy.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs, False)
    trl_loss.backward()

    loss_diff = abs(loss.item() - trl_loss.item())
    grad_diff = _max_relative_grad_diff(policy, cfg, hf_policy)
    print(
        f"{case}: TRL {trl_loss.item():.7f} ours {loss.item():.7f} |diff| {loss_diff:.2e}, "
        f"max relative grad diff {grad_diff:.2e}"
    )
    assert loss_diff <= TOL * max(1.0, abs(trl_loss.item()))
    assert grad_diff <= TOL
    if case != "ipo":  # TRL logs IPO rewards from summed log-probabilities, ours are per token
        metrics = trainer._metrics["train"]
        assert abs(metrics["rewards/chosen"][-1] - r_chosen.mean().item()) <= TOL
        assert abs(metrics["rewards/rejected"][-1] - r_rejected.mean().item()) <= TOL
        mean_logp = logps[0::2].mean().item()
        assert abs(metrics["logps/chosen"][-1] - mean_logp) <= TOL * max(1.0, abs(mean_logp))
    if case == "cdpo":
        # The divergence this test works around, pinned: TRL 1.16's "sigmoid" drops label_smoothing.
        trainer.loss_types = ["sigmoid"]
        with torch.no_grad():
            trl_sigmoid = trainer._compute_loss(trainer.model, inputs, False)
        plain, _, _ = dpo_loss(logps[0::2], logps[1::2], ref_c, ref_r, beta=beta)
        assert abs(trl_sigmoid.item() - plain.mean().item()) <= TOL < abs(trl_sigmoid.item() - loss.item())


# ------------------------------------------------------------------------------ reward model


def test_bradley_terry_loss_and_gradients_equal_trl_reward_trainer(tmp_path, tok):
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    ours, cfg = _tiny(2)
    torch.manual_seed(3)
    head = add_head(ours, "reward", ScoreHead(cfg.hidden_size, 1))
    head.init_weights(0.5)  # rewards of order 1, so margins and centring matter
    save_sequence_classifier(ours, cfg, "reward", tmp_path / "rm", pad_token_id=tok.pad_token_id)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)

    pairs = _pairs(tok.pad_token_id, seed=1)
    margin = torch.linspace(-0.5, 1.0, len(pairs))
    coef = 0.05

    packed = _packed_layout(pairs, tok.pad_token_id)
    ours.train()
    h_BTD = ours(packed["input_ids"], packed["position_ids"], packed["doc_index"])
    scores = head(h_BTD)[packed["last_row"], packed["last_pos"], 0]  # each document's last token
    loss = bradley_terry_loss(scores[0::2], scores[1::2], margin=margin, center_rewards_coef=coef).mean()
    loss.backward()

    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        center_rewards_coefficient=coef,
    )
    ds = datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    trainer = RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok)
    layout = _trl_layout(pairs, tok.pad_token_id)  # [chosen; rejected] rows, whole sequences scored
    inputs = {"input_ids": layout["input_ids"], "attention_mask": layout["attention_mask"], "margin": margin}
    hf.train()
    trl_loss = trainer.compute_loss(hf, inputs)
    trl_loss.backward()

    loss_diff = abs(loss.item() - trl_loss.item())
    grad_diff = _max_relative_grad_diff(ours, cfg, hf, extra={"score.weight": head.weight.grad})
    print(
        f"reward: TRL {trl_loss.item():.7f} ours {loss.item():.7f} |diff| {loss_diff:.2e}, "
        f"max relative grad diff {grad_diff:.2e}"
    )
    assert loss_diff <= TOL * max(1.0, abs(trl_loss.item()))
    assert grad_diff <= TOL
