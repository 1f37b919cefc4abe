"""Held-out exact-match accuracy, per task and overall: greedy, and of sampled answers.

Rows are chat rows (`messages` ending with the reference assistant answer, plus `answer` and
`task`). `prompt_format="chat"` asks through the chat template, as a user would;
`prompt_format="text"` asks in the plain pretraining format (`{question} Answer:`), which is how a
base model that never saw chat markup can still be measured fairly.

`sampled_exact_match_accuracy` samples k answers per question with the RL rollout engine and reports
their mean exact match (the pass@1 estimate RL papers report, e.g. DeepSeek-R1's "pass@1 over k samples
at temperature T") and pass@k. It is what on-policy RL optimises directly: GRPO raises the probability of
right answers, which moves the sampled accuracy before (and more than) the greedy one.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from posttrain.data.labels import IGNORE
from posttrain.data.synthetic import exact_match
from posttrain.data.tokenizer import Tokenizer


def _prompt_ids(tokenizer: Tokenizer, row: dict, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        return tokenizer.render_prompt(row["messages"])
    question = next(m["content"] for m in row["messages"] if m["role"] == "user")
    return tokenizer.encode(f"{question} Answer:")


def exact_match_accuracy(
    model,
    tokenizer: Tokenizer,
    rows: list[dict],
    *,
    prompt_format: str = "chat",
    max_new_tokens: int = 24,
    progress: str = "quiet",
) -> dict:
    """{"accuracy": overall, "accuracy/<task>": per task, "num": count}. progress: a progress mode.

    Greedy decoding with the KV-cache engine at temperature 0 (the same tokens as the no-cache
    generate.greedy_generate, pinned by tests/unit/test_engine.py, ~10x fewer FLOPs on a real model)."""
    from posttrain.metrics.progress import Progress
    from posttrain.rl.engine import LocalEngine
    from posttrain.rl.types import SamplingParams

    engine = LocalEngine(model, pad_id=tokenizer.pad_id, num_real_vocab=tokenizer.vocab_size)
    # Text prompts end where the answer's line ends: the document separator or eos.
    stops = (tokenizer.end_of_turn_id, tokenizer.eos_id, tokenizer.doc_sep_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stops, n=1)
    shown = Progress(len(rows), "generate", progress, unit="prompts")
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(rows), engine.max_batch_size):
        chunk = rows[start : start + engine.max_batch_size]
        outs = engine.generate([_prompt_ids(tokenizer, row, prompt_format) for row in chunk], params)
        for row, out in zip(chunk, outs):
            ok = exact_match(tokenizer.decode(out.token_ids, skip_special_tokens=True), row["answer"])
            hits[row.get("task", "all")].append(ok)
        shown.advance(len(chunk))
    shown.close()
    total = [h for v in hits.values() for h in v]
    result = {"accuracy": sum(total) / max(1, len(total)), "num": len(total)}
    result.update({f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(hits.items())})
    return result


def sampled_exact_match_accuracy(
    model,
    tokenizer: Tokenizer,
    rows: list[dict],
    *,
    samples_per_prompt: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> dict:
    """{"accuracy": mean exact match of all sampled answers, "pass@k": share of questions with at least
    one right answer among the k = samples_per_prompt, "accuracy/<task>" and "pass@k/<task>": per task,
    "num": questions}.

    Chat prompts, our KV-cache engine (posttrain.rl.engine.LocalEngine), a fixed seed: the same seed on
    two checkpoints draws the same random numbers, so their difference is less noisy than two seeds'."""
    from posttrain.rl.engine import LocalEngine
    from posttrain.rl.types import SamplingParams

    engine = LocalEngine(model, pad_id=tokenizer.pad_id, num_real_vocab=tokenizer.vocab_size)
    prompts = [_prompt_ids(tokenizer, row, "chat") for row in rows]
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_ids=(tokenizer.end_of_turn_id, tokenizer.eos_id, tokenizer.doc_sep_id),  # as greedy's
        n=samples_per_prompt,
        seed=seed,
    )
    outs = engine.generate(prompts, params)  # prompt-major: row i's samples are i*k .. i*k + k - 1
    hits: dict[str, list[float]] = defaultdict(list)
    solved_by_task: dict[str, list[bool]] = defaultdict(list)
    solved = []
    for i, row in enumerate(rows):
        k = samples_per_prompt
        right = [
            exact_match(tokenizer.decode(o.token_ids, skip_special_tokens=True), row["answer"])
            for o in outs[i * k : (i + 1) * k]
        ]
        hits[row.get("task", "all")].append(sum(right) / k)
        solved_by_task[row.get("task", "all")].append(any(right))
        solved.append(any(right))
    total = [h for v in hits.values() for h in v]
    result = {
        "accuracy": sum(total) / max(1, len(total)),
        f"pass@{samples_per_prompt}": sum(solved) / max(1, len(solved)),
        "num": len(total),
    }
    result.update({f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(hits.items())})
    k = samples_per_prompt
    result.update({f"pass@{k}/{task}": sum(v) / len(v) for task, v in sorted(solved_by_task.items())})
    return result


@torch.no_grad()
def preference_accuracy(model, tokenizer: Tokenizer, rows: list[dict]) -> dict:
    """Share of preference rows where the model gives the chosen answer a higher total log-probability
    than the rejected one (no reference model: comparable across stages), overall and per kind of
    rejected answer (`rejected_kind`, e.g. wrong / padded)."""
    from posttrain.data.pairs import render_pair

    model.eval()
    wins: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        ids, labels, (n_chosen, _) = render_pair(tokenizer, row)
        scores = []
        for lo, hi in ((0, n_chosen), (n_chosen, len(ids))):
            x = torch.tensor([ids[lo:hi]])
            y = torch.tensor(labels[lo + 1 : hi])
            logp = model.logits(model(x))[0, :-1, : tokenizer.vocab_size].float().log_softmax(-1)
            keep = y != IGNORE
            scores.append(float(logp[keep].gather(-1, y[keep, None]).sum()))
        wins[row.get("rejected_kind", "all")].append(scores[0] > scores[1])
    total = [w for v in wins.values() for w in v]
    out = {"accuracy": sum(total) / max(1, len(total)), "num": len(total)}
    out.update({f"accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(wins.items())})
    return out
