"""Synthetic tasks: deterministic, disjoint splits, correct answers; embedded tokenizer reproducible."""

import json
import re

import pytest

from posttrain.data.embedded_tokenizer import EMBEDDED_DIR, train_embedded_tokenizer
from posttrain.data.synthetic import (
    SYSTEM_PROMPT,
    TASKS,
    Problem,
    exact_match,
    generate_problems,
    split_of,
    to_chat,
    to_multiturn_chat,
    to_text,
    write_demo_data,
)
from posttrain.errors import DataError


def _independent_answer(p: Problem) -> str:
    """Recompute the answer from the prompt with code separate from the generator's `solve`."""
    if p.task == "add":
        a, b = map(int, re.fullmatch(r"What is (\d{1,2}) \+ (\d{1,2})\?", p.prompt).groups())
        return str(a + b)
    items = p.prompt.split(": ", 1)[1].split(" ")
    assert 3 <= len(items) <= 6
    if p.task == "reverse":
        assert all(len(x) == 1 and x.islower() for x in items)
        return " ".join(items[::-1])
    assert all(len(x) == 1 and x.isdigit() for x in items)
    return " ".join(sorted(items, key=int))


def test_same_seed_same_problems_and_different_seed_differs():
    a = generate_problems("train", 300, seed=7)
    assert a == generate_problems("train", 300, seed=7)
    assert a != generate_problems("train", 300, seed=8)
    assert [p.task for p in a[:6]] == ["add", "reverse", "sort"] * 2


def test_splits_are_disjoint_and_prompts_distinct():
    train = generate_problems("train", 2000, seed=0)
    heldout = generate_problems("heldout", 2000, seed=0)
    train_prompts = {p.prompt for p in train}
    heldout_prompts = {p.prompt for p in heldout}
    assert train_prompts.isdisjoint(heldout_prompts)
    assert len(train_prompts) == 2000 and len(heldout_prompts) == 2000
    assert all(split_of(p.prompt) == "heldout" for p in heldout)
    # A different seed still never crosses the split boundary.
    assert heldout_prompts.isdisjoint({p.prompt for p in generate_problems("train", 2000, seed=99)})


def test_answers_are_correct():
    problems = generate_problems("train", 600, seed=3) + generate_problems("heldout", 600, seed=3)
    assert {p.task for p in problems} == set(TASKS)
    for p in problems:
        assert p.answer == _independent_answer(p), p


def test_examples_from_the_brief():
    assert _independent_answer(Problem("add", "What is 47 + 8?", "")) == "55"
    assert _independent_answer(Problem("reverse", "Reverse: c a t", "")) == "t a c"
    assert _independent_answer(Problem("sort", "Sort: 5 2 9", "")) == "2 5 9"


def test_exact_match():
    assert exact_match(" 55\n", "55")
    assert not exact_match("5 5", "55")
    assert not exact_match("56", "55")


def test_renderings():
    p = Problem("add", "What is 47 + 8?", "55")
    assert to_text(p) == "What is 47 + 8? Answer: 55"
    row = to_chat(p)
    assert row["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 47 + 8?"},
        {"role": "assistant", "content": "55"},
    ]
    assert row["task"] == "add" and row["answer"] == "55"
    assert [m["role"] for m in to_chat(p, system=False)["messages"]] == ["user", "assistant"]
    multi = to_multiturn_chat(generate_problems("train", 3, seed=0))
    assert [m["role"] for m in multi["messages"]] == ["system"] + ["user", "assistant"] * 3


def test_unknown_task_is_a_data_error():
    with pytest.raises(DataError, match="unknown synthetic tasks"):
        generate_problems("train", 3, seed=0, tasks=("add", "divide"))


def test_write_demo_data(tmp_path):
    paths = write_demo_data(tmp_path, seed=0, num_pretrain=90, num_sft=30, num_heldout=12, num_pref=20)
    rows = {k: [json.loads(line) for line in v.read_text().splitlines()] for k, v in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {
        "pretrain": 90,
        "sft_train": 30,
        "heldout": 12,
        "pref_train": 20,
        "pref_heldout": 12,
        "distill_train": 20,
        "rl_train": 20,
        "rl_heldout": 12,
    }
    assert [r["messages"][1] for r in rows["rl_heldout"]] == [r["messages"][1] for r in rows["heldout"]]
    assert all(r["metadata"]["task"] in ("add", "reverse", "sort") for r in rows["rl_train"])
    assert set(rows["pref_train"][0]) >= {"prompt", "chosen", "rejected"}
    assert set(rows["pretrain"][0]) == {"text"}
    assert all(r["messages"][-1]["content"] == r["answer"] for r in rows["heldout"])
    heldout_prompts = {r["messages"][1]["content"] for r in rows["heldout"]}
    sft_prompts = {r["messages"][1]["content"] for r in rows["sft_train"]}
    assert heldout_prompts.isdisjoint(sft_prompts)


def test_embedded_tokenizer_is_reproducible(tmp_path):
    out = train_embedded_tokenizer(tmp_path / "tok")
    fresh = json.loads((out / "tokenizer.json").read_text())
    committed = json.loads((EMBEDDED_DIR / "tokenizer.json").read_text())
    assert fresh["model"]["vocab"] == committed["model"]["vocab"]
    assert fresh["model"]["merges"] == committed["model"]["merges"]
    assert fresh["added_tokens"] == committed["added_tokens"]
    assert (out / "chat_template.jinja").read_text() == (EMBEDDED_DIR / "chat_template.jinja").read_text()
    assert sum(f.stat().st_size for f in EMBEDDED_DIR.iterdir()) < 200_000


def test_real_model_tasks_answers_near_misses_and_files(tmp_path):
    """The SmolLM2 demo's ladder: answers recomputed independently, a near miss is never the answer,
    answers carry no leading space, and the files keep the held-out problems out of training."""
    import random

    from posttrain.data.synthetic import REAL_TASKS, SHORT_SYSTEM_PROMPT, solve, write_real_data, wrong_answer

    rng = random.Random(0)
    problems = generate_problems("heldout", 400, seed=0, tasks=REAL_TASKS)
    assert {p.task for p in problems} == set(REAL_TASKS)
    for p in problems:
        if p.task == "larger":
            a, b = map(int, re.fullmatch(r"Which is larger, (\d\d) or (\d\d)\?", p.prompt).groups())
            assert a != b and p.answer == str(max(a, b))
        else:
            a, op, b = re.fullmatch(r"What is (\d{1,2}) ([+-]) (\d{1,2})\?", p.prompt).groups()
            assert p.answer == str(int(a) + int(b) if op == "+" else int(a) - int(b))
            assert p.task == "add" or (len(a) == 2 and len(b) == 1 and (op == "+") == (p.task == "add_small"))
        assert solve(p.task, p.prompt) == p.answer and p.answer == p.answer.strip()
        assert wrong_answer(p, rng) != p.answer
    paths = write_real_data(tmp_path, seed=1, num_sft=200, num_heldout=40, num_rl=200)
    read = {k: [json.loads(x) for x in v.read_text().splitlines()] for k, v in paths.items()}
    assert read["sft_train"][0]["messages"][0] == {"role": "system", "content": SHORT_SYSTEM_PROMPT}
    heldout = {r["messages"][1]["content"] for r in read["heldout"]}
    assert heldout == {r["messages"][1]["content"] for r in read["rl_heldout"]}
    assert not heldout & {r["messages"][1]["content"] for r in read["sft_train"] + read["rl_train"]}
