"""Synthetic tasks with verifiable answers, for CPU demos and end-to-end tests.

Three tiny tasks (`add`, `reverse`, `sort`) that a ~1-3M-parameter transformer can learn in a couple of
CPU minutes (TASKS, the tiny demo's), and a ladder of short ones a real ~100M-parameter chat model
half-solves after a little SFT (REAL_TASKS, the SmolLM2 demo's): `add_small` (two-digit + one-digit),
`sub_small` (two-digit - one-digit), `larger` (of two two-digit numbers) and `add` again (two-digit +
two-digit, the hardest rung). Every problem has one exact answer, so SFT, evaluation and RL rewards can all be checked
with `exact_match`. Train and held-out splits are disjoint by construction: the split a prompt belongs
to is a function of a stable hash (sha1) of its text, so no seed or sample size can leak a held-out
problem into training. (Python's `hash` is salted per process and would break this.)
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.errors import DataError

TASKS = ("add", "reverse", "sort")
# Short prompts, one- or two-token answers with no leading space: cheap to train and sample on a CPU.
REAL_TASKS = ("add_small", "sub_small", "larger", "add")
SYSTEM_PROMPT = "You are a precise assistant. Answer with the result only."
# The SmolLM2 demo's: shorter (every token of every sequence costs CPU time), and still an instruction.
SHORT_SYSTEM_PROMPT = "Answer with the result only."

Split = Literal["train", "heldout"]

# One prompt in five is held out. Small enough that training sees most of the space, large enough
# that `add` (10,000 distinct prompts) still has ~2,000 held-out problems.
HELDOUT_PER_MILLE = 200
# How many draws we try for a fresh prompt of the right split before accepting a repeat; only a split
# smaller than the requested count ever gets near this.
MAX_DRAWS_PER_PROBLEM = 2000
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    """One task instance: `prompt` is what the user asks, `answer` the only correct reply."""

    task: str
    prompt: str
    answer: str


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, decided by the sha1 of its text alone."""
    bucket = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16) % 1000
    return "heldout" if bucket < HELDOUT_PER_MILLE else "train"


def _make_add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Problem("add", f"What is {a} + {b}?", str(a + b))


def _make_reverse(rng: random.Random) -> Problem:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
    return Problem("reverse", "Reverse: " + " ".join(letters), " ".join(reversed(letters)))


def _make_sort(rng: random.Random) -> Problem:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    return Problem("sort", "Sort: " + " ".join(digits), " ".join(sorted(digits)))


def _make_add_small(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return Problem("add_small", f"What is {a} + {b}?", str(a + b))


def _make_sub_small(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return Problem("sub_small", f"What is {a} - {b}?", str(a - b))


def _make_larger(rng: random.Random) -> Problem:
    a, b = rng.sample(range(10, 100), 2)
    return Problem("larger", f"Which is larger, {a} or {b}?", str(max(a, b)))


MAKERS = {
    "add": _make_add,
    "reverse": _make_reverse,
    "sort": _make_sort,
    "add_small": _make_add_small,
    "sub_small": _make_sub_small,
    "larger": _make_larger,
}


def solve(task: str, prompt: str) -> str:
    """Recompute the answer from the prompt text; the reference a reward function can trust."""
    if task in ("add", "add_small"):
        left, right = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        return str(int(left) + int(right))
    if task == "sub_small":
        left, right = prompt.removeprefix("What is ").removesuffix("?").split(" - ")
        return str(int(left) - int(right))
    if task == "larger":
        left, right = prompt.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
        return str(max(int(left), int(right)))
    if task == "reverse":
        return " ".join(reversed(prompt.removeprefix("Reverse: ").split()))
    if task == "sort":
        return " ".join(sorted(prompt.removeprefix("Sort: ").split()))
    raise DataError(f"unknown synthetic task {task!r} (expected one of {', '.join(MAKERS)})")


def generate_problems(split: Split, num: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Problem]:
    """`num` problems from `split`, round-robin over `tasks`, identical for identical arguments.

    Prompts are distinct within the list while the split has fresh ones left; past that, repeats.
    """
    if split not in ("train", "heldout"):
        raise DataError(f"unknown split {split!r} (expected 'train' or 'heldout')")
    unknown = [t for t in tasks if t not in MAKERS]
    if unknown or not tasks:
        raise DataError(f"unknown synthetic tasks {unknown} (expected a non-empty subset of {tuple(MAKERS)})")
    # A string seed is hashed with sha512 by `random`, so it is stable across processes.
    rng = random.Random(f"posttrain-synthetic:{seed}:{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    for i in range(num):
        problems.append(_draw(rng, tasks[i % len(tasks)], split, seen))
    return problems


def _draw(rng: random.Random, task: str, split: Split, seen: set[str]) -> Problem:
    """A problem of `task` in `split`, fresh if one is found within the draw budget."""
    fallback = None
    for _ in range(MAX_DRAWS_PER_PROBLEM):
        problem = MAKERS[task](rng)
        if split_of(problem.prompt) != split:
            continue
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            return problem
        fallback = fallback or problem
    if fallback is None:
        raise DataError(f"could not draw a {task!r} problem in split {split!r}")
    return fallback


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer up to surrounding whitespace."""
    return prediction.strip() == answer.strip()


def _system(system: bool | str) -> list[dict]:
    """The system turn: True = SYSTEM_PROMPT, a string = that prompt, False = none."""
    if not system:
        return []
    return [{"role": "system", "content": SYSTEM_PROMPT if system is True else system}]


def to_chat(p: Problem, system: bool | str = True) -> dict:
    """An SFT / evaluation row: a conversation plus the task and reference answer."""
    messages = _system(system)
    messages += [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}]
    return {"messages": messages, "task": p.task, "answer": p.answer}


def to_multiturn_chat(problems: list[Problem]) -> dict:
    """One conversation that asks every problem in turn; used to test multi-turn loss masks."""
    if not problems:
        raise DataError("to_multiturn_chat needs at least one problem")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for p in problems:
        messages += [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}]
    return {"messages": messages, "task": "multiturn", "answer": problems[-1].answer}


def wrong_answer(p: Problem, rng: random.Random) -> str:
    """A near miss: the kind of mistake a small model makes (off by a little, a swap, unsorted)."""
    if p.task in ("add", "add_small", "sub_small"):
        return str(int(p.answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    if p.task == "larger":  # the other number
        left, right = p.prompt.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
        return left if right == p.answer else right
    items = p.answer.split()
    i = rng.randrange(len(items) - 1)
    swapped = items[:i] + [items[i + 1], items[i]] + items[i + 2 :]
    if swapped == items:  # equal neighbours: fall back to the prompt's order (unsolved)
        swapped = list(reversed(items)) if p.task == "reverse" else items[::-1]
    return " ".join(swapped) if swapped != items else p.answer + " " + items[0]


PADDINGS = (
    "Sure! The answer is {a}. Let me know if you need anything else.",
    "Great question. After careful thought, I believe it is {a}.",
    "{a}, I think, but please double-check.",
)


def to_preference(p: Problem, rng: random.Random, system: bool = True) -> dict:
    """A preference row: chosen = the exact answer alone; rejected = a wrong answer (half the time) or
    the right answer padded with chatter (the other half). A preference stage should learn to be
    correct AND concise."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": p.prompt})
    if rng.random() < 0.5:
        rejected, kind = wrong_answer(p, rng), "wrong"
    else:
        rejected, kind = rng.choice(PADDINGS).format(a=p.answer), "padded"
    return {
        "prompt": messages,
        "chosen": p.answer,
        "rejected": rejected,
        "task": p.task,
        "rejected_kind": kind,
    }


def to_distill(p: Problem, system: bool = True) -> dict:
    """A distillation row: the prompt and a completion (here the reference answer stands in for a
    teacher's sampled completion)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": p.prompt})
    return {"messages": messages, "completion": p.answer, "task": p.task}


def to_rl_prompt(p: Problem, system: bool | str = True) -> dict:
    """An RL prompt row: the conversation to answer and the reference answer a verifiable reward checks."""
    messages = _system(system)
    messages.append({"role": "user", "content": p.prompt})
    return {"messages": messages, "answer": p.answer, "metadata": {"task": p.task}}


def to_text(p: Problem) -> str:
    """Plain pretraining text (no chat markup), so a base model already knows the tasks."""
    return f"{p.prompt} Answer: {p.answer}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    num_pretrain: int = 20000,
    num_sft: int = 4000,
    num_heldout: int = 300,
    num_pref: int = 4000,
) -> dict[str, Path]:
    """Write pretrain.jsonl ({"text"}), sft_train.jsonl and heldout.jsonl (chat rows) and return their paths.

    Pretraining and SFT draw from the train split with different seeds; heldout.jsonl only from the
    held-out split, so evaluation never sees a trained-on prompt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("pretrain", "sft_train", "heldout")}
    pretrain = generate_problems("train", num_pretrain, seed)
    _write_jsonl(paths["pretrain"], [{"text": to_text(p)} for p in pretrain])
    sft = generate_problems("train", num_sft, seed + 1)
    _write_jsonl(paths["sft_train"], [to_chat(p) for p in sft])
    heldout = generate_problems("heldout", num_heldout, seed)
    _write_jsonl(paths["heldout"], [to_chat(p) for p in heldout])
    paths.update(write_preference_data(out, seed, num_pref, num_heldout))
    paths.update(write_rl_data(out, seed, num_pref, num_heldout))
    return paths


def write_rl_data(
    out_dir: str | Path, seed: int = 0, num_train: int = 4000, num_heldout: int = 300
) -> dict[str, Path]:
    """rl_train.jsonl and rl_heldout.jsonl: RL prompts (messages + answer + metadata.task); the held-out
    prompts are the same problems as heldout.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("rl_train", "rl_heldout")}
    _write_jsonl(
        paths["rl_train"], [to_rl_prompt(p) for p in generate_problems("train", num_train, seed + 4)]
    )
    _write_jsonl(
        paths["rl_heldout"], [to_rl_prompt(p) for p in generate_problems("heldout", num_heldout, seed)]
    )
    return paths


def write_preference_data(
    out_dir: str | Path, seed: int = 0, num_train: int = 4000, num_heldout: int = 300
) -> dict[str, Path]:
    """pref_train.jsonl and pref_heldout.jsonl (preference rows) and distill_train.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"posttrain-preference:{seed}")
    paths = {name: out / f"{name}.jsonl" for name in ("pref_train", "pref_heldout", "distill_train")}
    train = generate_problems("train", num_train, seed + 2)
    _write_jsonl(paths["pref_train"], [to_preference(p, rng) for p in train])
    heldout = generate_problems("heldout", num_heldout, seed + 1)
    _write_jsonl(paths["pref_heldout"], [to_preference(p, rng) for p in heldout])
    _write_jsonl(
        paths["distill_train"], [to_distill(p) for p in generate_problems("train", num_train, seed + 3)]
    )
    return paths


def write_real_data(
    out_dir: str | Path,
    seed: int = 0,
    num_sft: int = 2000,
    num_heldout: int = 200,
    num_rl: int = 2000,
    tasks: tuple[str, ...] = REAL_TASKS,
    system: bool | str = SHORT_SYSTEM_PROMPT,
) -> dict[str, Path]:
    """The SmolLM2 demo's files: sft_train.jsonl and heldout.jsonl (chat rows), rl_train.jsonl and
    rl_heldout.jsonl (RL prompts; the held-out ones are heldout.jsonl's problems). Seeds as write_demo_data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("sft_train", "heldout", "rl_train", "rl_heldout")}
    heldout = generate_problems("heldout", num_heldout, seed, tasks)
    _write_jsonl(
        paths["sft_train"], [to_chat(p, system) for p in generate_problems("train", num_sft, seed + 1, tasks)]
    )
    _write_jsonl(paths["heldout"], [to_chat(p, system) for p in heldout])
    _write_jsonl(
        paths["rl_train"],
        [to_rl_prompt(p, system) for p in generate_problems("train", num_rl, seed + 4, tasks)],
    )
    _write_jsonl(paths["rl_heldout"], [to_rl_prompt(p, system) for p in heldout])
    return paths
