"""Dataset kinds: one schema each; a valid record becomes its typed value, a bad one fails with the
field at fault and a reason key (what `on_error: skip` counts)."""

import pytest

from posttrain.data.schemas import DistillRecord, PreferencePair, RLPrompt, validate
from posttrain.errors import DataError

CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_valid_records_of_every_kind():
    assert validate("chat", {"messages": CHAT}) == CHAT
    assert validate("prompt_completion", {"prompt": "a", "completion": "b"}) == ("a", "b")
    assert validate("text", {"text": "hello"}) == "hello"
    assert validate("tokens", {"input_ids": [1, 2, 3]}) == ([1, 2, 3], [1, 2, 3])
    assert validate("tokens", {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}) == ([1, 2, 3], [-100, 2, 3])
    pair = validate("preference", {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert pair == PreferencePair(
        [{"role": "user", "content": "2+2?"}],
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
    )
    full = validate(
        "preference", {"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "5"}]}
    )
    assert full.prompt == [] and full.chosen == CHAT
    rl = validate("rl_prompt", {"messages": CHAT[:1], "answer": 4, "metadata": {"task": "add"}})
    assert rl == RLPrompt(CHAT[:1], "4", {"task": "add"})
    assert validate("rl_prompt", {"prompt": "2+2?", "answer": "4"}).metadata == {}
    topk = {"ids": [[4, 5], [6, 7]], "logprobs": [[-0.1, -2.3], [-0.5, -1.0]]}
    d = validate("distill", {"prompt": "2+2?", "completion": "4", "teacher_topk": topk})
    assert d == DistillRecord([{"role": "user", "content": "2+2?"}], "4", topk["ids"], topk["logprobs"])
    assert validate("distill", {"messages": CHAT[:1], "completion": "4"}).teacher_ids is None


BAD = [
    ("chat", {"conversation": CHAT}, "missing field 'messages'", "missing_field"),
    ("chat", {"messages": "hi"}, "field 'messages' must be list, got str", "wrong_type"),
    ("chat", {"messages": []}, "empty conversation", "empty_conversation"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'", "unknown_role"),
    ("chat", {"messages": CHAT[:1]}, "no assistant turn", "no_assistant_turn"),
    ("prompt_completion", {"prompt": "a"}, "missing field 'completion'", "missing_field"),
    (
        "prompt_completion",
        {"prompt": 3, "completion": "b"},
        "field 'prompt' must be str, got int",
        "wrong_type",
    ),
    ("text", {"text": ["a"]}, "field 'text' must be str, got list", "wrong_type"),
    ("tokens", {"input_ids": [1, "2"]}, "field 'input_ids'[1] must be int, got str", "wrong_type"),
    ("tokens", {"input_ids": []}, "field 'input_ids' is empty", "empty_sequence"),
    ("tokens", {"input_ids": [1, 2], "labels": [1]}, "field 'labels' has 1 entries", "shape_mismatch"),
    ("tokens", {"input_ids": [1, 2], "labels": [-100, -100]}, "no loss-bearing tokens", "no_loss_tokens"),
    ("preference", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'", "missing_field"),
    (
        "preference",
        {"prompt": "q", "chosen": 1, "rejected": "b"},
        "field 'chosen' must be str or list",
        "wrong_type",
    ),
    (
        "preference",
        {"chosen": CHAT[:1], "rejected": CHAT},
        "field 'chosen': no assistant turn",
        "no_assistant_turn",
    ),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": "a"}, "identical", "identical_pair"),
    ("rl_prompt", {"answer": "4"}, "missing field 'messages' (or 'prompt')", "missing_field"),
    ("rl_prompt", {"prompt": "q"}, "missing field 'answer'", "missing_field"),
    (
        "rl_prompt",
        {"prompt": "q", "answer": True},
        "field 'answer' must be str or int or number, got bool",
        "wrong_type",
    ),
    (
        "rl_prompt",
        {"prompt": "q", "answer": "4", "metadata": [1]},
        "field 'metadata' must be dict",
        "wrong_type",
    ),
    ("distill", {"prompt": "q"}, "missing field 'completion'", "missing_field"),
    (
        "distill",
        {"prompt": "q", "completion": "a", "teacher_topk": {"ids": [[1]]}},
        "missing field 'logprobs'",
        "missing_field",
    ),
    (
        "distill",
        {"prompt": "q", "completion": "a", "teacher_topk": {"ids": [[1, 2]], "logprobs": [[-1.0]]}},
        "row 0: expected 2 ids and 2 logprobs",
        "shape_mismatch",
    ),
    (
        "distill",
        {"prompt": "q", "completion": "a", "teacher_topk": {"ids": [[1]], "logprobs": [[0.5]]}},
        "logprobs must be numbers <= 0",
        "wrong_type",
    ),
]


@pytest.mark.parametrize(
    "fmt,record,message,reason", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_records_name_the_field_and_reason(fmt, record, message, reason):
    with pytest.raises(DataError) as err:
        validate(fmt, record)
    assert message in str(err.value) and err.value.reason == reason


def test_unknown_format_is_named():
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        validate("csv", {})
