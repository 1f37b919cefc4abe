"""model.attention: flex gives the logits SDPA gives, for every family, on packed rows (documents kept
apart by a BlockMask built from doc ids) and on plain rows, with sliding windows (Gemma3, GPT-OSS) and
attention sinks (GPT-OSS) included. Flex runs its forward on a CPU (no backward: the GPU check covers it)."""

import pytest
import torch

from posttrain.models.flex import resolve_backend
from posttrain.models.hf_io import MODEL_TYPES, build_model
from posttrain.models.verify import TINY_CONFIGS

FAMILIES = ["llama3", "qwen3", "qwen3_moe", "gemma3", "gpt_oss"]


def _packed(vocab: int, lens=(7, 13, 5, 11)):
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens]).repeat(2, 1)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).repeat(2, 1)
    doc[1] = torch.cat(
        [torch.zeros(20, dtype=torch.long), torch.ones(T - 20, dtype=torch.long)]
    )  # rows differ
    pos[1] = torch.cat([torch.arange(20), torch.arange(T - 20)])
    return ids, pos, doc


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_flex_logits_equal_sdpa(family):
    torch.manual_seed(0)
    model, config = build_model(MODEL_TYPES[family], TINY_CONFIGS[family])
    model.eval()
    ids, pos, doc = _packed(config.vocab_size)
    for args in ((ids, pos, doc), (ids,)):  # packed rows; plain causal rows (windows still apply)
        model.attention_backend = "sdpa"
        ref = model.logits(model(*args))
        model.attention_backend = "flex"
        out = model.logits(model(*args))
        scale = ref.abs().max().item()
        assert (out - ref).abs().max().item() <= 1e-5 * scale


def test_auto_is_flex_on_cuda_and_sdpa_elsewhere():
    assert resolve_backend("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="model.attention"):
        resolve_backend("xformers", torch.device("cpu"))


def test_flex_on_a_cpu_is_a_config_error_and_auto_is_sdpa(tmp_path):
    from helpers import job_config, tokenizer

    from posttrain.errors import ConfigError
    from posttrain.parallel.build import build_model_for

    cfg = job_config(tmp_path, tmp_path / "train.jsonl", model={"attention": "flex"})
    with pytest.raises(ConfigError, match="model.attention=flex needs a CUDA device"):
        build_model_for(cfg.model, tokenizer(), 0)
    auto = job_config(tmp_path, tmp_path / "train.jsonl")
    assert build_model_for(auto.model, tokenizer(), 0).module.attention_backend == "sdpa"
