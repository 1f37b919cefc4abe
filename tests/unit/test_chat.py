"""Assistant loss masks: ids equal the stock template, spans are exactly each answer + end of turn.

Both mask methods are covered: `{% generation %}` markers (the embedded tokenizer) and prefix diffing
(the same tokenizer with the markers stripped, a Qwen-style template, and a Llama-3-style tokenizer).
Real templates against TRL's marked training templates: tests/unit/test_chat_templates.py.
"""

from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from posttrain.data.chat import assistant_labels, has_generation_markers
from posttrain.data.embedded_tokenizer import CHAT_TEMPLATE, embedded_tokenizer_dir
from posttrain.data.labels import IGNORE
from posttrain.data.synthetic import generate_problems, to_chat, to_multiturn_chat
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import DataError

NO_MARKERS = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Qwen shape: a default system prompt is injected when the conversation has none.
QWEN_STYLE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The generation prompt ends in a space that the answer's first token absorbs: prefix-stable as text,
# not as tokens (the old token diff refused it).
MERGING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3's pre-tokenizer split pattern (runs of newlines stay one piece, digits in groups of three).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CONVERSATIONS = [
    to_multiturn_chat(generate_problems("train", 4, seed=5))["messages"],
    to_chat(generate_problems("train", 2, seed=1)[1])["messages"],
    [
        {"role": "system", "content": "You are a precise assistant."},
        {"role": "user", "content": "Tell me two facts."},
        {"role": "assistant", "content": "First, water is wet.\nSecond, 2 + 2 = 4."},
        {"role": "user", "content": "And a list?"},
        {"role": "assistant", "content": "- one\n- two"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome!"},
    ],
]


def _with_template(tmp_path: Path, name: str, template: str) -> Tokenizer:
    """A temp copy of the embedded tokenizer whose chat template is replaced."""
    hf = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    hf.chat_template = template
    hf.save_pretrained(str(tmp_path / name))
    return Tokenizer.from_dir(tmp_path / name)


def _llama3_tokenizer(tmp_path: Path) -> Tokenizer:
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] + ["user\n\nassistant\n\nsystem"] * 5
    raw.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        extra_special_tokens=specials[1:3],
        chat_template=LLAMA3_TEMPLATE,
    )
    hf.save_pretrained(str(tmp_path / "llama3"))
    return Tokenizer.from_dir(tmp_path / "llama3")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    tmp = tmp_path_factory.mktemp("tok")
    return {
        "markers": Tokenizer.from_dir("builtin"),
        "no_markers": _with_template(tmp, "no_markers", NO_MARKERS),
        "qwen_style": _with_template(tmp, "qwen_style", QWEN_STYLE),
        "llama3": _llama3_tokenizer(tmp),
    }


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of loss-bearing positions."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _stock_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    return list(tok.hf.apply_chat_template(messages, tokenize=True)["input_ids"])


def test_methods_are_chosen_by_the_template(tokenizers):
    assert has_generation_markers(tokenizers["markers"].hf)
    assert not any(has_generation_markers(tokenizers[k].hf) for k in ("no_markers", "qwen_style", "llama3"))


@pytest.mark.parametrize("name", ["markers", "no_markers", "qwen_style", "llama3"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ids_are_stock_and_spans_are_answers(tokenizers, name, conv):
    tok, messages = tokenizers[name], CONVERSATIONS[conv]
    ids, labels = tok.render_chat(messages)
    assert ids == _stock_ids(tok, messages)
    assert len(labels) == len(ids)
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids))
    end_of_turn = tok.decode([tok.end_of_turn_id], skip_special_tokens=False)
    assert end_of_turn == ("<|eot_id|>" if name == "llama3" else "<|im_end|>")
    answers = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    decoded = [tok.decode(ids[s:e], skip_special_tokens=False) for s, e in _spans(labels)]
    assert decoded == answers


@pytest.mark.parametrize("name", ["markers", "no_markers", "qwen_style", "llama3"])
def test_last_assistant_keeps_only_the_final_turn(tokenizers, name):
    tok, messages = tokenizers[name], CONVERSATIONS[2]
    ids, all_labels = tok.render_chat(messages, mask="all_assistant")
    ids_last, labels = tok.render_chat(messages, mask="last_assistant")
    assert ids_last == ids
    spans = _spans(labels)
    assert spans == _spans(all_labels)[-1:]
    assert tok.decode(ids[spans[0][0] : spans[0][1]], skip_special_tokens=False).startswith(
        "You are welcome!"
    )


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_marker_and_prefix_methods_agree(tokenizers, conv):
    tok, messages = tokenizers["markers"], CONVERSATIONS[conv]
    by_markers = assistant_labels(tok.hf, messages, tok.end_of_turn_id, method="markers")
    by_prefixes = assistant_labels(tok.hf, messages, tok.end_of_turn_id, method="prefixes")
    assert by_markers == by_prefixes
    assert by_markers == tokenizers["no_markers"].render_chat(messages)


def test_answer_merging_with_the_prompt_is_masked(tmp_path):
    """The prompt's trailing space and the answer form one token, " 55": it is labelled (it overlaps
    the answer), the ids are still the stock ones."""
    tok = _with_template(tmp_path, "merging", MERGING)
    messages = [{"role": "user", "content": "What is 47 + 8?"}, {"role": "assistant", "content": "55"}]
    ids, labels = tok.render_chat(messages)
    assert ids == _stock_ids(tok, messages)
    assert [tok.decode(ids[s:e], skip_special_tokens=False) for s, e in _spans(labels)] == [" 55<|im_end|>"]
    assert tok.decode(ids[-4:-2], skip_special_tokens=False) == "assistant:"


def test_template_that_is_not_prefix_stable_as_text_is_a_data_error(tmp_path):
    """A template that numbers the turns renders no prefix of the conversation as a prefix of it."""
    template = "Turns: {{ messages|length }}\n" + QWEN_STYLE
    tok = _with_template(tmp_path, "counting", template)
    with pytest.raises(DataError, match="not prefix-stable") as err:
        tok.render_chat(CONVERSATIONS[2])
    assert err.value.reason == "template_not_prefix_stable"
    assert str(err.value) == (
        "chat template is not prefix-stable: the rendering of messages 1..2 (before message 3) is not a "
        "text prefix of the full rendering (they differ at character 7: '2\\n<|im_start|>system' vs "
        "'7\\n<|im_start|>system'); add {% generation %} markers to the template"
    )


def test_stock_ids_are_checked(tokenizers, monkeypatch):
    """Our single tokenisation of the rendered text must give apply_chat_template's ids."""
    import posttrain.data.chat as chat

    monkeypatch.setattr(chat, "render_ids", lambda hf, messages: [0])
    with pytest.raises(DataError, match="differ from apply_chat_template's at position 0") as err:
        tokenizers["no_markers"].render_chat(CONVERSATIONS[1])
    assert err.value.reason == "template_tokenisation"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "empty conversation"),
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
            "message 2: unknown role 'bot' (expected system, user or assistant)",
        ),
        (
            [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}],
            "message 1: content must be a string",
        ),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "no assistant turn"),
        ("hello", "conversation must be a list"),
    ],
)
def test_bad_conversations_name_the_reason(tokenizers, messages, reason):
    for name in ("markers", "no_markers"):
        with pytest.raises(DataError) as err:
            tokenizers[name].render_chat(messages)
        assert str(err.value).startswith(reason)


def test_empty_assistant_content_still_bears_loss_on_end_of_turn(tokenizers):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    for name in ("markers", "no_markers"):
        tok = tokenizers[name]
        ids, labels = tok.render_chat(messages)
        assert [label for label in labels if label != IGNORE] == [tok.end_of_turn_id]


def test_template_without_assistant_tokens_has_no_loss(tmp_path):
    tok = _with_template(
        tmp_path,
        "drops_assistant",
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
    )
    with pytest.raises(DataError, match="no loss-bearing tokens"):
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
