"""VLLMEngine (posttrain/rl/vllm_engine.py): its pure parts here, a real vLLM run only where vllm imports.

The weight conversion is checked against what the HF export writes (same names, same tensors), the
sampling-parameter mapping field by field, and the engine's flow (version check, weight push, prefix-cache
reset, request layout, output conversion) against a stand-in for `vllm.LLM` that records its calls.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from posttrain.errors import ModelError
from posttrain.models.hf_io import build_model, save_pretrained
from posttrain.models.lora import apply_lora, merged_state_dict
from posttrain.models.verify import TINY_CONFIGS
from posttrain.models.vocab import trimmed_state_dict
from posttrain.rl.engine import LocalEngine, StaleWeightsError
from posttrain.rl.types import Rollout, SamplingParams
from posttrain.rl.vllm_engine import VLLMEngine, rollouts_from_outputs, vllm_sampling_kwargs, vllm_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(family, {**TINY_CONFIGS[family], **overrides})


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_vllm_weights_are_the_hf_export_names_and_tensors(family, tmp_path: Path):
    """Our names -> exactly the tensors save_pretrained writes for the 500-row export of a 512-row model."""
    model, config = _model(family, tie_word_embeddings=False)
    config_500 = type(config)(**{**TINY_CONFIGS[family], "tie_word_embeddings": False, "vocab_size": 500})
    save_pretrained(model, config_500, tmp_path, state_dict=trimmed_state_dict(model.state_dict(), 500))
    weights = vllm_weights(model.state_dict(), config_500, vocab_size=500)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sorted(weights) == sorted(f.keys())
        for name in f.keys():
            assert torch.equal(weights[name], f.get_tensor(name)), name
    assert weights["model.embed_tokens.weight"].shape[0] == 500
    assert weights["lm_head.weight"].shape[0] == 500


def test_vllm_weights_refuse_lora_adapters_and_take_merged_ones():
    model, config = _model("qwen3")
    apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["attention"])
    with pytest.raises(ModelError, match="merged_state_dict"):
        vllm_weights(model.state_dict(), config, vocab_size=512)
    weights = vllm_weights(merged_state_dict(model), config, vocab_size=512)
    assert "model.layers.0.self_attn.q_proj.weight" in weights and "lm_head.weight" not in weights  # tied


def test_vllm_sampling_kwargs():
    params = SamplingParams(max_new_tokens=16, temperature=0.8, stop_ids=(5, 9), n=2, seed=100)
    kw = vllm_sampling_kwargs(params, 3, num_real_vocab=500, vocab_size=512)
    assert kw == dict(
        n=1,
        max_tokens=16,
        temperature=0.8,
        stop_token_ids=[5, 9],
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
        seed=103,
        allowed_token_ids=list(range(500)),
    )
    greedy = vllm_sampling_kwargs(
        SamplingParams(max_new_tokens=4, temperature=0.0), 0, num_real_vocab=8, vocab_size=8
    )
    assert greedy["seed"] is None and greedy["temperature"] == 0.0 and "allowed_token_ids" not in greedy
    for truncated in (
        SamplingParams(max_new_tokens=4, top_p=0.9),
        SamplingParams(max_new_tokens=4, top_k=50),
    ):
        with pytest.raises(ValueError, match="after top-k/top-p truncation"):
            vllm_sampling_kwargs(truncated, 0, num_real_vocab=8, vocab_size=8)


def _completion(tokens: list[int], logprobs: list[float], finish: str) -> SimpleNamespace:
    """A vLLM RequestOutput look-alike: per step a {token: Logprob} dict that may hold more than the sampled
    token (vLLM adds the top ones when logprobs > 0)."""
    steps = [
        {t: SimpleNamespace(logprob=lp), t + 1: SimpleNamespace(logprob=-9.0)}
        for t, lp in zip(tokens, logprobs)
    ]
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=steps, finish_reason=finish)])


def test_rollouts_from_outputs_take_the_sampled_tokens_logprob():
    outs = [_completion([4, 2], [-0.5, -1.5], "stop"), _completion([7, 7, 7], [-0.1, -0.2, -0.3], "length")]
    got = rollouts_from_outputs([[1], [2, 3]], outs)
    assert got == [
        Rollout([1], [4, 2], [-0.5, -1.5], "stop"),
        Rollout([2, 3], [7, 7, 7], [-0.1, -0.2, -0.3], "length"),
    ]
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        rollouts_from_outputs([[1]], [_completion([4], [-0.5], "abort")])


class _FakeLLM:
    """Records what VLLMEngine asks of vllm.LLM; generates token `len(prompt)` then stop token 0."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.calls: list[str] = []
        self.requests: list = []

    def apply_model(self, func):
        self.calls.append("apply_model")
        return [func(SimpleNamespace(load_weights=lambda items: self.loaded.extend(items)))]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")

    def generate(self, requests, sampling_params, use_tqdm):
        self.requests = list(zip(requests, sampling_params))
        return [_completion([len(r["prompt_token_ids"]), 0], [-1.0, -2.0], "stop") for r in requests]


def test_engine_flow_on_a_stand_in_llm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    model, config = _model("llama3")
    llm = _FakeLLM()
    engine = VLLMEngine(llm, config, num_real_vocab=512, vocab_size=512)
    engine.load_weights(model.state_dict(), version=3)
    assert engine.version == 3 and llm.calls == ["apply_model", "reset_prefix_cache"]
    assert dict(llm.loaded).keys() == vllm_weights(model.state_dict(), config, 512).keys()
    with pytest.raises(StaleWeightsError, match="version 3 but version 2"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2), expected_version=2)
    got = engine.generate([[1, 2], [5]], SamplingParams(max_new_tokens=2, n=2, seed=7), expected_version=3)
    assert [r.prompt_ids for r in got] == [[1, 2], [1, 2], [5], [5]]
    assert [r.token_ids for r in got] == [[2, 0], [2, 0], [1, 0], [1, 0]]
    assert [s["seed"] for _, s in llm.requests] == [7, 8, 9, 10]


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (GPU machines only)")
def test_vllm_matches_local_engine_on_a_tiny_model(tmp_path: Path):
    """Greedy tokens and log-probs of vLLM (fp32) equal ours; after a weight sync both follow the new weights."""
    a, config = _model("qwen3", seed=0)
    b, _ = _model("qwen3", seed=1)
    save_pretrained(a, config, tmp_path)
    engine = VLLMEngine.from_checkpoint(
        tmp_path, num_real_vocab=500, dtype="float32", gpu_memory_utilization=0.2
    )
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [400]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    for model, version in ((a, 0), (b, 1)):
        if version:
            engine.load_weights(model.state_dict(), version)
        want = LocalEngine(model.cuda(), pad_id=0, num_real_vocab=500).generate(prompts, params)
        got = engine.generate(prompts, params, expected_version=version)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        diffs = [abs(x - y) for g, w in zip(got, want) for x, y in zip(g.logprobs, w.logprobs)]
        assert max(diffs) <= 1e-4
