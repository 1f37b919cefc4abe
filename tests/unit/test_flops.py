"""FLOPs accounting against numbers computed by hand for a tiny config."""

import dataclasses

import torch

from posttrain.models import lora
from posttrain.models.flops import (
    attention_flops,
    body_matmul_params,
    causal_pairs,
    flops_per_token_dense,
    lora_params_per_token,
    matmul_params,
    mlp_matmul_params,
    train_flops,
)
from posttrain.models.gemma3 import Gemma3Config
from posttrain.models.hf_io import build_model
from posttrain.models.qwen3 import Qwen3Config
from posttrain.models.qwen3_moe import Qwen3MoeConfig

# D=8, Dh=4, H=2, K=1, F=16, L=2, V=10
CONFIG = Qwen3Config(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


def test_matmul_params_by_hand() -> None:
    # per layer: q 8*8=64, k 8*4=32, v 32, o 64 -> 192; mlp 3*8*16=384 -> 576; x2 layers = 1152; head 10*8=80
    assert matmul_params(CONFIG) == 1232
    assert flops_per_token_dense(CONFIG) == 6 * 1232 == 7392


def test_attention_flops_per_document_by_hand() -> None:
    # per causal pair: 3*2*2 * L=2 * H=2 * Dh=4 = 192; doc of 3 tokens: 6 pairs; doc of 1 token: 1 pair
    assert attention_flops(CONFIG, [3]) == 1152
    assert attention_flops(CONFIG, [3, 1]) == 1152 + 192
    # packing two documents must count less than one document of the combined length
    assert attention_flops(CONFIG, [2, 2]) < attention_flops(CONFIG, [4])


def test_train_flops_by_hand() -> None:
    assert train_flops(CONFIG, [3, 1]) == 7392 * 4 + 1344


def test_lm_head_is_charged_only_for_loss_tokens() -> None:
    # body: 1152 matmul params; head: 10*8 = 80. Two documents, 8 tokens, 2 of them bear loss.
    attention = attention_flops(CONFIG, [5, 3])
    assert train_flops(CONFIG, [5, 3]) == 6 * 1232 * 8 + attention
    assert train_flops(CONFIG, [5, 3], num_lm_head_tokens=2) == 6 * 1152 * 8 + 6 * 80 * 2 + attention


# ----------------------------------------------------------------------- MoE, sliding windows, LoRA

# Same attention shapes as CONFIG, 3 layers, 4 experts of width 6, top 2; layer 1 forced dense.
MOE_CONFIG = Qwen3MoeConfig(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=6,
    mlp_only_layers=[1],
)


def test_moe_counts_router_and_active_experts_only() -> None:
    """Sparse layers count the router (E x D) plus k of E experts; mlp_only_layers count the dense MLP."""
    attention = 3 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8)  # q, k, v, o of 3 layers = 576
    sparse = 4 * 8 + 2 * (3 * 8 * 6)  # router 32 + 2 active experts of 144 = 320 (all 4 would be 608)
    dense = 3 * 8 * 16  # layer 1: 384
    assert [mlp_matmul_params(MOE_CONFIG, i) for i in range(3)] == [320, 384, 320]
    assert body_matmul_params(MOE_CONFIG) == attention + 2 * sparse + dense == 1600
    assert matmul_params(MOE_CONFIG) == 1600 + 10 * 8 == 1680
    # attention per causal pair: 3*2*2 * H=2 * Dh=4 = 96 per layer, 3 layers; docs [3, 1]: 6 + 1 pairs
    assert train_flops(MOE_CONFIG, [3, 1]) == 6 * 1680 * 4 + 96 * 3 * (6 + 1) == 42336
    # decoder_sparse_step=2 without mlp_only_layers: only layer 1 ((1 + 1) % 2 == 0) is sparse
    every_other = dataclasses.replace(MOE_CONFIG, mlp_only_layers=[], decoder_sparse_step=2)
    assert body_matmul_params(every_other) == 576 + 384 + 320 + 384 == 1664


def test_causal_pairs_with_sliding_window_by_hand() -> None:
    """Query i of a causal document sees min(i + 1, window) keys."""
    assert causal_pairs(10, None) == 10 * 11 // 2 == 55
    assert causal_pairs(10, 4) == (1 + 2 + 3 + 4) + 6 * 4 == 34
    assert causal_pairs(3, 4) == 1 + 2 + 3 == 6  # shorter than the window: plain causal
    assert causal_pairs(4, 4) == 10
    assert causal_pairs(5, 1) == 5  # each query sees only itself


def test_attention_flops_with_sliding_layers_by_hand() -> None:
    """layer_types S S F with window 4: sliding layers count windowed pairs, the full layer all pairs."""
    config = Gemma3Config(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        sliding_window=4,
        sliding_window_pattern=3,
    )
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    per_pair = 3 * 2 * 2 * 2 * 4  # 96 per layer
    sliding = (1 + 2 + 3 + 4 + 6 * 4) + (1 + 2 + 3)  # docs of 10 and 3 tokens: 34 + 6 pairs
    full = 10 * 11 // 2 + 3 * 4 // 2  # 55 + 6
    assert attention_flops(config, [10, 3]) == per_pair * (2 * sliding + full) == 96 * 141 == 13536
    # the same layers all full would count 3 * 61 pairs
    all_full = dataclasses.replace(config, layer_types=["full_attention"] * 3)
    assert attention_flops(all_full, [10, 3]) == 96 * 3 * 61 == 17568


def test_lora_flops_by_hand() -> None:
    """LoRA: 4 FLOPs per frozen base parameter, 6 per adapter parameter, attention unchanged."""
    torch.manual_seed(0)
    model, config = build_model("qwen3", dataclasses.asdict(CONFIG))
    lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["attention"])
    # per layer r=2: q 2*(8+8)=32, k 2*(8+4)=24, v 24, o 32 -> 112; 2 layers
    adapters = 2 * (32 + 24 + 24 + 32)
    assert lora_params_per_token(model, config) == adapters == 224
    # docs [3, 1]: 4 tokens; body 1152 and head 80 frozen (4 each), adapters 6, attention 1344 as before
    expected = 4 * 1152 * 4 + 4 * 80 * 4 + 6 * 224 * 4 + 1344
    assert train_flops(CONFIG, [3, 1], lora_params_per_token=224) == expected == 26432
    # the LM head only for 2 loss tokens
    assert train_flops(CONFIG, [3, 1], 2, lora_params_per_token=224) == 26432 - 4 * 80 * 2 == 25792


def test_lora_params_per_token_counts_k_over_e_of_expert_adapters() -> None:
    """Expert adapters count k/E (2/4) of their parameters per token; dense MLP adapters count fully."""
    torch.manual_seed(0)
    model, config = build_model("qwen3_moe", dataclasses.asdict(MOE_CONFIG))
    lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["experts", "mlp"])
    # one expert r=2: gate 2*(8+6)=28, up 28, down 2*(6+8)=28 -> 84; 4 experts x 2 sparse layers = 672
    experts = 2 * 4 * 84
    # dense layer 1: gate 2*(8+16)=48, up 48, down 48 -> 144
    dense = 3 * 2 * (8 + 16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == experts + dense == 816
    assert lora_params_per_token(model, config) == experts * 2 // 4 + dense == 336 + 144 == 480
