"""Packed == unpacked: a row holding several documents gives each document the same loss and the
same gradients as running it alone, because attention is block-diagonal, positions restart per
document, and targets are shifted within each document."""

import torch
from helpers import tiny_model, tokenizer

from posttrain.data.labels import IGNORE
from posttrain.data.packing import collate
from posttrain.data.samples import Sample
from posttrain.data.synthetic import generate_problems, to_chat
from posttrain.train.setup import lm_loss_fn


def _samples(n=5):
    tok = tokenizer()
    return tok, [Sample(*tok.render_chat(to_chat(p)["messages"])) for p in generate_problems("train", n, 3)]


def _loss_and_grads(model, batch, loss_fn):
    model.zero_grad()
    loss, _ = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_packed_row_equals_documents_alone():
    tok, samples = _samples()
    model, _ = tiny_model()
    loss_fn = lm_loss_fn(32, tok.vocab_size)
    packed = collate([samples], tok.pad_id, row_len=sum(len(s.input_ids) for s in samples) + 7)
    assert "doc_ids" in packed and packed["doc_lens"].tolist() == [len(s.input_ids) for s in samples]
    loss_p, grads_p = _loss_and_grads(model, packed, loss_fn)
    loss_sum, grads_sum = 0.0, None
    for s in samples:
        loss, grads = _loss_and_grads(model, collate([[s]], tok.pad_id), loss_fn)
        loss_sum += loss
        grads_sum = grads if grads_sum is None else {k: grads_sum[k] + g for k, g in grads.items()}
    assert abs(loss_p - loss_sum) < 1e-4 * abs(loss_sum)
    for k in grads_p:
        torch.testing.assert_close(grads_p[k], grads_sum[k], rtol=1e-4, atol=1e-5, msg=k)


def test_without_document_mask_the_loss_changes():
    """The test above would catch a broken mask: dropping doc_ids changes the packed loss."""
    tok, samples = _samples()
    model, _ = tiny_model()
    loss_fn = lm_loss_fn(32, tok.vocab_size)
    packed = collate([samples], tok.pad_id)
    with torch.no_grad():
        with_mask, _ = loss_fn(model, packed)
        without = dict(packed)
        without.pop("doc_ids")
        no_mask, _ = loss_fn(model, without)
    assert abs(float(with_mask) - float(no_mask)) > 1e-3


def test_targets_never_cross_documents():
    tok, samples = _samples(3)
    batch = collate([samples], tok.pad_id, row_len=200)
    ends = torch.tensor(samples[0].input_ids).numel() - 1
    assert batch["targets"][0, ends] == IGNORE  # last token of doc 0 predicts nothing
    assert batch["position_ids"][0, ends + 1] == 0  # doc 1 restarts its positions
    total = sum(len(s.input_ids) for s in samples)
    assert (batch["targets"][0, total:] == IGNORE).all() and (
        batch["input_ids"][0, total:] == tok.pad_id
    ).all()
