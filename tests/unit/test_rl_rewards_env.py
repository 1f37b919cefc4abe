"""Rewards (built-ins, user functions, weights) and episodes (single and multi-turn, token-in/token-out)."""

from __future__ import annotations

import pytest

from posttrain.data.schemas import RLPrompt
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ConfigError
from posttrain.rl.env import RetryEnv, run_episodes, user_turn_ids
from posttrain.rl.rewards import (
    RewardContext,
    build_rewards,
    exact_answer,
    format_reward,
    load_function,
    score_episodes,
)
from posttrain.rl.types import Rollout, SamplingParams


def ctx(text: str, answer: str, finish: str = "stop") -> RewardContext:
    return RewardContext(text, [], [], answer, finish)


def test_exact_answer_numeric_and_text():
    assert exact_answer(ctx("42", "42")) == 1.0
    assert exact_answer(ctx(" so it is 42.0 ", "42")) == 1.0  # the last number counts, numerically
    assert exact_answer(ctx("41 or 42", "42")) == 1.0
    assert exact_answer(ctx("42 or 41", "42")) == 0.0
    assert exact_answer(ctx("forty-two", "42")) == 0.0
    assert exact_answer(ctx(" t c u x\n", "t c u x")) == 1.0
    assert exact_answer(ctx("t c u", "t c u x")) == 0.0


def test_format_reward():
    plain = format_reward()
    assert plain(ctx("68", "68")) == 1.0
    assert plain(ctx("68", "68", finish="length")) == 0.0  # cut at max_new_tokens
    assert plain(ctx("Sure! The answer is 68.", "68")) == 0.0  # chatter around the answer
    assert plain(ctx("6\n8", "68")) == 0.0  # two lines
    digits = format_reward(r"^\d+$")
    assert digits(ctx("68", "")) == 1.0 and digits(ctx("6 8", "")) == 0.0


def test_user_function_and_weights(tmp_path):
    from posttrain.config import RLRewardSpec

    f = tmp_path / "my_reward.py"
    f.write_text("def short(ctx):\n    return 1.0 / (1 + len(ctx.completion))\n")
    specs = [
        RLRewardSpec(kind="exact_answer", weight=2.0),
        RLRewardSpec(kind="function", function=f"{f}:short", weight=0.5),
    ]
    rewards = build_rewards(specs)
    totals, metrics = score_episodes(rewards, [ctx("7", "7"), ctx("123", "7")])
    assert totals == pytest.approx([2.0 + 0.5 / 2, 0.5 / 4])
    assert metrics == pytest.approx({"reward/exact_answer": 0.5, "reward/short": (0.5 + 0.25) / 2})


def test_bad_reward_specs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rl.rewards\[\].function='nofile.py:f': file nofile.py not found"):
        load_function("nofile.py:f")
    with pytest.raises(ConfigError, match="expected 'path/to/file.py:function_name'"):
        load_function("module.function")
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no function 'f'"):
        load_function(f"{tmp_path / 'm.py'}:f")


# ------------------------------------------------------------------------------ episodes


class ScriptedEngine:
    """Returns pre-set token ids per call (what a policy 'generated'), with made-up logprobs."""

    def __init__(self, turns: list[list[list[int]]]):
        self.turns, self.calls, self.version = turns, [], 0

    def generate(self, prompts, params, *, expected_version=None):
        assert expected_version == self.version
        self.calls.append([list(p) for p in prompts])
        outs = self.turns[len(self.calls) - 1]
        assert len(outs) == len(prompts) * params.n
        return [Rollout([], ids, [-0.5] * len(ids), "stop") for ids in outs]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir("builtin")


def test_multi_turn_episode_keeps_the_policy_tokens_as_generated(tok):
    prompt = RLPrompt([{"role": "user", "content": "What is 2 + 3?"}], "5")
    prompt_ids = tok.render_prompt(prompt.messages)
    eot = tok.end_of_turn_id
    wrong = tok.encode("4") + [eot]  # turn 1: a wrong answer
    # Turn 2: " 5" as two tokens (" ", "5"), which re-encoding its text would merge into one: a framework
    # that decoded and re-encoded turns would train on different tokens than the policy sampled.
    odd = tok.encode(" ") + tok.encode("5")
    assert tok.encode(tok.decode(odd)) != odd
    turn2 = odd + [eot]
    engine = ScriptedEngine([[wrong], [turn2]])
    params = SamplingParams(max_new_tokens=8, stop_ids=(eot,), n=1)
    [res] = run_episodes(
        engine,
        tok,
        [prompt],
        [prompt_ids],
        params,
        group_size=1,
        version=0,
        make_env=lambda: RetryEnv(tok, max_turns=3),
        max_turns=3,
    )
    obs = user_turn_ids(tok, "Wrong. Try again.")
    ep = res.episode
    assert ep.token_ids == prompt_ids + wrong + obs + turn2
    assert ep.policy_mask == [0] * len(prompt_ids) + [1] * len(wrong) + [0] * len(obs) + [1] * len(turn2)
    assert ep.rollout_logprobs == [0.0] * len(prompt_ids) + [-0.5] * len(wrong) + [0.0] * len(obs) + [
        -0.5
    ] * len(turn2)
    # The second call continued from the exact token ids of the first turn plus the observation.
    assert engine.calls[1] == [prompt_ids + wrong + obs]
    assert res.turns == 2 and res.env_reward == 0.5  # correct on the 2nd attempt: decay 0.5 ** 1
    assert res.context.completion.strip() == "5"
    # The observation is a real chat turn: decoding the episode gives the chat template's rendering.
    text = tok.decode(ep.token_ids, skip_special_tokens=False)
    assert "Wrong. Try again." in text and text.count("assistant") == 2


def test_single_turn_groups_are_prompt_major(tok):
    prompts = [RLPrompt([{"role": "user", "content": q}], a) for q, a in (("1+1", "2"), ("2+2", "4"))]
    ids = [tok.render_prompt(p.messages) for p in prompts]
    outs = [[10], [11], [12], [13], [14], [15]]
    engine = ScriptedEngine([outs])
    res = run_episodes(
        engine, tok, prompts, ids, SamplingParams(max_new_tokens=4, n=3), group_size=3, version=0
    )
    assert [r.episode.group for r in res] == [0, 0, 0, 1, 1, 1]
    assert [r.episode.token_ids[-1] for r in res] == [10, 11, 12, 13, 14, 15]
    assert [r.context.answer for r in res] == ["2"] * 3 + ["4"] * 3
    assert res[3].episode.token_ids[: len(ids[1])] == ids[1]


def test_reward_model_scores_the_last_token_with_its_head(tmp_path):
    """kind: model loads an `rm`-style checkpoint (weights + scalar head) and scores prompt + completion at
    the sequence's last token, exactly as a forward pass of that model does; batch padding changes nothing."""
    import torch

    from posttrain.config import RLRewardSpec
    from posttrain.models.heads import ScoreHead, add_head
    from posttrain.models.hf_io import build_model, save_pretrained
    from posttrain.models.verify import TINY_CONFIGS

    torch.manual_seed(0)
    model, cfg = build_model("qwen3", dict(TINY_CONFIGS["qwen3"]))
    add_head(model, "reward", ScoreHead(model.output_weight().shape[1], 1))
    save_pretrained(model, cfg, tmp_path / "rm")
    [reward] = build_rewards([RLRewardSpec(kind="model", path=str(tmp_path / "rm"))])
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    contexts = [RewardContext("", [], s, "", "stop") for s in seqs]
    totals, metrics = score_episodes([reward], contexts)
    model.eval()
    with torch.no_grad():
        expected = [float(model.heads["reward"](model(torch.tensor([s]))[0, -1])) for s in seqs]
    assert totals == pytest.approx(expected, abs=1e-5)
    assert len(set(round(t, 4) for t in totals)) == 3  # really depends on the sequence
    assert metrics["reward/model"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    with pytest.raises(ConfigError, match="has heads"):
        build_rewards([RLRewardSpec(kind="model", path=str(tmp_path / "rm"), head="value")])
