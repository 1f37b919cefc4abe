import pytest
import torch

from posttrain.data.labels import IGNORE
from posttrain.train.losses import chunked_cross_entropy, naive_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_naive_values_and_grads(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, requires_grad=True)
    w = torch.randn(128, 16, requires_grad=True)  # 128 = padded vocab, 100 real tokens
    t = torch.randint(0, 100, (3, 11))
    t[0, :4] = -100
    t[2, 7:] = -100
    a, n_a = chunked_cross_entropy(h, w, t, chunk_size=chunk, num_real_vocab=100)
    ga = torch.autograd.grad(a, [h, w])
    b, n_b = naive_cross_entropy(h, w, t, num_real_vocab=100)
    gb = torch.autograd.grad(b, [h, w])
    assert n_a == n_b == int((t != IGNORE).sum())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_padded_vocab_rows_get_no_probability():
    h = torch.randn(1, 4, 8)
    w = torch.randn(64, 8)
    w[50:] = 100.0  # padded rows that would dominate the softmax if not masked
    t = torch.randint(0, 50, (1, 4))
    masked, _ = chunked_cross_entropy(h, w, t, num_real_vocab=50)
    reference = torch.nn.functional.cross_entropy(h[0] @ w[:50].T, t[0], reduction="sum")
    torch.testing.assert_close(masked, reference)


def test_no_loss_tokens_gives_zero_and_a_graph():
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    loss, n = chunked_cross_entropy(h, w, torch.full((1, 4), -100))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and h.grad is not None
