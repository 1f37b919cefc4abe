"""GRPO loss == TRL 1.16's `GRPOTrainer._compute_loss`, end to end on identical episodes (fp32).

TRL runs transformers' Qwen3 (saved from OUR tiny random model) on its layout: left-padded prompts,
right-padded completions, one sequence per row. Ours runs our Qwen3 on the same episodes PACKED
(several per row, per-document positions and attention) through the recipe's own loss function and the
trainer's normalisation (sum of weighted token losses / loss units). Same old logprobs (so ratios are
not 1 and clipping is active on both sides), same reference logprobs, same advantages, same
temperature; the truncated importance-sampling weights are computed by us and handed to TRL as its
`importance_sampling_ratio`. Loss and every weight's gradient must agree for each aggregation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models.hf_io import build_model, save_pretrained
from posttrain.models.verify import TINY_CONFIGS
from posttrain.rl.grpo import GRPOLossConfig, collate_episodes, group_advantages, grpo_loss_fn, loss_units_for
from posttrain.rl.types import Episode
from tests.parity.test_preference_losses import _max_relative_grad_diff

TOL = 1e-5
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "posttrain/assets/tokenizer"
ARCH = {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": False}
MAX_NEW = 9
GROUP = 3


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _episodes(pad_id: int, seed: int = 0):
    """2 prompts x GROUP completions of different lengths; no pad id inside."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        out = torch.randint(5, 200, (n,), generator=g).tolist()
        return [t if t != pad_id else t + 1 for t in out]

    prompts = [ids(7), ids(4)]
    completions = [ids(int(torch.randint(2, MAX_NEW + 1, (), generator=g))) for _ in range(2 * GROUP)]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    return prompts, completions, rewards


@pytest.mark.parametrize(
    "aggregation,trl_loss_type,kl_coef,kl_bias_correction,temperature",
    [
        ("sequence", "grpo", 0.0, True, 1.0),
        ("token", "dapo", 0.04, True, 0.7),
        ("constant", "dr_grpo", 0.1, False, 1.0),
    ],
)
def test_grpo_loss_and_gradients_equal_trl(
    tmp_path, tok, aggregation, trl_loss_type, kl_coef, kl_bias_correction, temperature
):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    policy, cfg = build_model("qwen3", dict(ARCH))
    policy.init_weights(0.1)
    save_pretrained(policy, cfg, tmp_path / "policy")
    hf_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)

    pad = tok.pad_token_id
    prompts, completions, rewards = _episodes(pad)
    advantages, _ = group_advantages(rewards, GROUP)
    g = torch.Generator().manual_seed(1)
    # Per completion token: old logprobs (the policy before this update), reference and rollout-engine
    # logprobs; perturbations of ~0.3 so ratios leave [0.8, 1.2] and IS weights hit the cap.
    with torch.no_grad():
        from posttrain.rl.grpo import token_logprobs

        cur = []
        for i, comp in enumerate(completions):
            p = prompts[i // GROUP]
            ids = torch.tensor([p + comp])
            targets = torch.full_like(ids, -100)
            targets[0, len(p) - 1 : -1] = torch.tensor(comp)
            cur.append(
                policy(ids, head_fn=lambda h, w, t=targets: token_logprobs(h, w, t, temperature=temperature))
            )
    old = [c + 0.3 * torch.randn(c.shape, generator=g) for c in cur]
    ref = [c + 0.5 * torch.randn(c.shape, generator=g) for c in cur]
    rollout = [o + 0.4 * torch.randn(o.shape, generator=g) for o in old]
    cap = 1.5
    is_ratio = [torch.clamp(torch.exp(o - r), max=cap) for o, r in zip(old, rollout)]
    assert any(float(r.max()) == cap for r in is_ratio)

    # Ours: episodes packed into rows, the recipe's loss, the trainer's normalisation.
    episodes = []
    for i, comp in enumerate(completions):
        p = prompts[i // GROUP]
        n = len(p) + len(comp)
        pad_p = [0.0] * len(p)
        episodes.append(
            Episode(
                token_ids=p + comp,
                policy_mask=[0] * len(p) + [1] * len(comp),
                rollout_logprobs=pad_p + rollout[i].tolist(),
                group=i // GROUP,
                fields={
                    "advantages": [float(advantages[i])] * n,
                    "old_logprobs": pad_p + old[i].tolist(),
                    "ref_logprobs": pad_p + ref[i].tolist(),
                },
            )
        )
    row_len = 2 * (len(prompts[0]) + MAX_NEW)
    batches = collate_episodes(
        episodes, pad, row_len, aggregation=aggregation, max_new_tokens=MAX_NEW, rows_per_batch=2
    )
    assert len(batches) < len(episodes)  # really packed
    loss_fn = grpo_loss_fn(
        GRPOLossConfig(
            clip_low=0.2,
            clip_high=0.28,
            kl_coef=kl_coef,
            kl_bias_correction=kl_bias_correction,
            temperature=temperature,
            is_cap=cap,
        ),
        num_real_vocab=ARCH["vocab_size"],
    )
    units = sum(loss_units_for(aggregation)(b) for b in batches)
    policy.train()
    total = 0.0
    for b in batches:
        loss_sum, _ = loss_fn(policy, b)
        (loss_sum / units).backward()
        total += float(loss_sum) / units

    # TRL: its layout, transformers' model.
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=trl_loss_type,
        beta=kl_coef,
        use_bias_correction_kl=kl_bias_correction,
        epsilon=0.2,
        epsilon_high=0.28,
        temperature=temperature,
        max_completion_length=MAX_NEW,
        num_generations=GROUP,
        per_device_train_batch_size=2 * GROUP,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    ds = datasets.Dataset.from_list([{"prompt": "q"}] * 4)
    trainer = GRPOTrainer(
        model=hf_policy,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.use_vllm = True  # its importance-sampling branch; the ratios are given below
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which we do not run
    P = max(len(p) for p in prompts)
    C = MAX_NEW
    B = len(completions)
    inputs = {
        "prompt_ids": torch.full((B, P), pad),
        "prompt_mask": torch.zeros((B, P), dtype=torch.long),
        "completion_ids": torch.full((B, C), pad),
        "completion_mask": torch.zeros((B, C), dtype=torch.long),
        "old_per_token_logps": torch.zeros((B, C)),
        "ref_per_token_logps": torch.zeros((B, C)),
        "importance_sampling_ratio": torch.ones((B, C)),
        "advantages": advantages,
        "num_items_in_batch": torch.tensor(float(sum(len(c) for c in completions))),
    }
    for i, comp in enumerate(completions):
        p, n = prompts[i // GROUP], len(comp)
        inputs["prompt_ids"][i, P - len(p) :] = torch.tensor(p)
        inputs["prompt_mask"][i, P - len(p) :] = 1
        inputs["completion_ids"][i, :n] = torch.tensor(comp)
        inputs["completion_mask"][i, :n] = 1
        inputs["old_per_token_logps"][i, :n] = old[i]
        inputs["ref_per_token_logps"][i, :n] = ref[i]
        inputs["importance_sampling_ratio"][i, :n] = is_ratio[i]
    hf_policy.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    diff = abs(total - trl_loss.item())
    worst = _max_relative_grad_diff(policy, cfg, hf_policy)  # asserts every weight has a non-zero grad
    print(
        f"{trl_loss_type}: TRL {trl_loss.item():.7f} ours {total:.7f} |diff| {diff:.2e}, grad rel {worst:.2e}"
    )
    assert diff <= TOL * max(1.0, abs(trl_loss.item()))
    assert worst <= TOL
    assert abs(total) > 1e-3  # a loss that is not trivially zero


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(rewards, 3)
    m, s = 1 / 3, torch.tensor([1.0, 0.0, 0.0]).std().item()
    expected = [(1 - m) / (s + 1e-4), (0 - m) / (s + 1e-4), (0 - m) / (s + 1e-4), 0.0, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    assert zero.tolist() == [False] * 3 + [True] * 3
    adv_none, _ = group_advantages(rewards, 3, scale="none")
    assert torch.allclose(adv_none, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
