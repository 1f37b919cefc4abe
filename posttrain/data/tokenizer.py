"""A thin wrapper around a Hugging Face tokenizer, the single source of truth for token ids.

We never tokenise on our own: text goes through `hf.encode` and chats through the model's chat
template (see `posttrain.data.chat`), so what we train on is what `transformers` and vLLM feed the
model at inference. The wrapper only adds what training needs and HF leaves implicit: a guaranteed
pad id, the id that ends an assistant turn, the document separator for pretraining, a vocabulary
size padded for efficient embeddings, and (input_ids, labels) pairs with IGNORE where no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.data.chat import MaskPolicy, assistant_labels, render_ids, validate_messages
from posttrain.data.labels import IGNORE
from posttrain.errors import ModelError

BUILTIN = "builtin"
# Tokens that end a chat turn, in order of preference: ChatML (Qwen, SmolLM), Llama 3, Gemma, Phi-3 and
# gpt-oss (<|end|> closes earlier turns, <|return|> the final answer). The first one in the vocabulary is
# `end_of_turn_id`; all of them close an answer's loss span; without any, the eos ends a turn.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|return|>")
ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer:
    """Training-side view of an HF tokenizer; `hf` stays available for anything not covered here."""

    def __init__(self, hf_tokenizer: Any, extra_special_tokens: Sequence[str] = ()) -> None:
        self.hf = hf_tokenizer
        if extra_special_tokens:
            # Extend rather than replace, so the tokenizer's own extra specials stay special.
            self.hf.add_special_tokens(
                {"extra_special_tokens": list(extra_special_tokens)}, replace_extra_special_tokens=False
            )
        if self.hf.eos_token_id is None:
            raise ModelError(f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r} has no eos token")
        if self.hf.pad_token_id is None:
            self._set_pad_token()
        self.pad_id: int = self.hf.pad_token_id
        self.eos_id: int = self.hf.eos_token_id
        self.bos_id: int | None = self.hf.bos_token_id
        vocab = self.hf.get_vocab()
        self.end_of_turn_ids: tuple[int, ...] = tuple(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab) or (
            self.eos_id,
        )
        self.end_of_turn_id: int = self.end_of_turn_ids[0]
        # Pretraining documents are separated by <|endoftext|> where the vocabulary has one.
        self.doc_sep_id: int = self._token_id(ENDOFTEXT_TOKEN, default=self.eos_id)

    @classmethod
    def from_dir(cls, path: str | Path, extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
        """Load a local tokenizer directory; "builtin" is the project's embedded tokenizer."""
        from transformers import AutoTokenizer

        if str(path) == BUILTIN:
            from posttrain.data.embedded_tokenizer import embedded_tokenizer_dir

            path = embedded_tokenizer_dir()
        if not Path(path).exists():
            raise ModelError(f"tokenizer path not found: {path}")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load tokenizer from {path}: {first_line}") from e
        return cls(hf, extra_special_tokens)

    def _token_id(self, token: str, default: int) -> int:
        return self.hf.get_vocab().get(token, default)

    def _set_pad_token(self) -> None:
        """Reuse an existing document-end token for padding (no new embedding row); else add one."""
        vocab = self.hf.get_vocab()
        if ENDOFTEXT_TOKEN in vocab:
            self.hf.pad_token = ENDOFTEXT_TOKEN
        else:
            self.hf.pad_token = self.hf.eos_token
        if self.hf.pad_token_id is None:
            self.hf.add_special_tokens({"pad_token": PAD_TOKEN})

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added tokens included (len(hf), not hf.vocab_size)."""
        return len(self.hf)

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """vocab_size rounded up to `multiple`, the embedding size that keeps matmuls aligned."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict], mask: MaskPolicy = "all_assistant"
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation; ids equal the stock chat template rendering."""
        return assistant_labels(self.hf, messages, self.end_of_turn_ids, mask)

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Ids to generate from: the conversation without a final assistant answer, plus the
        generation prompt. A trailing assistant message (an eval row's reference) is dropped."""
        messages = validate_messages(messages, require_assistant=False)
        if messages[-1]["role"] == "assistant":
            messages = validate_messages(messages[:-1], require_assistant=False)
        return render_ids(self.hf, messages, add_generation_prompt=True)

    def render_text(self, text: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
        """Pretraining document: every token is a label; the separator teaches where documents end."""
        ids = ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)
        if add_eos:
            ids.append(self.doc_sep_id)
        return ids, list(ids)

    def render_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Plain (non-chat) pair: loss on the completion tokens and the closing eos only.

        Prompt and completion are encoded separately so the boundary never merges into one token.
        """
        prompt_ids = ([self.bos_id] if self.bos_id is not None else []) + self.encode(prompt)
        completion_ids = self.encode(completion) + [self.eos_id]
        return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids

    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer (with any added pad/special tokens) next to a checkpoint."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out))
        return out


def token_strings(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own, specials kept; for error messages and debugging."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


__all__ = ["Tokenizer", "IGNORE", "BUILTIN", "token_strings"]
