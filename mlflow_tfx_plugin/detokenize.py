"""Incremental detokenization: the text each generated token adds, at a cost per token that
does not grow with the text.

Decoding every token so far at each step makes a stream quadratic (8,000 tokens of a tiny
model took 22 s, the last tokens three times as long as the first). A window is decoded
instead: the tokens since the last text handed out, after the chunk before them as context
(vLLM's prefix and read offsets; ``tokenizers``' ``DecodeStream`` does the same in Rust for a
fast tokenizer). Text that ends in U+FFFD may end inside a character, so it is held back
until the character is complete. :meth:`IncrementalDetokenizer.flush` decodes all tokens
once and hands out what the window did not, so the pieces join to exactly
``tokenizer.decode(ids, skip_special_tokens=...)``.

Byte-fallback tokens (``<0xE4>``, as in Llama 2) are held back until a token of another
kind follows: a run of them decodes as a whole, all to U+FFFD if its bytes are not valid
UTF-8 together, so text sent from part of a run could still change. A special token that
the decode skips does not end a run: it is removed before the decoder sees the tokens, so
the bytes on either side of it join.

A tokenizer that cleans up tokenization spaces (``" ."`` becomes ``"."``) has raw text
decoded in the window and cleaned as it streams (:class:`_SpaceCleanup`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

_logger = logging.getLogger(__name__)

#: What a decoder makes of bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT = "\ufffd"
#: The clean-up's longest pattern (" n't", " 've", " 're"): each deletes a space before at
#: most three characters.
_CLEANUP_REACH = 4


class IncrementalDetokenizer:
    """The text each new token adds to a sequence's decoded text.

    Args:
        tokenizer: the model's tokenizer.
        skip_special_tokens: whether special tokens decode to no text, as in
            ``tokenizer.decode(ids, skip_special_tokens=...)``.

    Attributes:
        ids: the tokens pushed so far.
        spans: per token, the (start, end) character offsets of the text its push returned.
        length: how many characters have been returned.

    Example:
        >>> detok = IncrementalDetokenizer(tokenizer)
        >>> text = "".join(detok.push(token) for token in ids) + detok.flush()
        >>> text == tokenizer.decode(ids, skip_special_tokens=True)
        True
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0
        self._pieces: list[str] = []  # everything returned, for flush's check
        self._raw: list[str] = []  # everything the window decoded, before any clean-up
        cleanup = _cleans_up(tokenizer)
        self._decode_raw = _raw_decoder(tokenizer, cleanup, skip_special_tokens)
        self._byte_tokens = _byte_token_ids(tokenizer)
        self._skipped: dict[int, bool] = {}  # token id: whether the decode drops it
        self._run: list[int] = []  # byte-fallback (and skipped) tokens not yet decoded
        self._window: _Window = _new_window(
            tokenizer, self._decode_raw, self._byte_tokens, skip_special_tokens
        )
        self._cleanup = _SpaceCleanup(tokenizer.clean_up_tokenization) if cleanup else None

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes: ``""`` while it ends inside a character or a
        run of byte-fallback tokens (or the clean-up may still delete a space in it)."""
        self.ids.append(token_id)
        self._run.append(token_id)
        raw = ""
        if token_id not in self._byte_tokens and not self._is_skipped(token_id):
            raw = self._step(self._run)
            self._run = []
        self._raw.append(raw)
        piece = self._cleanup.push(raw) if self._cleanup is not None else raw
        self.spans.append((self.length, self.length + len(piece)))
        self._hand_out(piece)
        return piece

    def flush(self) -> str:
        """The rest of the text once no more tokens come (a trailing partial character
        decodes to U+FFFD, as in a full decode)."""
        full = self._tokenizer.decode(self.ids, skip_special_tokens=self._skip_special_tokens)
        sent = "".join(self._pieces)
        if not full.startswith(sent):  # a decoder the window cannot follow; nothing to undo
            _logger.warning(
                "Streamed text differs from the full decode of its %d tokens (%s).",
                len(self.ids),
                type(self._tokenizer).__name__,
            )
            return ""
        rest = full[len(sent) :]
        self._hand_out(rest)
        return rest

    def _is_skipped(self, token_id: int) -> bool:
        """Whether the decode drops ``token_id`` (a special token, when skipping them):
        asked only of a tokenizer with byte-fallback tokens, where it matters."""
        if not (self._skip_special_tokens and self._byte_tokens):
            return False
        skipped = self._skipped.get(token_id)
        if skipped is None:
            decode = self._tokenizer.decode
            kept = decode([token_id], skip_special_tokens=False)
            skipped = kept != "" and decode([token_id], skip_special_tokens=True) == ""
            self._skipped[token_id] = skipped
        return skipped

    def _step(self, token_ids: list[int]) -> str:
        try:
            return self._window.step(token_ids)
        except _WindowBroken as err:  # decode the old way from here on
            _logger.debug("Incremental decoding fell back to full decodes: %s", err)
            self._window = _FullWindow(self._decode_raw, self.ids, "".join(self._raw))
            return self._window.step(token_ids)

    def _hand_out(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self.length += len(piece)


class _WindowBroken(Exception):
    """The window's text no longer extends the text before it."""


class _Window(Protocol):
    def step(self, token_ids: list[int]) -> str:
        """Add tokens; the new whole characters of raw text ("" if none)."""
        ...


class _OffsetWindow:
    """vLLM's prefix and read offsets over a decode function: the window holds the chunk
    last handed out (its text is the prefix) and the tokens after it."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = ""
        self._read = 0  # where the tokens after the prefix chunk start

    def step(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(_REPLACEMENT):
            return ""
        if not text.startswith(self._prefix):
            raise _WindowBroken(f"{text!r} does not start with {self._prefix!r}")
        piece = text[len(self._prefix) :]
        self._ids = self._ids[self._read :]
        self._prefix = self._decode(self._ids)
        self._read = len(self._ids)
        return piece


class _StreamWindow:
    """``tokenizers.decoders.DecodeStream``: the same window, kept in Rust (one token a
    step: for a tokenizer without byte-fallback tokens)."""

    def __init__(self, backend: Any, stream: Any) -> None:
        self._backend = backend
        self._stream = stream

    def step(self, token_ids: list[int]) -> str:
        return "".join([self._step(token) for token in token_ids])

    def _step(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except RuntimeError:  # "Already borrowed": another thread is changing the tokenizer
            raise
        except Exception as err:  # tokenizers' Rust errors (an invalid prefix)
            raise _WindowBroken(str(err)) from err
        return piece or ""


class _FullWindow:
    """Decodes all tokens at every step (the quadratic way), for a decoder the window
    cannot follow; hands out what extends the text handed out so far."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int], sent: str) -> None:
        self._decode = decode
        self._ids = ids  # the detokenizer's own list: the current token is already in it
        self._sent = sent

    def step(self, token_ids: list[int]) -> str:
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT) or not text.startswith(self._sent):
            return ""
        piece, self._sent = text[len(self._sent) :], text
        return piece


class _SpaceCleanup:
    """transformers' ``clean_up_tokenization`` on streamed text.

    Each of its replacements deletes a space before at most three characters, and nothing
    else, so cleaning text in pieces gives the same result as cleaning it whole when every
    cut has no space among the :data:`_CLEANUP_REACH` characters before it. Text after
    the last such cut waits for more.
    """

    def __init__(self, clean: Callable[[str], str]) -> None:
        self._clean = clean
        self._pending = ""
        self._before = ""  # the last raw characters cleaned

    def push(self, raw: str) -> str:
        pending = self._pending + raw
        context = self._before + pending
        cut = _last_clean_cut(context, len(self._before)) - len(self._before)
        ready, self._pending = pending[:cut], pending[cut:]
        if not ready:
            return ""
        self._before = (self._before + ready)[-_CLEANUP_REACH:]
        return self._clean(ready)


def _last_clean_cut(text: str, start: int) -> int:
    """The last position at or after ``start`` with no space among the characters before
    it that a clean-up pattern can reach (``start`` if there is none)."""
    end = len(text)
    while end > start:
        space = text.rfind(" ", max(end - _CLEANUP_REACH, 0), end)
        if space < 0:
            return end
        end = space
    return start


def _rust_backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` a transformers fast tokenizer decodes with, if its
    ``decode`` is transformers' own (a subclass may add to it)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if cls.decode is not PreTrainedTokenizerFast.decode:
        return None
    if cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    return tokenizer.backend_tokenizer


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` cleans up tokenization spaces. transformers 5 skips the
    clean-up for a fast BPE tokenizer unless told to corrupt its output anyway."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = _rust_backend(tokenizer)
    if backend is not None and type(backend.model).__name__ == "BPE":
        forced = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        return bool(getattr(tokenizer, forced, True))  # transformers 4 always cleaned up
    return True


def _raw_decoder(tokenizer: Any, cleanup: bool, skip: bool) -> Callable[[list[int]], str]:
    """Decodes ids to text (without special tokens if ``skip``), before any clean-up."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        return lambda ids: str(backend.decode(ids, skip_special_tokens=skip))
    kwargs: dict[str, Any] = {"skip_special_tokens": skip}
    if cleanup:
        kwargs["clean_up_tokenization_spaces"] = False
    return lambda ids: str(tokenizer.decode(ids, **kwargs))


def _byte_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's byte-fallback tokens ``<0x00>`` to ``<0xFF>``, if any."""
    names = [f"<0x{byte:02X}>" for byte in range(256)]
    backend = _rust_backend(tokenizer)
    if backend is not None:
        found = [backend.token_to_id(name) for name in names]
    elif hasattr(tokenizer, "convert_tokens_to_ids"):
        unknown = getattr(tokenizer, "unk_token_id", None)
        found = [i for i in tokenizer.convert_tokens_to_ids(names) if i != unknown]
    else:
        found = []
    return frozenset(int(i) for i in found if i is not None)


def _new_window(
    tokenizer: Any,
    decode_raw: Callable[[list[int]], str],
    byte_tokens: frozenset[int],
    skip_special_tokens: bool,
) -> _Window:
    backend = _rust_backend(tokenizer)
    if backend is None or byte_tokens:  # a run of byte tokens must be one step
        return _OffsetWindow(decode_raw)
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return _OffsetWindow(decode_raw)
    return _StreamWindow(backend, DecodeStream(skip_special_tokens=skip_special_tokens))
