"""Bad input: `raise` names file:line and the reason; `skip` drops and counts per reason; overlong
samples are truncated, dropped or split as configured, and counted. Nothing is lost silently."""

import json

import pytest
from helpers import tokenizer, write_jsonl

from posttrain.config import SourceConfig
from posttrain.data.samples import load_samples
from posttrain.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]}
BAD_LINES = {
    "malformed_json": '{"messages": [',
    "invalid_utf8": b'{"text": "\xff\xfe"}',
    "missing_field": {"conversation": []},
    "wrong_type": {"messages": "hello"},
    "empty_conversation": {"messages": []},
    "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}]},
    "not_an_object": "[1, 2]",
}
MESSAGES = {
    "malformed_json": "malformed JSON",
    "invalid_utf8": "invalid UTF-8",
    "missing_field": "missing field 'messages'",
    "wrong_type": "field 'messages' must be list",
    "empty_conversation": "empty conversation",
    "unknown_role": "unknown role 'bot'",
    "no_assistant_turn": "no assistant turn",
    "not_an_object": "expected a JSON object",
}


def _write(path, rows):
    with path.open("wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            else:
                f.write(((row if isinstance(row, str) else json.dumps(row)) + "\n").encode())
    return path


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_raise_names_file_line_and_reason(tmp_path, reason):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, BAD_LINES[reason], GOOD])
    with pytest.raises(DataError) as err:
        load_samples(SourceConfig(path=str(path), format="chat"), tokenizer(), max_len=64, overlong="drop")
    assert f"{path}:3: " in str(err.value)
    assert MESSAGES[reason] in str(err.value)


def test_skip_counts_every_reason(tmp_path):
    rows = [GOOD]
    for line in BAD_LINES.values():
        rows += [line, GOOD]
    path = _write(tmp_path / "d.jsonl", rows)
    src = SourceConfig(path=str(path), format="chat", on_error="skip")
    samples, skips = load_samples(src, tokenizer(), max_len=64, overlong="drop")
    assert len(samples) == len(BAD_LINES) + 1
    assert dict(skips) == {reason: 1 for reason in BAD_LINES}


def test_overlong_policies_are_counted(tmp_path):
    tok = tokenizer()
    long_text = " ".join(["word"] * 100)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "short one"}])
    n = len(tok.render_text(long_text)[0])
    src = SourceConfig(path=str(path), format="text")
    kept, skips = load_samples(src, tok, max_len=32, overlong="drop")
    assert len(kept) == 1 and skips["overlong_dropped"] == 1
    kept, skips = load_samples(src, tok, max_len=32, overlong="truncate")
    assert [len(s.input_ids) for s in kept] == [32, len(tok.render_text("short one")[0])]
    assert skips["overlong_truncated"] == 1
    kept, skips = load_samples(src, tok, max_len=32, overlong="split")
    assert sum(len(s.input_ids) for s in kept[:-1]) == n and skips["overlong_split"] == 1


def test_truncation_that_removes_all_loss_is_dropped_and_counted(tmp_path):
    long_prompt = " ".join(["word"] * 80)
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": long_prompt, "completion": "yes"}, {"prompt": "a", "completion": "b"}],
    )
    kept, skips = load_samples(
        SourceConfig(path=str(path), format="prompt_completion"), tokenizer(), max_len=16, overlong="truncate"
    )
    assert len(kept) == 1 and skips == {"overlong_no_loss_left": 1}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_samples(
            SourceConfig(path=str(tmp_path / "nope.jsonl"), format="chat"),
            tokenizer(),
            max_len=8,
            overlong="drop",
        )
