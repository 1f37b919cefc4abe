"""Masks from plain chat templates against an oracle: TRL's `{% generation %}` training templates.

For every pair X.jinja / X_training.jinja shipped with TRL, the SmolLM2 tokenizer (a real byte-level
BPE) is given the template, with the template's special tokens added so they stay single tokens as in
the real vocabulary. Our mask from the PLAIN template (prefix diffing) must equal the mask the TRAINING
template's markers give through transformers' stock `return_assistant_tokens_mask`, on the same ids.

Where a training template deliberately marks more than the answer, the oracle is normalised, and
only then: TRL's blocks end with the template glue after the end-of-turn token (a newline; phi3's
also the final eos), which the model never generates (generation stops at the end-of-turn token), and
some start with text the generation prompt already supplies (qwen2_5's newline, gpt-oss's
`<|start|>assistant`, DeepSeek's `<｜Assistant｜>`, the `<think>` that Nemotron and Qwen3.5/3.6/3.8
prompts prefill, or the whole empty reasoning block of qwen3_5_nothink's prompt). Families that
need neither are compared raw. Templates that re-render history differently (Qwen3: the training
variant keeps every reasoning block; GLM: it closes the last answer with `<|user|>`) are compared on
the conversations where both templates render the same ids, and Qwen3's multi-turn masks against the
plain qwen3 template with TRL's markers inserted (the mask of the final rendering). One slip of the
oracle itself is undone everywhere: transformers maps a block's last character to the first token
holding it, so a block ending in an emoji split over byte tokens loses the later pieces.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from posttrain.data.chat import assistant_labels
from posttrain.data.labels import IGNORE
from posttrain.data.packing import collate
from posttrain.data.samples import Sample
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import DataError, ModelError

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"
PAIRS = sorted(
    p.name.removesuffix("_training.jinja")
    for p in TEMPLATES.glob("*_training.jinja")
    if (TEMPLATES / p.name.replace("_training", "")).exists()
)
# Multimodal templates that only accept content as a list of blocks (our messages carry strings).
MULTIMODAL = {"llava_next": "content blocks", "smolvlm": "content blocks"}
# The token that closes an answer, where it is not ChatML's <|im_end|>.
END_OF_TURN = {
    "cohere": ["<|END_OF_TURN_TOKEN|>"],
    "cohere2": ["<|END_OF_TURN_TOKEN|>"],
    "deepseek_r1_distill": ["<｜end▁of▁sentence｜>"],
    "deepseekv3": ["<｜end▁of▁sentence｜>"],
    "diffusion_gemma": ["<turn|>"],
    "gemma": ["<end_of_turn>"],
    "gemma3": ["<end_of_turn>"],
    "glm4moe": ["<|user|>"],  # GLM closes an answer with the next role's token; the plain template has none
    "gptoss": ["<|return|>", "<|end|>"],  # <|end|> in the history, <|return|> after the final answer
    "llama3": ["<|eot_id|>"],
    "muse_glimmer": ["<|eot|>"],
    "phi3": ["<|end|>"],
    "phi3_5": ["<|end|>"],
}
# Text at the start of TRL's block that the generation prompt already supplies (see the docstring).
PROMPT_IN_BLOCK = {
    "qwen2_5": "\n",
    "gptoss": "<|start|>assistant",
    "muse_glimmer": "<|start|>assistant",
    "deepseekv3": "<｜Assistant｜>",
    "deepseek_r1_distill": "<｜Assistant｜>",
    "nemotron_3_5_lightning": "<think>",
    "nemotron_3_nano": "<think>",
    "nemotron_3_super": "<think>",
    "nemotron_3_ultra": "<think>",
    "qwen3_5_nothink": "<think>\n\n</think>\n\n",
    "qwen3_5_think": "<think>\n",
    "qwen3_6": "<think>\n",
    "qwen3_8": "<think>\n",
}
# Training templates whose marks are exactly ours, no normalisation.
EXACT = {"cohere", "cohere2", "idefics3", "llama3"}
# Training templates that render the history differently from the plain ones: compared on
# single-answer conversations, where the renderings agree.
REWRITES_HISTORY = {"qwen3", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6", "glm4moe"}
SPECIAL = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜]+｜>|<(?:start|end)_of_turn>|<\|turn>|<turn\|>")

CONVERSATIONS = {
    "no_system": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ],
    "whitespace": [
        {"role": "user", "content": "Indent it"},
        {"role": "assistant", "content": "  leading spaces"},
        {"role": "user", "content": "trailing?"},
        {"role": "assistant", "content": "trailing spaces   \n\n"},
        {"role": "user", "content": "newlines?"},
        {"role": "assistant", "content": "\n\nnewlines first"},
    ],
    "unicode": [
        {"role": "user", "content": "Say hi in Chinese 🙂"},
        {"role": "assistant", "content": "你好，世界。👍🏽 ✅"},
        {"role": "user", "content": "Café?"},
        {"role": "assistant", "content": " Ça va — naïve résumé 😀"},
    ],
    "emptyish": [
        {"role": "user", "content": "Say nothing"},
        {"role": "assistant", "content": " "},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "."},
    ],
    "four_turns": [
        {"role": "system", "content": "Count."},
        *[
            m
            for k in range(1, 5)
            for m in (
                {"role": "user", "content": f"Next after {k - 1}?"},
                {"role": "assistant", "content": f"{k}"},
            )
        ],
    ],
}
# Qwen3 with reasoning in earlier answers: the plain template drops it from the history.
REASONING = [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": "<think>\n6*7 = 42.\n</think>\n\n42"},
    {"role": "user", "content": "  And 6*8?"},
    {"role": "assistant", "content": "<think>\nAdd 6 to 42.\n</think>\n\n 48"},
]

# SmolLM2's own template, with TRL-style markers around each answer and its <|im_end|> (no glue).
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's HF tokenizer, loaded once (seconds); tests work on deep copies."""
    from posttrain.models.gguf import cached_import, smollm2_gguf

    try:
        path = Path(cached_import(smollm2_gguf()))
    except ModelError as err:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer(base, *templates: str):
    """SmolLM2's tokenizer knowing the templates' special tokens (and <think> as Qwen's vocab has it)."""
    hf = copy.deepcopy(base)
    specials = sorted({t for tpl in templates for t in SPECIAL.findall(tpl)} - set(hf.get_vocab()))
    hf.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=False)
    if any("<think>" in tpl for tpl in templates):
        hf.add_tokens(["<think>", "</think>"])
    return hf


def _oracle(hf, template: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    hf.chat_template = template
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _ours(hf, template: str, messages: list[dict], end_of_turn: list[str]) -> tuple[list[int], list[int]]:
    hf.chat_template = template
    ids, labels = assistant_labels(hf, messages, hf.convert_tokens_to_ids(end_of_turn))
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids))
    return ids, [int(label != IGNORE) for label in labels]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for k, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = k
        elif not bit and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _byte_pieces_fixed(hf, messages: list[dict], mask: list[int]) -> list[int]:
    """The oracle with a transformers slip undone: it maps a block's last character to the FIRST
    token holding it, so a block ending in a character split over byte tokens (an emoji) loses the
    later pieces. Tokens holding the same character as a labelled token are labelled here."""
    text = hf.apply_chat_template(messages, tokenize=False)
    offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = list(mask)
    for k in range(1, len(out)):
        if out[k - 1] and not out[k] and offsets[k][0] < offsets[k - 1][1]:  # shares a character
            out[k] = 1
    return out


def _normalise(hf, ids: list[int], mask: list[int], end_of_turn: list[str], prompt_text: str) -> list[int]:
    """The oracle without glue after the end-of-turn token and without whole leading tokens that
    spell (part of) `prompt_text`; a token that merges prompt text with the answer stays."""
    eot_ids = set(hf.convert_tokens_to_ids(end_of_turn))
    out = [0] * len(mask)
    for start, end in _runs(mask):
        rest = prompt_text  # what of the prompt text the run's leading tokens have not spelled yet
        while start < end:
            head = hf.decode(ids[start : start + 1], skip_special_tokens=False)
            if not head or not rest.startswith(head):
                break
            rest, start = rest[len(head) :], start + 1
        stop = next((k + 1 for k in range(start, end) if ids[k] in eot_ids), end)
        out[start:stop] = [1] * (stop - start)
    return out


def _describe(hf, ids: list[int], mask: list[int]) -> list[str]:
    return [hf.decode(ids[s:e], skip_special_tokens=False) for s, e in _runs(mask)]


def test_trl_ships_the_families_we_compare():
    assert {"cohere", "deepseekv3", "gemma", "gemma3", "gptoss", "llama3", "phi3", "qwen2_5", "qwen3"} <= set(
        PAIRS
    )
    assert len(PAIRS) >= 31  # TRL 1.16; a new pair is compared automatically


@pytest.mark.parametrize("name", PAIRS)
def test_plain_template_masks_equal_trl_training_markers(smollm2, name):
    if name in MULTIMODAL:
        pytest.skip(f"{name}: multimodal template, needs {MULTIMODAL[name]}")
    plain = (TEMPLATES / f"{name}.jinja").read_text()
    training = (TEMPLATES / f"{name}_training.jinja").read_text()
    hf = _tokenizer(smollm2, plain, training)
    end_of_turn = END_OF_TURN.get(name, ["<|im_end|>"])
    compared = 0
    for conv_name, conversation in CONVERSATIONS.items():
        if name == "gemma" and conversation[0]["role"] == "system":
            continue  # Gemma 1/2 templates raise on a system message, training variant included
        conversations = [conversation]
        if name in REWRITES_HISTORY:
            # The first exchange: there is no earlier answer to re-render.
            first_answer = next(k for k, m in enumerate(conversation) if m["role"] == "assistant")
            conversations = [conversation[: first_answer + 1]]
        for messages in conversations:
            oracle_ids, oracle_mask = _oracle(hf, training, messages)
            ids, mask = _ours(hf, plain, messages, end_of_turn)
            if name == "glm4moe":
                # The training variant appends <|user|> after the final answer; the plain one does not.
                assert oracle_ids[: len(ids)] == ids and len(oracle_ids) == len(ids) + 1
                oracle_ids, oracle_mask = oracle_ids[:-1], oracle_mask[:-1]
            assert ids == oracle_ids, f"{name}/{conv_name}: ids differ"
            oracle_mask = _byte_pieces_fixed(hf, messages, oracle_mask)
            if name not in EXACT:
                oracle_mask = _normalise(hf, ids, oracle_mask, end_of_turn, PROMPT_IN_BLOCK.get(name, ""))
            assert mask == oracle_mask, (
                f"{name}/{conv_name}: ours {_describe(hf, ids, mask)} != TRL {_describe(hf, ids, oracle_mask)}"
            )
            assert len(_runs(mask)) == sum(m["role"] == "assistant" for m in messages)
            compared += 1
    assert compared >= 1


def _qwen3_marked() -> str:
    """The plain qwen3 template with TRL's markers around each assistant message (header included, as
    qwen3_training.jinja has it), but without the training variant's change to keep every reasoning
    block: its masks are those of the final rendering the plain template produces."""
    plain = (TEMPLATES / "qwen3.jinja").read_text()
    opening, closing = '{%- elif message.role == "assistant" %}', '{%- elif message.role == "tool" %}'
    assert plain.count(opening) == 1 and plain.count(closing) == 1
    return plain.replace(opening, opening + "{%- generation %}").replace(
        closing, "{%- endgeneration %}" + closing
    )


@pytest.mark.parametrize("messages", [REASONING, CONVERSATIONS["whitespace"], CONVERSATIONS["unicode"]])
def test_qwen3_masks_follow_the_final_rendering(smollm2, messages):
    plain = (TEMPLATES / "qwen3.jinja").read_text()
    marked = _qwen3_marked()
    hf = _tokenizer(smollm2, plain)
    ids, mask = _ours(hf, plain, messages, ["<|im_end|>"])
    oracle_ids, oracle_mask = _oracle(hf, marked, messages)
    assert ids == oracle_ids
    oracle_mask = _normalise(
        hf, ids, _byte_pieces_fixed(hf, messages, oracle_mask), ["<|im_end|>"], "<|im_start|>assistant\n"
    )
    assert mask == oracle_mask
    if messages is REASONING:
        # The earlier answer's reasoning is gone from the full rendering (so no growing prefix of the
        # conversation renders it as it ends up), the last answer keeps it.
        assert _describe(hf, ids, mask) == [
            "42<|im_end|>",
            "<think>\nAdd 6 to 42.\n</think>\n\n 48<|im_end|>",
        ]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_own_template(smollm2, name):
    """The real tokenizer as shipped: default system prompt injected, pad == eos == <|im_end|>."""
    tok = Tokenizer(copy.deepcopy(smollm2))
    messages = CONVERSATIONS[name]
    assert tok.pad_id == tok.eos_id == tok.end_of_turn_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    ids, labels = tok.render_chat(messages)
    oracle_ids, oracle_mask = _oracle(_tokenizer(smollm2), SMOLLM2_MARKED, messages)
    assert ids == oracle_ids == list(tok.hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert [int(label != IGNORE) for label in labels] == _byte_pieces_fixed(tok.hf, messages, oracle_mask)
    if messages[0]["role"] != "system":
        assert tok.decode(ids[:20], skip_special_tokens=False).startswith(
            "<|im_start|>system\nYou are a helpful AI"
        )
    # Every answer's end of turn is a label although it is also the pad id; collation keeps it as the
    # target of the position before it, so the model learns to stop.
    answers = sum(m["role"] == "assistant" for m in messages)
    eot_positions = [k for k, label in enumerate(labels) if label == tok.pad_id]
    assert len(eot_positions) == answers
    targets = collate([[Sample(ids, labels)]], tok.pad_id)["targets"][0].tolist()
    assert [targets[k - 1] for k in eot_positions] == [tok.pad_id] * answers


def test_smollm2_answers_with_leading_spaces_are_masked_not_refused(smollm2):
    """SmolLM2's pre-tokenizer merges the prompt's last newline with an answer's leading spaces, so
    growing token prefixes are not prefixes: the old token diff refused these; the straddling token
    is labelled (as TRL's markers label it) and the answer is complete."""
    tok = Tokenizer(copy.deepcopy(smollm2))
    ids, labels = tok.render_chat(CONVERSATIONS["whitespace"])
    spans = [
        tok.decode(ids[s:e], skip_special_tokens=False) for s, e in _runs([int(x != IGNORE) for x in labels])
    ]
    assert spans == [
        "\n  leading spaces<|im_end|>",
        "trailing spaces   \n\n<|im_end|>",
        "\n\n\nnewlines first<|im_end|>",
    ]
    first = labels.index(next(x for x in labels if x != IGNORE))
    assert tok.decode(ids[first : first + 1], skip_special_tokens=False) == "\n "  # prompt "\n" + answer " "
    assert tok.decode(ids[first - 2 : first], skip_special_tokens=False) == "assistant"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # Numbers the messages in a header: no shorter rendering is a prefix of the full one.
        (
            "{{ messages|length }} messages\n{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            "not prefix-stable: the rendering of messages 1..1 (before message 2) is not a text prefix",
        ),
        # Rewrites earlier answers (upper case) and closes turns with no end-of-turn token.
        (
            "{% for m in messages %}{{ m.role }}: {{ m.content|upper if m.role == 'assistant' and not loop.last else m.content }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            "cannot mask message 2: the chat template renders it differently once later messages follow",
        ),
    ],
)
def test_unmaskable_templates_are_data_errors(smollm2, template, message):
    hf = _tokenizer(smollm2)
    hf.chat_template = template
    conversation = CONVERSATIONS["system"][1:]
    with pytest.raises(DataError, match=re.escape(message)) as err:
        assistant_labels(hf, conversation, hf.convert_tokens_to_ids("<|im_end|>"))
    assert err.value.reason == "template_not_prefix_stable"
    assert "add {% generation %} markers" in str(err.value)
