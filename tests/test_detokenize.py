"""Incremental detokenization against a full decode, and stop strings on streamed text.

Streamed text must be the text a full ``tokenizer.decode(ids, skip_special_tokens=True)``
gives, piece by piece: random token sequences (which split UTF-8 characters, mix in special
tokens and invalid bytes) over byte-level BPE, Metaspace BPE, byte-fallback BPE and
WordPiece tokenizers with the clean-up of tokenization spaces, through the Rust
``DecodeStream`` and through the generic offset window over ``tokenizer.decode``, with
special tokens skipped and kept; and the same for tokenizers loaded from disk as the server
loads them (GPT-2 byte-level BPE, a Metaspace Llama, a SentencePiece Llama 2 with byte
fallback).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import CORPUS, build_llama_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from mlflow_tfx_plugin.detokenize import IncrementalDetokenizer
from mlflow_tfx_plugin.generation import StopStringStream, cut_at_stop

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
#: Text with characters of 2, 3 and 4 UTF-8 bytes, so that tokens split them.
MULTIBYTE = [
    "Café au lait, s'il vous plaît. Crème brûlée é è ê.",
    "中文 你好 世界 中文字符 我爱中文。",
    "Emoji 🙂 🙂🙂 😀 👍🏽 ok 🙂 done.",
    "Ünïcödé mixed: naïve façade — “quotes” … 🙂中é",
]
SAMPLES = ["Hello world, é 中文 🙂!", "🙂🙂🙂", "naïve 中文。 ok", "<s> Paris </s> 中"]


def _wrap(tok: Tokenizer, **kwargs: Any) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=100_000,
        **kwargs,
    )


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE trained on multibyte text (merges inside characters)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS + MULTIBYTE * 3, trainer=trainer)
    return _wrap(tok)


def _metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece style BPE: ``▁`` for spaces, the first one dropped by the decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS + MULTIBYTE, trainer=trainer)
    return _wrap(tok)


def _byte_fallback() -> PreTrainedTokenizerFast:
    """Llama 2 style: characters outside the vocabulary become ``<0xE4>`` byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS + MULTIBYTE[:1], trainer=trainer)  # no CJK, no emoji
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return _wrap(tok)


def _wordpiece_cleanup() -> PreTrainedTokenizerFast:
    """BERT style WordPiece whose decode cleans up spaces (``"a ."`` becomes ``"a."``)."""
    words = sorted({w for line in CORPUS for w, _ in _bert_words(line)})
    chars = sorted({c for w in words for c in w} | set("'nt"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *(f"##{c}" for c in chars)]
    tokens += ["n't", "'s", "'m", "'re", "'ve", *words]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        clean_up_tokenization_spaces=True,
    )


def _bert_words(line: str) -> list[tuple[str, Any]]:
    normalized = normalizers.BertNormalizer(lowercase=True).normalize_str(line)
    return pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalized)


class DecodeOnly:
    """A tokenizer seen through ``decode`` and its token names (no Rust backend), as a
    slow tokenizer is: the generic offset window."""

    def __init__(self, tokenizer: Any) -> None:
        self.wrapped = tokenizer
        self.clean_up_tokenization_spaces = tokenizer.clean_up_tokenization_spaces
        self.clean_up_tokenization = tokenizer.clean_up_tokenization
        self.convert_tokens_to_ids = tokenizer.convert_tokens_to_ids
        self.unk_token_id = tokenizer.unk_token_id

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self.wrapped.decode(ids, **kwargs))

    def __len__(self) -> int:
        return len(self.wrapped)


BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-llama": build_llama_tokenizer,
    "byte-level": _byte_level,
    "metaspace": _metaspace,
    "byte-fallback": _byte_fallback,
    "wordpiece-cleanup": _wordpiece_cleanup,
    "byte-level-decode-only": lambda: DecodeOnly(_byte_level()),
    "byte-fallback-decode-only": lambda: DecodeOnly(_byte_fallback()),
    "wordpiece-cleanup-decode-only": lambda: DecodeOnly(_wordpiece_cleanup()),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return BUILDERS[request.param]()


def _full(tokenizer: Any, ids: list[int], skip: bool = True) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=skip))


def _stream(tokenizer: Any, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    """The pieces each push returned, and what flush returned."""
    texts = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = [texts.push(token) for token in ids]
    return pieces, texts.flush()


def _check_stream(tokenizer: Any, ids: list[int], skip: bool) -> None:
    """Every piece extends the full decode of the tokens so far, none ends inside a
    character, and the pieces with what flush returns are the full decode."""
    texts = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    sent = ""
    for count, token in enumerate(ids, start=1):
        piece = texts.push(token)
        prefix_text = _full(tokenizer, ids[:count], skip)
        assert not piece.endswith("\ufffd"), "a partial character was sent"
        sent += piece
        assert prefix_text.startswith(sent), f"{sent!r} is not the start of {prefix_text!r}"
    sent += texts.flush()
    assert sent == _full(tokenizer, ids, skip)
    assert texts.length == len(sent)


def _encode(tokenizer: Any, text: str) -> list[int]:
    target = getattr(tokenizer, "wrapped", tokenizer)  # DecodeOnly wraps one
    return list(target(text, add_special_tokens=False)["input_ids"])


def _token_lists(tokenizer: Any) -> st.SearchStrategy[list[int]]:
    """Random ids over the whole vocabulary, with extra weight on the first and last ids
    (the special tokens and, in byte-level BPE, the merged multibyte characters)."""
    size = len(tokenizer)
    ids = st.one_of(
        st.integers(0, size - 1), st.integers(0, 8), st.integers(max(size - 64, 0), size - 1)
    )
    return st.lists(ids, max_size=40)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_joined_pieces_are_the_full_decode_of_every_prefix(
    tokenizer: Any, skip: bool, data: st.DataObject
):
    _check_stream(tokenizer, data.draw(_token_lists(tokenizer)), skip)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_stream_ended_after_any_token_is_its_prefix_decoded(
    tokenizer: Any, skip: bool, data: st.DataObject
):
    ids = data.draw(_token_lists(tokenizer))
    for count in range(len(ids) + 1):
        pieces, rest = _stream(tokenizer, ids[:count], skip)
        assert "".join(pieces) + rest == _full(tokenizer, ids[:count], skip)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_a_skipped_special_token_between_byte_tokens_joins_their_bytes(skip: bool):
    tokenizer = _byte_fallback()
    byte_00, byte_80 = tokenizer.convert_tokens_to_ids(["<0x00>", "<0x80>"])
    ids = [byte_00, tokenizer.unk_token_id, byte_80]  # "\x00" alone; "\x00\x80" invalid
    pieces, rest = _stream(tokenizer, ids, skip)
    assert "".join(pieces) + rest == _full(tokenizer, ids, skip)
    assert _full(tokenizer, ids, skip) == ("\ufffd\ufffd" if skip else "\x00<unk>\ufffd")


@pytest.mark.parametrize("text", SAMPLES)
def test_encoded_text_streams_back_whole(tokenizer: Any, text: str):
    ids = _encode(tokenizer, text)
    pieces, rest = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == _full(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces) or "\ufffd" in _full(tokenizer, ids)


def test_each_token_span_covers_the_text_its_push_returned(tokenizer: Any):
    ids = _encode(tokenizer, SAMPLES[0])
    texts = IncrementalDetokenizer(tokenizer)
    pieces = [texts.push(token) for token in ids]
    assert [end - start for start, end in texts.spans] == [len(piece) for piece in pieces]
    assert all(a[1] == b[0] for a, b in zip(texts.spans, texts.spans[1:], strict=False))


def test_a_split_character_waits_for_its_last_byte():
    tokenizer = build_llama_tokenizer()  # its corpus is ASCII: "中" is three byte tokens
    ids = _encode(tokenizer, "a中")
    assert len(ids) == 4
    texts = IncrementalDetokenizer(tokenizer)
    assert [texts.push(token) for token in ids] == ["a", "", "", "中"]


def test_a_trailing_partial_character_is_sent_only_by_flush_as_the_full_decode_has_it():
    tokenizer = build_llama_tokenizer()
    ids = _encode(tokenizer, "ok 🙂")[:-1]  # the emoji's last byte never comes
    texts = IncrementalDetokenizer(tokenizer)
    assert "".join(texts.push(token) for token in ids) == "ok "
    assert texts.flush() == _full(tokenizer, ids)[len("ok ") :]
    assert _full(tokenizer, ids).endswith("\ufffd")


def test_special_tokens_decode_to_no_text():
    tokenizer = build_llama_tokenizer()
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<|im_start|>")]
    hello, paris = _encode(tokenizer, "Hello"), _encode(tokenizer, " Paris")
    ids = [specials[0], *hello, specials[2], *paris, specials[1]]
    pieces, rest = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == "Hello Paris"


def test_the_space_clean_up_applies_across_tokens_without_sending_a_removed_space():
    tokenizer = _wordpiece_cleanup()
    ids = _encode(tokenizer, "hello , world . is n't it ? yes !")
    pieces, rest = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == "hello, world. isn't it? yes!"
    assert _full(tokenizer, ids) == "hello, world. isn't it? yes!"


def test_a_bpe_fast_tokenizer_keeps_its_spaces_as_transformers_does():
    tokenizer = _byte_level()
    tokenizer.clean_up_tokenization_spaces = True  # transformers 5 ignores it for BPE
    ids = _encode(tokenizer, "a . b ,")
    pieces, rest = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == _full(tokenizer, ids) == "a . b ,"


class Shuffling:
    """A decoder whose text of a sequence is not its text of a shorter one extended: the
    window cannot follow it, so the detokenizer decodes everything from then on."""

    clean_up_tokenization_spaces = False

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        words = [str(token) for token in ids]
        if len(ids) >= 3:  # from the third token on, the first two swap places
            words[0], words[1] = words[1], words[0]
        return " ".join(words)


def test_a_decoder_the_window_cannot_follow_falls_back_to_full_decodes(
    caplog: pytest.LogCaptureFixture,
):
    texts = IncrementalDetokenizer(Shuffling())
    pieces = [texts.push(token) for token in (1, 2, 3, 4)]
    assert pieces[:2] == ["1", " 2"]
    assert texts.flush() == ""  # what was sent cannot be taken back ...
    assert "differs from the full decode" in caplog.text  # ... and says so


# -- differential: tokenizers as the server loads them --------------------------------------


def _sentencepiece_llama(dest: Path) -> Any:
    """A Llama 2 style tokenizer from a trained SentencePiece model with byte fallback
    (its ASCII corpus leaves accents, CJK and emoji to ``<0xNN>`` tokens), loaded the
    way transformers loads ``tokenizer.model``."""
    import sentencepiece
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (dest / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(str(dest))


@pytest.fixture(
    scope="module",
    params=[
        "gpt2-byte-level",
        "llama-metaspace",
        "llama2-sentencepiece",
        "llama2-sentencepiece-decode-only",
    ],
)
def loaded_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    name = request.param
    if name.startswith("llama2-sentencepiece"):
        tokenizer = _sentencepiece_llama(tmp_path_factory.mktemp("sentencepiece"))
        return DecodeOnly(tokenizer) if name.endswith("decode-only") else tokenizer
    fixture = {"gpt2-byte-level": "tiny_gpt2_dir", "llama-metaspace": "tiny_llama_sp_dir"}[name]
    return AutoTokenizer.from_pretrained(str(request.getfixturevalue(fixture)))


def _multibyte_sequences(tokenizer: Any) -> st.SearchStrategy[list[int]]:
    """Random sequences of chunks: a random id (any, or a special one), or a slice of the
    tokens of multibyte text, which may start or end inside a character."""
    encoded = [_encode(tokenizer, text) for text in MULTIBYTE + SAMPLES]
    assert any(len(ids) > len(text) for ids, text in zip(encoded, MULTIBYTE, strict=False))
    specials = sorted(set(getattr(tokenizer, "wrapped", tokenizer).all_special_ids))

    @st.composite
    def text_slice(draw: st.DrawFn) -> list[int]:
        ids = draw(st.sampled_from(encoded))
        start = draw(st.integers(0, len(ids)))
        return ids[start : draw(st.integers(start, len(ids)))]

    chunk = st.one_of(
        text_slice(),
        st.integers(0, len(tokenizer) - 1).map(lambda i: [i]),
        st.sampled_from(specials).map(lambda i: [i]),
    )
    return st.lists(chunk, max_size=8).map(lambda chunks: [i for c in chunks for i in c])


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_streamed_text_is_the_full_decode_for_loaded_tokenizers(
    loaded_tokenizer: Any, skip: bool, data: st.DataObject
):
    _check_stream(loaded_tokenizer, data.draw(_multibyte_sequences(loaded_tokenizer)), skip)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_loaded_tokenizers_stream_multibyte_text_back_whole(loaded_tokenizer: Any, text: str):
    ids = _encode(loaded_tokenizer, text)
    pieces, rest = _stream(loaded_tokenizer, ids)
    assert "".join(pieces) + rest == _full(loaded_tokenizer, ids)
    assert "\ufffd" not in "".join(pieces) + rest
    if loaded_tokenizer.unk_token_id not in ids:  # the Metaspace one lacks emoji and CJK
        assert "".join(pieces) + rest == text


# -- stop strings on streamed text ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="abc ", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=2),
)
def test_stop_string_stream_sends_the_text_cut_at_the_first_stop(
    pieces: list[str], stops: list[str]
):
    stream = StopStringStream(stops)
    fed, sent, sent_so_far = "", "", []
    for piece in pieces:
        fed += piece
        sent += stream.push(piece)
        sent_so_far.append(sent)
        assert stream.sent == len(sent)
        assert stream.stopped == cut_at_stop(fed, stops)[1], "stops at the first stop reached"
        if stream.stopped:  # generation ends there: no text follows a stop string
            break
    sent += stream.finish()
    expected, _ = cut_at_stop(fed, stops)
    assert sent == expected
    assert all(expected.startswith(early) for early in sent_so_far), "sent too early"


def test_a_stop_string_reached_ends_the_text_though_a_longer_one_began_earlier():
    # The text ends at the first stop string it reaches (generation stops there), so an
    # "aba" that began earlier never completes; had both completed at once, the one that
    # starts first would win.
    stream = StopStringStream(["b", "aba"])
    assert stream.push("ab") == "a"
    assert stream.stopped
    assert stream.push("a") == stream.finish() == ""
    together = StopStringStream(["b", "aba"])
    assert together.push("aba") + together.finish() == ""


def test_a_held_back_start_of_a_stop_string_is_sent_once_ruled_out():
    stream = StopStringStream(["aba"])
    assert stream.push("xab") == "x"
    assert stream.push("c") == "abc"
    assert not stream.stopped


def test_stop_string_stream_holds_back_a_tail_that_may_become_a_stop():
    stream = StopStringStream(["END"])
    assert stream.push("abcE") == "abc"
    assert stream.push("N") == ""
    assert stream.push("x") == "ENx"
    assert stream.push("yEN") == "y"
    assert stream.push("D and more") == ""
    assert stream.stopped and stream.sent == len("abcENxy")
