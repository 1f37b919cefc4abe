"""The demos' stage gains: each stage is judged by its own held-out target metric against the stage
before it, and `--seeds` summarises the gains over seeds (mean, std, min..max, and whether they hold)."""

import pytest

from posttrain.recipes.demo import TARGETS
from posttrain.recipes.demo_common import stage_gains, summarise_seeds


def _stages(chat, pref, sampled):
    names = ["pretrain (base)", "sft", "dpo", "grpo"]
    return [
        {
            "stage": n,
            "heldout_accuracy_chat": c,
            "heldout_dpo_reward_accuracy": p,
            "heldout_accuracy_sampled": s,
        }
        for n, c, p, s in zip(names, chat, pref, sampled)
    ]


def test_each_stage_is_scored_on_its_own_target_against_the_previous_stage():
    stages = _stages(chat=[0.0, 0.6, 0.5, 0.7], pref=[None, 0.5, 0.6, None], sampled=[0.0, 0.5, 0.4, 0.55])
    gains = stage_gains(stages, TARGETS)
    assert list(gains) == ["sft", "dpo", "grpo"]
    assert gains["sft"] == {"metric": "heldout_accuracy_chat", "before": 0.0, "after": 0.6, "gain": 0.6}
    # DPO: its implicit-reward accuracy, 50% (all ties) at the SFT model that is its reference.
    assert gains["dpo"]["metric"] == "heldout_dpo_reward_accuracy" and gains["dpo"]["gain"] == pytest.approx(
        0.1
    )
    # GRPO is compared with the DPO checkpoint it started from, not with SFT.
    assert gains["grpo"]["before"] == 0.4 and gains["grpo"]["gain"] == pytest.approx(0.15)


def test_seed_summary_reports_mean_std_and_range_and_whether_the_gain_holds():
    def report(seed, grpo_gain):
        return {
            "demo": "tiny",
            "seed": seed,
            "wall_time_s": 10.0 + seed,
            "gains": {"grpo": {"metric": "m", "before": 0.5, "after": 0.5 + grpo_gain, "gain": grpo_gain}},
        }

    held = summarise_seeds([report(0, 0.05), report(1, 0.06), report(2, 0.07)])
    g = held["gains"]["grpo"]
    assert held["seeds"] == [0, 1, 2] and held["wall_time_s"] == {0: 10.0, 1: 11.0, 2: 12.0}
    assert g["mean"] == pytest.approx(0.06) and g["std"] == pytest.approx(0.01)
    assert (g["min"], g["max"]) == (0.05, 0.07) and g["holds"]  # 0.06 > spread 0.02
    noisy = summarise_seeds([report(0, 0.01), report(1, 0.09), report(2, 0.02)])["gains"]["grpo"]
    assert not noisy["holds"]  # mean 0.04 < spread 0.08
    assert not summarise_seeds([report(0, -0.01), report(1, 0.03)])["gains"]["grpo"]["holds"]
