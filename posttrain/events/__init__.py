"""Transformers over interaction-event sequences: event logs -> item tokens -> next-item heads.

    data.py           event-log schema, per-user time-ordered sequences, the time split
    semantic_ids.py   residual k-means semantic IDs and the saved item/event vocabulary
    sequences.py      events -> token samples (gap, item codes, event type) and loss masks
    model.py          catalogue head (+ history pointer), event-type head, the loss, batched scoring
    decode.py         constrained beam search over the items' semantic-ID codes
    metrics.py        recall@k and NDCG@k; popularity, last-item and transition baselines
    generator.py      synthetic but structured interaction data (deterministic by seed)

The recipe is posttrain/recipes/events.py; the walk-through is docs/events.md.
"""
