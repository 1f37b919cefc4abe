"""FLOPs accounting against numbers computed by hand for a tiny config."""

from posttrain.models.flops import attention_flops, flops_per_token_dense, matmul_params, train_flops
from posttrain.models.qwen3 import Qwen3Config

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
