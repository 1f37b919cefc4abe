"""The tokenizer wrapper: pad/eos/separator ids, vocab padding, special tokens, text and prompt labels."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from posttrain.data.embedded_tokenizer import embedded_tokenizer_dir
from posttrain.data.labels import IGNORE
from posttrain.data.tokenizer import Tokenizer
from posttrain.errors import ModelError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir("builtin")


def _hf_without_endoftext(eos: str | None) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE with no pad and no <|endoftext|>, optionally with an eos."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["hello world"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos)


def test_builtin_ids(tok):
    vocab = tok.hf.get_vocab()
    assert tok.eos_id == vocab["<|im_end|>"] == tok.end_of_turn_id
    assert tok.pad_id == vocab["<|pad|>"]
    assert tok.doc_sep_id == vocab["<|endoftext|>"]
    assert tok.bos_id is None
    assert len({tok.eos_id, tok.pad_id, tok.doc_sep_id}) == 3


def test_pad_token_set_when_missing():
    hf = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    hf.pad_token = None
    assert hf.pad_token_id is None
    t = Tokenizer(hf)
    assert t.pad_id == hf.get_vocab()["<|endoftext|>"]  # reuses the document end, no new row
    assert t.vocab_size == len(hf)


def test_pad_falls_back_to_eos_without_endoftext():
    hf = _hf_without_endoftext(eos="</s>")
    n = len(hf)
    t = Tokenizer(hf)
    assert t.pad_id == t.eos_id == t.end_of_turn_id == t.doc_sep_id == hf.get_vocab()["</s>"]
    assert t.vocab_size == n


def test_missing_eos_is_a_model_error():
    with pytest.raises(ModelError, match="no eos token"):
        Tokenizer(_hf_without_endoftext(eos=None))


def test_padded_vocab_size(tok):
    assert tok.vocab_size == len(tok.hf)
    for multiple in (1, 8, 64, 128):
        padded = tok.padded_vocab_size(multiple)
        assert padded % multiple == 0 and tok.vocab_size <= padded < tok.vocab_size + multiple
    assert tok.padded_vocab_size() == 896  # 843 ids rounded up to 64
    assert tok.padded_vocab_size(1) == tok.vocab_size


def test_extra_special_tokens_are_single_ids():
    t = Tokenizer.from_dir("builtin", extra_special_tokens=["<|tool|>", "<think>"])
    base = Tokenizer.from_dir("builtin")
    assert t.vocab_size == base.vocab_size + 2
    tool, think = t.encode("<|tool|>"), t.encode("<think>")
    assert len(tool) == 1 and len(think) == 1 and tool != think
    assert tool[0] >= base.vocab_size
    ids = t.encode("a<think>b")
    assert think[0] in ids
    assert t.decode(ids) == "ab"  # specials are skipped when decoding
    # The tokenizer's own extra specials survive the addition.
    assert t.encode("<|endoftext|>") == [t.doc_sep_id]


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as err:
        Tokenizer.from_dir(missing)
    assert str(err.value) == f"tokenizer path not found: {missing}"


def test_encode_decode_roundtrip(tok):
    text = "Sort: 5 2 9 and The quick brown fox! 123"
    ids = tok.encode(text)
    assert ids == list(tok.hf(text, add_special_tokens=False)["input_ids"])
    assert tok.decode(ids) == text


def test_render_text_labels_every_token_and_ends_with_separator(tok):
    ids, labels = tok.render_text("What is 47 + 8? Answer: 55")
    assert labels == ids
    assert ids[-1] == tok.doc_sep_id
    assert ids[:-1] == tok.encode("What is 47 + 8? Answer: 55")
    ids, labels = tok.render_text("hi", add_eos=False)
    assert ids == labels == tok.encode("hi")


def test_prompt_completion_masks_only_completion_and_eos(tok):
    ids, labels = tok.render_prompt_completion("What is 47 + 8? Answer:", " 55")
    n_prompt = len(tok.encode("What is 47 + 8? Answer:"))
    completion = tok.encode(" 55")
    assert len(ids) == len(labels) == n_prompt + len(completion) + 1
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == completion + [tok.eos_id]


def test_render_prompt_drops_the_answer_and_adds_generation_prompt(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort: 5 2 9"},
        {"role": "assistant", "content": "2 5 9"},
    ]
    ids = tok.render_prompt(messages)
    expected = tok.hf.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    assert ids == list(expected)
    assert tok.decode(ids, skip_special_tokens=False).endswith(
        "Sort: 5 2 9<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.render_prompt(messages[:2]) == ids


def test_save_roundtrip_keeps_added_tokens(tmp_path: Path):
    t = Tokenizer.from_dir("builtin", extra_special_tokens=["<think>"])
    t.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.vocab_size == t.vocab_size
    assert again.encode("<think>") == t.encode("<think>")
    assert (again.pad_id, again.eos_id, again.end_of_turn_id) == (t.pad_id, t.eos_id, t.end_of_turn_id)


def test_every_known_end_of_turn_token_closes_a_turn():
    """Llama 3's <|eot_id|>, Gemma's <end_of_turn>, gpt-oss's <|end|>/<|return|> end turns too; the
    ChatML <|im_end|>, when present, stays the preferred one."""
    from posttrain.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir("builtin", extra_special_tokens=["<end_of_turn>", "<|return|>"])
    vocab = tok.hf.get_vocab()
    assert tok.end_of_turn_id == vocab["<|im_end|>"]
    assert tok.end_of_turn_ids == (vocab["<|im_end|>"], vocab["<end_of_turn>"], vocab["<|return|>"])
