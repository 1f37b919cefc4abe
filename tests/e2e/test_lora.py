"""LoRA end to end and unit-level: an SFT job with adapters on a saved base exports a PEFT adapter and a
merged model that both compute our adapted logits in transformers, leaves the base weights bit-identical,
and only ever optimises the adapters; merge/unmerge, target validation and MoE experts behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_ARCH, job_config, make_trainer, tokenizer
from safetensors.torch import load_file

from posttrain.config import ArchConfig, LoRAConfig, ModelConfig, load_job
from posttrain.errors import ConfigError
from posttrain.metrics.jsonl import read_jsonl
from posttrain.models import build, hf_io, lora
from posttrain.models.verify import TINY_CONFIGS
from posttrain.parallel.build import build_model_for
from posttrain.recipes import sft
from posttrain.train import checkpoint as ckpt
from posttrain.train.setup import lm_loss_fn

TOL = 1e-4
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets=["attention", "mlp"])
STEPS = 15
# Adapter parameters of TINY_ARCH (D=64, q/o 64->64, k/v 64->32, gate/up 64->128, down 128->64), r=4:
# per layer 4*(64+64)*2 + 4*(64+32)*2 + 4*(64+128)*3 = 1024 + 768 + 2304 = 4096; two layers.
ADAPTER_PARAMS = 2 * (4 * (64 + 64) * 2 + 4 * (64 + 32) * 2 + 4 * (64 + 128) * 3)


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(vocab_size: int, shape=(2, 17), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every lora_b non-zero values so the adapters are not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3 base (vocab = the builtin tokenizer's 843) fine-tuned 15 steps with LoRA r=4."""
    tmp = tmp_path_factory.mktemp("lora")
    tok = tokenizer()
    torch.manual_seed(0)
    model, config = hf_io.build_model("qwen3", {"vocab_size": tok.vocab_size, **TINY_ARCH})
    base = tmp / "base"
    hf_io.save_pretrained(model, config, base)
    tok.save(base)
    out = tmp / "out"
    cfg = load_job(
        ROOT / "configs/tiny/sft.yaml",
        [
            f"output_dir={out}",
            "model.arch=null",
            f"model.path={base}",
            "model.lora={rank: 4, alpha: 8, targets: [attention, mlp]}",
            f"training.max_steps={STEPS}",
            f"training.save_every_steps={STEPS}",
            "training.eval_every_steps=0",
            "training.global_batch_size=4",
            "training.micro_batch_size_per_device=4",
            "data.max_tokens_per_pack=128",
            f"data.train.path={ROOT / 'data/tiny/sft_train.jsonl'}",
            "data.train.max_samples=200",
            "data.eval=null",
            "optim.lr=1e-2",
            "schedule.warmup_steps=0",
            "metrics.progress=quiet",
            "metrics.peak_flops_per_s=1e11",
        ],
    )
    summary = sft.train(cfg)
    return base, out, summary


def adapted_model(base: Path, out: Path):
    """Ours rebuilt by hand: the base, LoRA with the job's settings, adapter weights of the last checkpoint."""
    model, _ = hf_io.load_pretrained(base)
    lora.apply_lora(model, **LORA)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["model"]
    adapters = {k: v for k, v in state.items() if ".lora_a." in k or ".lora_b." in k}
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert unexpected == [] and all(".lora_" not in k for k in missing)
    return model.eval(), state


def test_lora_job_trains_only_adapters(run):
    """The run reports 8,192 trainable adapter parameters and its loss falls over 15 steps."""
    _, out, summary = run
    assert summary["steps"] == STEPS
    assert summary["num_trainable_params"] == ADAPTER_PARAMS == 8192
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1  # observed 6.69 -> 6.41
    assert any("LoRA r=4 alpha=8.0 on 14 linears" in note for note in summary["model_notes"])


def test_peft_adapter_and_merged_export_match_ours(run):
    """PEFT(base, OUTPUT/adapter) and OUTPUT/hf (merged) give our adapted logits within 1e-4; base differs."""
    from peft import PeftModel

    base, out, _ = run
    ours, _ = adapted_model(base, out)
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["base_model_name_or_path"]) == (
        4,
        8.0,
        str(base),
    )
    assert adapter_cfg["target_modules"] == sorted(lora.ATTENTION + lora.MLP)
    ids = random_ids(843)
    base_hf = load_hf(base)
    with torch.no_grad():
        base_logits = base_hf(ids).logits
        peft_logits = PeftModel.from_pretrained(base_hf, out / "adapter").eval()(ids).logits
        merged_logits = load_hf(out / "hf")(ids).logits
        our_logits = ours.logits(ours(ids))
    assert json.loads((out / "hf/config.json").read_text())["vocab_size"] == 843
    assert (our_logits - peft_logits).abs().max().item() <= TOL  # observed 0.0
    assert (our_logits - merged_logits).abs().max().item() <= TOL  # observed ~4e-7
    assert (our_logits - base_logits).abs().max().item() > 0.1  # observed ~1.4: the adapter is no no-op


def test_base_weights_frozen_bitwise_and_adapters_moved(run):
    """Every base weight in the checkpoint equals the base checkpoint's bit for bit; every lora_b is non-zero."""
    base, out, _ = run
    _, state = adapted_model(base, out)
    base_model, _ = hf_io.load_pretrained(base)
    base_sd = base_model.state_dict()
    base_keys = [k for k in state if ".lora_" not in k]
    assert sorted(base_keys) == sorted(base_sd)
    for name in base_keys:
        if name in ("tok_embeddings.weight", "lm_head.weight"):
            # 896 training rows: the real 843 unchanged, the 53 padding rows still at their mean init
            assert state[name].shape == (896, 64)
            assert torch.equal(state[name][:843], base_sd[name]), name
            assert torch.equal(state[name][843:], base_sd[name].mean(0).expand(53, 64)), name
        else:
            assert torch.equal(state[name], base_sd[name]), name
    lora_b = {k: v for k, v in state.items() if ".lora_b." in k}
    assert len(lora_b) == 14  # 7 linears x 2 layers
    assert all(bool((v != 0).all()) and v.abs().max().item() > 1e-3 for v in lora_b.values())
    # the PEFT file holds exactly these tensors under PEFT's names
    peft_sd = load_file(out / "adapter/adapter_model.safetensors")
    assert len(peft_sd) == 28
    q_b = peft_sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(q_b, state["layers.0.attention.q_proj.lora_b.weight"])


def test_only_adapters_require_grad_and_reach_the_optimizer(tmp_path):
    """apply_lora freezes everything but lora_a/lora_b, and the trainer's param groups hold exactly those."""
    tok = tokenizer()
    arch = ArchConfig(**TINY_ARCH)
    built = build_model_for(ModelConfig(arch=arch, lora=LoRAConfig(**LORA)), tok, seed=0)
    model = built.module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_a.weight", ".lora_b.weight")) for n in trainable)
    assert len(trainable) == 28 and sum(p.numel() for p in model.parameters() if p.requires_grad) == 8192
    cfg = job_config(tmp_path, ROOT / "data/tiny/sft_train.jsonl")
    trainer = make_trainer(model, lm_loss_fn(256, tok.vocab_size), cfg, tmp_path, total_steps=1)
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    lora_params = [p for n, p in model.named_parameters() if n in trainable]
    assert len(in_optimizer) == 28
    assert {id(p) for p in in_optimizer} == {id(p) for p in lora_params}
    # every adapter starts as a zero update: lora_b = 0, lora_a kaiming (non-zero)
    for m in lora.lora_modules(model).values():
        assert m.lora_b.weight.abs().max().item() == 0.0 and m.lora_a.weight.abs().max().item() > 0


def test_merge_then_unmerge_restores_logits():
    """Merged logits equal adapter logits, and unmerging restores them, within 1e-5."""
    torch.manual_seed(0)
    model, _ = hf_io.build_model("qwen3", {"vocab_size": 128, **TINY_ARCH})
    with torch.no_grad():
        ids = random_ids(128)
        before = model.logits(model(ids))
        lora.apply_lora(model, **LORA)
        assert torch.equal(model.logits(model(ids)), before)  # B = 0: exactly the base
        randomise_adapters(model)
        adapted = model.logits(model(ids))
        lora.merge_lora(model)
        assert all(m.merged for m in lora.lora_modules(model).values())
        merged = model.logits(model(ids))
        lora.unmerge_lora(model)
        unmerged = model.logits(model(ids))
    assert (adapted - before).abs().max().item() > 1e-2
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert (unmerged - adapted).abs().max().item() <= 1e-5
    # merged_state_dict folds the same update without touching the model
    sd = lora.merged_state_dict(model)
    q = model.layers[0].attention.q_proj
    expected = q.weight + (q.lora_b.weight @ q.lora_a.weight) * (8.0 / 4)
    assert not any(".lora_" in k for k in sd) and torch.equal(
        sd["layers.0.attention.q_proj.weight"], expected
    )


def test_unknown_target_names_valid_targets():
    """An unknown target is a ConfigError that lists every valid group and leaf name."""
    model, _ = hf_io.build_model("qwen3", {"vocab_size": 128, **TINY_ARCH})
    with pytest.raises(ConfigError) as err:
        lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["attention", "qkv_proj"])
    message = str(err.value)
    assert "'qkv_proj'" in message
    for name in (
        "attention",
        "mlp",
        "experts",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "down_proj",
    ):
        assert name in message
    with pytest.raises(ConfigError, match="matched no linear"):
        lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["experts"])  # dense model


def test_moe_experts_target(tmp_path):
    """targets=[experts] wraps gate/up/down of all 8 experts of both sparse layers and nothing dense; the
    PEFT adapter is refused with a clear error, while the merged export matches our logits in transformers."""
    torch.manual_seed(0)
    model, config = hf_io.build_model(
        "qwen3_moe", {**TINY_CONFIGS["qwen3_moe"], "tie_word_embeddings": False}
    )
    names = lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["experts"])
    # layers 0 and 2 are sparse (layer 1 is in mlp_only_layers): 2 layers x 8 experts x 3 projections
    assert len(names) == 2 * 8 * 3
    assert set(names) == {
        f"layers.{i}.mlp.experts.{j}.{p}" for i in (0, 2) for j in range(8) for p in lora.MLP
    }
    assert not any(n.startswith("layers.1.") or ".attention." in n for n in names)
    # the dense MLP of layer 1 and the routers stay plain
    assert type(model.layers[1].mlp.gate_proj) is torch.nn.Linear
    assert not any(isinstance(m, lora.LoRALinear) for m in model.layers[0].mlp.router.modules())
    # adapter params: 48 x 4 x (64 + 32)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 48 * 4 * (64 + 32)
    randomise_adapters(model)

    with pytest.raises(ConfigError, match=r"MoE experts .*export the merged model"):
        hf_io.save_lora_adapter(model, config, tmp_path / "adapter", None)

    # Through the recipe's export: OUTPUT/hf merged, no adapter, a note saying why.
    built = build.BuiltModel(model, config, "native", 512, None)
    build.export_hf(built, tokenizer(), tmp_path / "out/hf")
    assert not (tmp_path / "out/adapter/adapter_model.safetensors").exists()
    assert any("no PEFT adapter exported: 48 adapters sit on MoE experts" in n for n in built.notes)
    model.eval()
    ids = random_ids(512)
    with torch.no_grad():
        ours = model.logits(model(ids))
        hf = load_hf(tmp_path / "out/hf")(ids).logits
        lora.merge_lora(model)  # the merged weights without adapters compute the same
        lora_off = model.logits(model(ids))
    assert (ours - hf).abs().max().item() <= TOL
    assert (ours - lora_off).abs().max().item() <= 1e-5


def test_dropout_applies_to_the_adapter_input_only_and_is_off_in_eval():
    """PEFT's LoRA dropout: y = base(x) + s * B A dropout(x). In training the adapter sees the dropped,
    1/(1-p)-rescaled input (the same mask torch draws for that seed) while the frozen path sees x; in
    eval there is no dropout; the PEFT export carries lora_dropout."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.weight.normal_()  # a non-zero update, so the adapter path is visible
    x = torch.randn(32, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    update = lambda inp: layer.lora_b(layer.lora_a(inp)) * layer.scaling  # noqa: E731

    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, p=0.5, training=True)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    torch.testing.assert_close(y_train, base + update(dropped), rtol=0, atol=1e-6)
    assert (y_train - base - update(x)).abs().max() > 1e-2  # the adapter really saw a dropped input

    layer.eval()
    torch.testing.assert_close(layer(x), base + update(x), rtol=0, atol=1e-6)

    model, _ = hf_io.build_model("qwen3", {**TINY_ARCH, "vocab_size": 128})
    lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.25, targets=["attention"])
    assert lora.peft_adapter_config(model, base_model_path="base")["lora_dropout"] == 0.25
