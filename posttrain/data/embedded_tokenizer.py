"""The project's own small tokenizer, so demos and tests run offline with no downloaded model.

A byte-level BPE (any text encodes, nothing maps to <unk>) trained deterministically with the
`tokenizers` library on renderings of the synthetic tasks plus templated English-ish sentences, so it
is small but not absurdly task-specific. It is saved as a standard `transformers` tokenizer directory
with a ChatML template whose `{% generation %}` markers let `apply_chat_template` return the assistant
loss mask directly. The files are committed under `posttrain/assets/tokenizer`; this module rebuilds
them (`python -m posttrain.data.embedded_tokenizer OUT_DIR`) and a test checks they still match.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from posttrain.data.synthetic import SYSTEM_PROMPT, TASKS, generate_problems, to_text
from posttrain.errors import ModelError

EMBEDDED_DIR = Path(__file__).parent.parent / "assets" / "tokenizer"

VOCAB_SIZE = 1024
# <|endoftext|> separates pretraining documents; <|im_start|>/<|im_end|> frame chat turns and
# <|im_end|> is the eos, so generation stops at the end of an assistant turn; <|pad|> only pads.
ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

# ChatML. The generation markers wrap each assistant content plus its <|im_end|> (what the model must
# learn to emit); the newline after <|im_end|> is outside, as the model never has to produce it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = [
    "The model",
    "A student",
    "The teacher",
    "Our team",
    "The small robot",
    "Every reader",
    "The old library",
    "A careful engineer",
    "The river",
    "My friend",
]
_VERBS = ["reads", "writes", "counts", "finds", "learns", "checks", "builds", "answers", "sorts", "keeps"]
_OBJECTS = [
    "the numbers",
    "a short story",
    "every letter",
    "the first question",
    "a list of words",
    "the correct result",
    "three green apples",
    "the evening news",
    "a simple plan",
    "the data",
]
_ENDINGS = [
    "today.",
    "before lunch.",
    "with great care.",
    "in the morning.",
    "again and again.",
    "without any help.",
    "for the next test.",
    "at the end of the day.",
]


def _english_lines() -> list[str]:
    """A few hundred templated sentences, so common English words get their own merges."""
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS)
    # A fixed stride through the product keeps variety without randomness.
    return [f"{s} {v} {o} {_ENDINGS[i % len(_ENDINGS)]}" for i, (s, v, o) in enumerate(combos) if i % 3 == 0]


def _chatml(messages: list[tuple[str, str]]) -> str:
    """The text CHAT_TEMPLATE renders, written out here so corpus building needs no tokenizer."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def build_corpus() -> list[str]:
    """The training corpus: task text, chat renderings and generic sentences, in a fixed order."""
    problems = generate_problems("train", 3000, seed=1234, tasks=TASKS)
    lines = [to_text(p) for p in problems]
    lines += [
        _chatml([("system", SYSTEM_PROMPT), ("user", p.prompt), ("assistant", p.answer)])
        for p in problems[:1500]
    ]
    lines += _english_lines()
    lines += [ENDOFTEXT.join(lines[i : i + 2]) for i in range(0, 200, 2)]
    return lines


def train_embedded_tokenizer(out_dir: Path) -> Path:
    """Train the byte-level BPE on `build_corpus()` and save it as a transformers tokenizer directory."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(build_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[ENDOFTEXT, IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return out


def embedded_tokenizer_dir() -> Path:
    """The committed tokenizer directory; a missing one means a broken install, not a user mistake."""
    if not (EMBEDDED_DIR / "tokenizer.json").is_file():
        raise ModelError(
            f"embedded tokenizer missing at {EMBEDDED_DIR}; rebuild it with "
            f"`python -m posttrain.data.embedded_tokenizer {EMBEDDED_DIR}`"
        )
    return EMBEDDED_DIR


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m posttrain.data.embedded_tokenizer OUT_DIR")
    print(train_embedded_tokenizer(Path(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
