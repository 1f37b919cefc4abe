"""`posttrain data inspect --json`: masks match the assistant contents exactly, for multi-turn
conversations with system prompts."""

import json
import subprocess
import sys

import yaml
from helpers import ROOT, job, tokenizer, write_jsonl

from posttrain.data.labels import IGNORE
from posttrain.data.synthetic import generate_problems, to_multiturn_chat


def test_inspect_json_masks_are_exactly_the_assistant_turns(tmp_path):
    convs = [to_multiturn_chat(generate_problems("train", n, seed)) for n, seed in ((1, 0), (3, 1), (4, 2))]
    data = write_jsonl(tmp_path / "chat.jsonl", convs)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job(tmp_path, data, data={"max_tokens_per_pack": 512})))
    res = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "data", "inspect", str(cfg), "--json", "--num-samples", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 3
    tok = tokenizer()
    for row, conv in zip(rows, convs):
        ids, labels = row["input_ids"], row["labels"]
        assert ids == tok.hf.apply_chat_template(conv["messages"], tokenize=True)["input_ids"]
        assert all(y in (-100, i) for i, y in zip(ids, labels))
        # Contiguous loss spans, decoded, are each assistant content followed by its end-of-turn token.
        spans, current = [], []
        for i, y in zip(ids, labels):
            if y != IGNORE:
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        if current:
            spans.append(current)
        expected = [m["content"] + "<|im_end|>" for m in conv["messages"] if m["role"] == "assistant"]
        assert [tok.decode(s, skip_special_tokens=False) for s in spans] == expected
        assert conv["messages"][0]["role"] == "system"


def test_inspect_text_marks_loss_tokens(tmp_path):
    from posttrain.config import validate_job
    from posttrain.data.inspect import inspect

    data = write_jsonl(tmp_path / "chat.jsonl", [to_multiturn_chat(generate_problems("train", 2, 0))])
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        inspect(validate_job(job(tmp_path, data)), num_samples=1, out=f)
    text = out.read_text()
    answers = [p.answer for p in generate_problems("train", 2, 0)]
    assert text.count("{{") == 2 and all("{{" + a + "<|im_end|>}}" in text for a in answers)
