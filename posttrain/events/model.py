"""The event model's heads and loss: next item over the catalogue, semantic-ID codes through the LM head,
and the event type, all read at each event's query position (its gap token; see sequences.py).

The catalogue head scores item i as

    logit_i = h . (sum over its L codes of the code token's output embedding)  +  h . r_i

The first term is built from the (tied) token embeddings and the saved item -> codes mapping, so items
that share codes share what was learned about them (and one_per_item with tied embeddings is SASRec's
output layer); r_i is a per-item residual in the `item` ScoreHead, started at zero, that lets popular
items move on their own. With `events.repeat_head` the catalogue distribution is mixed with a pointer
over the user's own history (RepeatNet's repeat/explore idea), because people re-watch, rate what they
just played and buy again, and copying an item out of a long history is slow for a small transformer to
learn through attention alone:

    p(i) = (1 - g) softmax(logit)_i + g * sum over past events j with item i of softmax_j(q . h_j)

where h_j is the hidden state at event j's type token (the end of the event), q = W_q h the query's
projection and g = sigmoid(w_g . h) a learned gate. ScoreHeads live in `model.heads`
(posttrain/models/heads.py), so they train, checkpoint, shard and export with the model
(`heads.safetensors` beside the HF weights):

    item          D -> N items       the residual r_i of the catalogue head  (objective catalogue / both)
    repeat_query  D -> D             W_q of the history pointer              (events.repeat_head)
    repeat_gate   D -> 1             w_g, the share given to the history     (events.repeat_head)
    event_type    D -> event types   the next event's type                   (events.event_type_head)

The semantic-ID objective needs no extra head: it is next-token cross-entropy on the code tokens, through
the output matrix, with the shared fused chunked loss. Per event the loss is

    -log p(item) + sum over the L codes of CE(LM) + event_type_loss_weight * CE(type head)

summed over loss-bearing events; the trainer divides by their number (the loss units), so gradient
accumulation and data parallelism stay exact. Every head runs inside the model's forward (`head_fn`),
where FSDP has the root's parameters (embeddings and heads) gathered.

Shape legend: B rows, T tokens, D hidden, V vocabulary, Q queries in the batch, N items, L levels,
E event types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.data.labels import IGNORE
from posttrain.data.packing import collate
from posttrain.data.samples import Sample
from posttrain.errors import ConfigError
from posttrain.events.semantic_ids import EventVocab
from posttrain.events.sequences import Query, TokenTable
from posttrain.train.losses import chunked_cross_entropy

ITEM_HEAD = "item"
TYPE_HEAD = "event_type"
REPEAT_QUERY = "repeat_query"
REPEAT_GATE = "repeat_gate"


def head_sizes(
    vocab: EventVocab, objective: str, event_type_head: bool, repeat_head: bool, hidden_size: int
) -> dict[str, int]:
    """The ScoreHeads an event model carries: name -> number of outputs."""
    sizes = {}
    if objective in ("catalogue", "both"):
        sizes[ITEM_HEAD] = vocab.num_items
        if repeat_head:
            sizes[REPEAT_QUERY] = hidden_size
            sizes[REPEAT_GATE] = 1
    if event_type_head:
        sizes[TYPE_HEAD] = len(vocab.event_types)
    return sizes


@dataclass
class Lookups:
    """Token-id -> meaning tables (on the batch's device), so targets are read straight from input_ids."""

    is_gap_V: torch.Tensor  # bool
    code_of_V: torch.Tensor  # long: code index of a code token, -1 otherwise
    event_of_V: torch.Tensor  # long: event-type index of an event token, -1 otherwise
    radix_L: torch.Tensor  # long: K ** (L - 1 - l), item key = sum_l code_l * radix_l
    item_keys: torch.Tensor  # long [N] sorted keys of the items' codes
    item_of_key: torch.Tensor  # long [N] item index of each sorted key
    item_code_ids_NL: torch.Tensor  # long: token ids of each item's codes
    num_levels: int

    @classmethod
    def build(cls, vocab: EventVocab, table: TokenTable, vocab_size: int) -> Lookups:
        L, K = vocab.num_levels, vocab.codes_per_level
        if K**L >= 2**62:
            raise ConfigError(f"events: {K} codes ** {L} levels does not fit an int64 item key")
        is_gap = torch.zeros(vocab_size, dtype=torch.bool)
        is_gap[table.gap_ids] = True
        code_of = torch.full((vocab_size,), -1, dtype=torch.long)
        code_of[torch.from_numpy(table.code_ids.reshape(-1))] = torch.arange(K).repeat(L)
        event_of = torch.full((vocab_size,), -1, dtype=torch.long)
        event_of[table.event_ids] = torch.arange(len(table.event_ids))
        radix = torch.tensor([K ** (L - 1 - lv) for lv in range(L)], dtype=torch.long)
        keys = torch.from_numpy(vocab.codes).long() @ radix
        order = torch.argsort(keys)
        item_codes = torch.from_numpy(table.item_code_ids).long()
        return cls(is_gap, code_of, event_of, radix, keys[order], order, item_codes, L)

    def to(self, device: torch.device) -> Lookups:
        if self.is_gap_V.device == device:
            return self
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return Lookups(**moved)

    def _items_at(self, input_ids_BT: torch.Tensor, rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Item index named by the L code tokens starting at (rows, first)."""
        L = self.num_levels
        codes = torch.stack([self.code_of_V[input_ids_BT[rows, first + lv]] for lv in range(L)], dim=-1)
        keys = codes @ self.radix_L
        pos = torch.searchsorted(self.item_keys, keys).clamp(max=len(self.item_keys) - 1)
        if len(first) and not bool((self.item_keys[pos] == keys).all()):
            raise ValueError("item codes do not name a catalogue item (an event cut in two?)")
        return self.item_of_key[pos]

    def queries(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor):
        """(row, position, item, event type) of every loss-bearing query in a packed batch."""
        qb, qt = torch.nonzero(self.is_gap_V[input_ids_BT] & (targets_BT != IGNORE), as_tuple=True)
        L = self.num_levels
        if len(qt) and int(qt.max()) + L + 1 >= input_ids_BT.shape[1]:
            raise ValueError("an event was cut off at the end of a row; rows must hold whole events")
        types = self.event_of_V[input_ids_BT[qb, qt + 1 + L]]
        return qb, qt, self._items_at(input_ids_BT, qb, qt + 1), types

    def history(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] item index of the event that ends at each position (its type token), -1 elsewhere."""
        out = torch.full_like(input_ids_BT, -1)
        b, t = torch.nonzero(self.event_of_V[input_ids_BT] >= 0, as_tuple=True)
        keep = t >= self.num_levels  # an event token with its codes before it in the row
        b, t = b[keep], t[keep]
        out[b, t] = self._items_at(input_ids_BT, b, t - self.num_levels)
        return out

    def count_events(self, batch: dict) -> int:
        """Loss units: loss-bearing events (queries) in the micro-batch."""
        ids = batch["input_ids"]
        is_gap = self.is_gap_V.to(ids.device)
        return int((is_gap[ids] & (batch["targets"] != IGNORE)).sum())


def catalogue_logits(
    model, h_QD: torch.Tensor, w_VD: torch.Tensor, item_code_ids_NL: torch.Tensor
) -> torch.Tensor:
    """[Q, N] scores of every item (see the module docstring); call inside forward (w_VD gathered)."""
    logits_QN = h_QD @ w_VD[item_code_ids_NL].sum(1).T
    return (logits_QN + model.heads[ITEM_HEAD](h_QD)).float()


def repeat_distribution(model, h_BTD, h_QD, qb, qt, history_BT, doc_ids_BT, num_items: int):
    """(p_copy [Q, N], has_history [Q]): the pointer over each query's earlier events in its document."""
    B, T, D = h_BTD.shape
    q_QD = model.heads[REPEAT_QUERY](h_QD)
    s_QX = (q_QD @ h_BTD.reshape(B * T, D).T).float()  # X = every position of the batch
    item_X = history_BT.reshape(-1)
    row_X = torch.arange(B, device=h_BTD.device).repeat_interleave(T)
    pos_X = torch.arange(T, device=h_BTD.device).repeat(B)
    valid = (item_X >= 0)[None] & (row_X[None] == qb[:, None]) & (pos_X[None] < qt[:, None])
    if doc_ids_BT is not None:
        valid &= doc_ids_BT.reshape(-1)[None] == doc_ids_BT[qb, qt][:, None]
    has_Q = valid.any(-1)
    safe = valid | ~has_Q[:, None]  # a query without history gets a harmless row, zeroed below
    attn_QX = s_QX.masked_fill(~safe, float("-inf")).softmax(-1) * has_Q[:, None]
    index = item_X.clamp(min=0).expand(len(qb), -1)
    return torch.zeros(len(qb), num_items, device=h_BTD.device).scatter_add_(1, index, attn_QX), has_Q


def item_logprobs(model, h_BTD, w_VD, qb, qt, lookups: Lookups, history_BT, doc_ids_BT) -> torch.Tensor:
    """[Q, N] log p(next item) at each query: the catalogue head, mixed with the history pointer when the
    model has one (see the module docstring). Call inside forward."""
    h_QD = h_BTD[qb, qt]
    logp_QN = catalogue_logits(model, h_QD, w_VD, lookups.item_code_ids_NL).log_softmax(-1)
    if REPEAT_QUERY not in model.heads:
        return logp_QN
    copy_QN, has_Q = repeat_distribution(model, h_BTD, h_QD, qb, qt, history_BT, doc_ids_BT, logp_QN.shape[1])
    gate_Q1 = model.heads[REPEAT_GATE](h_QD).float()
    mixed = torch.logaddexp(
        F.logsigmoid(-gate_Q1) + logp_QN, F.logsigmoid(gate_Q1) + copy_QN.clamp_min(1e-30).log()
    )
    return torch.where(has_Q[:, None], mixed, logp_QN)


def events_loss_fn(lookups: Lookups, *, objective: str, type_weight: float, chunk_size, num_real_vocab: int):
    """loss_fn(model, batch) -> (sum over loss-bearing events of their loss, summed metrics)."""
    use_items = objective in ("catalogue", "both")
    use_codes = objective in ("semantic_ids", "both")

    def loss_fn(model, batch):
        t = lookups.to(batch["input_ids"].device)
        qb, qt, items_Q, types_Q = t.queries(batch["input_ids"], batch["targets"])
        has_type_head = TYPE_HEAD in getattr(model, "heads", {})

        def head(h_BTD, w_VD):
            h_QD = h_BTD[qb, qt]
            parts = {}
            if use_items:
                history = t.history(batch["input_ids"])
                logp_QN = item_logprobs(model, h_BTD, w_VD, qb, qt, t, history, batch.get("doc_ids"))
                parts["item_loss"] = -logp_QN.gather(1, items_Q[:, None]).sum()
                parts["item_top1"] = (logp_QN.argmax(-1) == items_Q).float().sum().detach()
            if use_codes:
                parts["code_loss"], _ = chunked_cross_entropy(
                    h_BTD, w_VD, batch["targets"], chunk_size=chunk_size, num_real_vocab=num_real_vocab
                )
            if has_type_head and type_weight > 0:
                logits_QE = model.heads[TYPE_HEAD](h_QD).float()
                parts["type_loss"] = F.cross_entropy(logits_QE, types_Q, reduction="sum")
                parts["type_accuracy"] = (logits_QE.argmax(-1) == types_Q).float().sum().detach()
            return parts

        parts = model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids"), head_fn=head)
        weights = {"item_loss": 1.0, "code_loss": 1.0, "type_loss": type_weight}
        loss = sum(parts[k] * w for k, w in weights.items() if k in parts)
        return loss, {k: v.detach() for k, v in parts.items()}

    return loss_fn


def query_batches(queries: list[Query], pad_id: int, batch_size: int):
    """(first query index, batch) with one query per row, right-padded (causal: padding is never seen)."""
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        rows = [[Sample(q.input_ids, [IGNORE] * len(q.input_ids))] for q in chunk]
        batch = collate(rows, pad_id)
        batch["last"] = torch.tensor([len(q.input_ids) - 1 for q in chunk])
        yield start, batch


@torch.no_grad()
def score_queries(
    model, queries: list[Query], lookups: Lookups, *, pad_id: int, top_k: int, batch_size: int = 64
) -> dict:
    """The heads at every query: {"item_topk": [Q, top_k] item indices (catalogue head, history pointer
    included), "type_logp": [Q, E] (event-type log-probabilities), and with a history pointer "repeat_gate" [Q] (g) and "repeat_copy"
    [Q, N] (its distribution)}. Runs through the model's forward (head_fn), so it also works on a
    sharded model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    t = lookups.to(device)
    heads = getattr(model, "heads", {})
    tops, types, gates, copies = [], [], [], []
    for _, batch in query_batches(queries, pad_id, batch_size):
        rows = torch.arange(len(batch["last"]), device=device)
        last = batch["last"].to(device)
        ids = batch["input_ids"].to(device)
        history = t.history(ids)

        def head(h_BTD, w_VD, rows=rows, last=last, history=history):
            h_QD = h_BTD[rows, last]
            out = {}
            if ITEM_HEAD in heads:
                logp = item_logprobs(model, h_BTD, w_VD, rows, last, t, history, None)
                out["top"] = logp.topk(min(top_k, logp.shape[-1]), dim=-1).indices
            if REPEAT_QUERY in heads:
                n = len(t.item_keys)
                out["copy"], _ = repeat_distribution(model, h_BTD, h_QD, rows, last, history, None, n)
                out["gate"] = torch.sigmoid(model.heads[REPEAT_GATE](h_QD).float()[:, 0])
            if TYPE_HEAD in heads:
                out["type"] = model.heads[TYPE_HEAD](h_QD).float().log_softmax(-1)
            return out

        out = model(ids, batch["position_ids"].to(device), head_fn=head)
        if "top" in out:
            tops.append(out["top"].cpu().numpy())
        if "type" in out:
            types.append(out["type"].cpu().numpy())
        if "gate" in out:
            gates.append(out["gate"].cpu().numpy())
            copies.append(out["copy"].cpu().numpy())
    model.train(was_training)
    result = {}
    if tops:
        result["item_topk"] = np.concatenate(tops)
    if types:
        result["type_logp"] = np.concatenate(types)
    if gates:
        result["repeat_gate"], result["repeat_copy"] = np.concatenate(gates), np.concatenate(copies)
    return result
