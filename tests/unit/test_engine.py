"""The KV-cache rollout engine (posttrain/rl/engine.py) on tiny random models of all five families.

What it pins: greedy tokens equal the no-cache decoder's (generate.greedy_generate); cached logits equal a
full no-cache forward; engine log-probs equal log_softmax(logits / T) of a full forward over prompt +
completion; stop ids, max_new_tokens, n, top-k / top-p and seeds behave as documented; sampled tokens follow
softmax(logits / T); weight sync copies weights in place, bumps the version and refuses stale versions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.generate import greedy_generate
from posttrain.models.hf_io import build_model
from posttrain.models.kv_cache import KVCache
from posttrain.models.lora import apply_lora, merged_state_dict
from posttrain.models.verify import TINY_CONFIGS
from posttrain.rl.engine import LocalEngine, StaleWeightsError, prefill_groups
from posttrain.rl.types import SamplingParams

FAMILIES = sorted(TINY_CONFIGS)
VOCAB = 500  # real vocabulary; the tiny configs have 512 rows, so rows 500..511 act as padding rows
PAD = 0
# Lengths 1..20: longer than the 8-token sliding windows of the gemma3 / gpt_oss tiny configs, and ragged.
PROMPT_LENS = (3, 17, 9, 12, 1, 20)


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model, _ = build_model(family, {**TINY_CONFIGS[family], **overrides})
    return model.eval()


def _prompts(lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lens]


def _engine(model, **kw) -> LocalEngine:
    return LocalEngine(model, pad_id=PAD, num_real_vocab=VOCAB, **kw)


@torch.no_grad()
def _reference_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the completion tokens from one no-cache forward over prompt + tokens."""
    ids = torch.tensor([prompt + tokens])
    logits = model.logits(model(ids))[0, len(prompt) - 1 : -1, :VOCAB].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_greedy_generate(family):
    """Same tokens as the no-cache decoder, including where a stop id ends some rows early."""
    model, prompts = _model(family), _prompts()
    engine = _engine(model)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    stop = free[0].token_ids[4]  # a token row 0 emits, so at least that row stops early
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_ids=(stop,))
    got = engine.generate(prompts, params)
    ref = greedy_generate(
        model, prompts, max_new_tokens=10, stop_ids=[stop], pad_id=PAD, num_real_vocab=VOCAB
    )
    assert [r.token_ids for r in got] == ref
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 5
    assert {r.finish_reason for r in got} == {"stop", "length"}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_no_cache_forward(family):
    """Prefill + one token per step through the cache gives the logits of one full forward (left-padded
    rows, per-row positions and doc ids as in greedy_generate) at every step."""
    model, prompts = _model(family), _prompts()
    steps = 10  # with prompts up to 20 tokens: well past the 8-token windows
    gen = torch.Generator().manual_seed(1)
    cont = torch.randint(1, VOCAB, (len(prompts), steps), generator=gen)
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    ids = torch.cat([torch.tensor([[PAD] * (L - len(p)) + p for p in prompts]), cont], dim=1)
    cols = torch.arange(L + steps).expand(len(prompts), -1)
    pos = (cols - pad[:, None]).clamp(min=0)
    doc = (cols >= pad[:, None]).long()
    with torch.no_grad():
        full = model.logits(model(ids, pos, doc)).float()
        cache = KVCache.for_model(model, len(prompts), L + steps)
        cached = [model.logits(model(ids[:, :L], pos[:, :L], doc[:, :L], kv_cache=cache)).float()]
        for t in range(L, L + steps):
            cached.append(model.logits(model(ids[:, t : t + 1], pos[:, t : t + 1], kv_cache=cache)).float())
    cached = torch.cat(cached, dim=1)
    real = doc.bool()  # padding positions compute garbage in both; compare real tokens only
    diff = (cached - full).abs().amax(dim=-1)[real].max().item()
    assert diff <= 1e-5, diff
    assert cache.length == L + steps


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_full_forward(family):
    """Sampled at T=0.7 with top-k and top-p on: log-probs are under softmax(logits / T), untruncated."""
    model, prompts = _model(family), _prompts()
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, n=2, seed=3)
    rollouts = _engine(model).generate(prompts, params)
    worst = 0.0
    for r in rollouts:
        ref = _reference_logprobs(model, r.prompt_ids, r.token_ids, params.temperature)
        worst = max(worst, (torch.tensor(r.logprobs) - ref).abs().max().item())
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.6])
def test_logprobs_equal_full_forward_at_other_temperatures(temperature):
    model, prompts = _model("qwen3"), _prompts()
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=0)
    for r in _engine(model).generate(prompts, params):
        ref = _reference_logprobs(model, r.prompt_ids, r.token_ids, temperature)
        assert (torch.tensor(r.logprobs) - ref).abs().max().item() <= 1e-5
        assert all(lp <= 0 for lp in r.logprobs)


def test_stop_ids_end_each_row_at_its_first_stop():
    """Each row is the unstopped row cut just after its first stop id; the others run to the limit. With
    18 rows, a row that stops alone stays in the batch until a second one stops (rows leave in bulk), and
    must not change after its stop meanwhile."""
    model, prompts = _model("llama3"), _prompts(lens=range(2, 38, 2))
    engine = _engine(model)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert all(r.finish_reason == "length" and len(r.token_ids) == 16 for r in free)
    stops = (free[0].token_ids[2], free[3].token_ids[6])
    got = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0, stop_ids=stops))
    for f, g in zip(free, got):
        first = next((i for i, t in enumerate(f.token_ids) if t in stops), None)
        if first is None:
            assert g.token_ids == f.token_ids and g.finish_reason == "length"
        else:
            assert g.token_ids == f.token_ids[: first + 1] and g.finish_reason == "stop"
        assert g.logprobs == pytest.approx(f.logprobs[: len(g.token_ids)], abs=1e-5)
    assert sum(g.finish_reason == "stop" for g in got) >= 2


def test_prefill_groups_bound_padding():
    assert prefill_groups([1, 3, 9, 12, 17, 20]) == [(0, 3), (3, 6)]
    assert prefill_groups([40] * 5) == [(0, 5)]
    lens = list(range(20, 61))
    groups = prefill_groups(lens)
    assert groups[0][0] == 0 and groups[-1][1] == len(lens)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # contiguous, covering every prompt
    assert all(lens[e - 1] - lens[s] <= max(8, lens[s] // 4) for s, e in groups)


def test_samples_are_prompt_major_and_batches_split_alike():
    """n samples per prompt, prompt-major; a small max_batch_size (several batches, prompts split across
    them) gives the same greedy rollouts."""
    model, prompts = _model("qwen3"), _prompts()
    params = SamplingParams(max_new_tokens=6, temperature=0.0, n=3)
    big = _engine(model).generate(prompts, params)
    small = _engine(model, max_batch_size=4).generate(prompts, params)
    assert len(big) == len(prompts) * 3
    assert [r.prompt_ids for r in big] == [p for p in prompts for _ in range(3)]
    assert [r.token_ids for r in big] == [r.token_ids for r in small]
    assert max(abs(a - b) for x, y in zip(big, small) for a, b in zip(x.logprobs, y.logprobs)) <= 1e-5


def test_top_k_1_and_tiny_top_p_are_greedy():
    model, prompts = _model("llama3"), _prompts()
    engine = _engine(model)
    greedy = [
        r.token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    ]
    top_k = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, n=2, seed=0))
    top_p = engine.generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, n=2, seed=0)
    )
    assert [r.token_ids for r in top_k] == [g for g in greedy for _ in range(2)]
    assert [r.token_ids for r in top_p] == [g for g in greedy for _ in range(2)]


def test_seed_reproduces_samples():
    model, prompts = _model("gemma3"), _prompts()
    engine = _engine(model)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=11)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=12))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert a[0].token_ids != a[1].token_ids  # two samples of one prompt differ


def test_first_token_distribution_matches_softmax_over_temperature():
    """3,000 first tokens of one prompt over an 8-token real vocabulary: a chi-square test against
    softmax(logits / T) passes (threshold 30 at 7 dof: p ~ 1e-4 of failing by chance), while the same
    counts against T = 1 fail it, so the test can tell temperatures apart. With top_k=3 every sample is
    one of the 3 most likely tokens."""
    model = _model("qwen3", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[:8] *= 12.0  # spread the 8 real logits (std ~2) so temperatures differ
    engine = LocalEngine(model, pad_id=PAD, num_real_vocab=8, max_batch_size=3000)
    prompt, n, T = [3, 1, 4, 1, 5], 3000, 0.7
    rollouts = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=T, n=n, seed=0))
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in rollouts]), minlength=8).double()
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([prompt])))[0, -1, :8].double()

    def chi2(probs: torch.Tensor) -> float:
        expected = n * probs
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(torch.softmax(logits / T, -1)) < 30.0
    assert chi2(torch.softmax(logits, -1)) > 100.0
    top3 = set(torch.topk(logits, 3).indices.tolist())
    few = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=T, top_k=3, n=500, seed=1))
    assert {r.token_ids[0] for r in few} <= top3


def test_load_weights_changes_outputs_and_bumps_version():
    a, b, prompts = _model("qwen3", seed=0), _model("qwen3", seed=1), _prompts()
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    engine = _engine(copy.deepcopy(a))
    assert engine.version == 0
    before = engine.generate(prompts, params, expected_version=0)
    engine.load_weights(b.state_dict(), version=1)
    after = engine.generate(prompts, params, expected_version=1)
    assert engine.version == 1
    assert [r.token_ids for r in after] == [r.token_ids for r in _engine(b).generate(prompts, params)]
    assert [r.token_ids for r in after] != [r.token_ids for r in before]


def test_stale_version_raises_naming_both_versions():
    engine = _engine(_model("qwen3"))
    engine.load_weights(_model("qwen3", seed=1).state_dict(), version=4)
    with pytest.raises(StaleWeightsError, match=r"version 4 .*version 5 was expected"):
        engine.generate(_prompts(), SamplingParams(max_new_tokens=2), expected_version=5)


def test_load_weights_rejects_bad_state_dicts_and_keeps_weights():
    model = _model("qwen3")
    engine = _engine(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = _model("qwen3", seed=1).state_dict()
    missing = {k: v for k, v in other.items() if k != "norm.weight"}
    with pytest.raises(ModelError, match="missing keys \\['norm.weight'\\]"):
        engine.load_weights(missing, version=1)
    wrong = dict(other, **{"norm.weight": torch.zeros(3)})
    with pytest.raises(ModelError, match="norm.weight has shape \\(3,\\)"):
        engine.load_weights(wrong, version=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert engine.version == 0


def test_load_weights_accepts_lora_state_dicts_merged_or_not():
    """A LoRA policy's own state dict into an engine with the same adapters, and its merged state dict into
    an engine with adapters (zeroed) or without any, all generate what the policy generates."""
    policy = _model("qwen3")
    apply_lora(policy, rank=4, alpha=8.0, dropout=0.0, targets=["attention", "mlp"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_b." in name:
                p.normal_(0.0, 0.2)  # a trained-looking, non-zero adapter
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = _prompts()
    want = [r.token_ids for r in _engine(policy).generate(prompts, params)]

    with_adapters = _model("qwen3", seed=5)
    apply_lora(with_adapters, rank=4, alpha=8.0, dropout=0.0, targets=["attention", "mlp"])
    engine = _engine(with_adapters)
    engine.load_weights(policy.state_dict(), version=1)
    assert [r.token_ids for r in engine.generate(prompts, params)] == want
    engine.load_weights(merged_state_dict(policy), version=2)
    assert [r.token_ids for r in engine.generate(prompts, params)] == want

    plain = _engine(_model("qwen3", seed=5))
    plain.load_weights(merged_state_dict(policy), version=1)
    assert [r.token_ids for r in plain.generate(prompts, params)] == want
    with pytest.raises(ModelError, match="has no adapters"):
        plain.load_weights(policy.state_dict(), version=2)


def test_bad_sampling_params_and_prompts_name_the_field():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)
    engine = _engine(_model("qwen3"))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 0 has token id 500 outside \[0, 500\)"):
        engine.generate([[1, 500]], SamplingParams(max_new_tokens=2))
