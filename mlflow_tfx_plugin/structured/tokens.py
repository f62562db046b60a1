"""The bytes behind every token id, and a byte-exact tokenizer for llguidance.

llguidance reads Hugging Face fast tokenizers with a ByteLevel decoder directly. For the
others (SentencePiece-style ``Metaspace`` vocabularies, slow tokenizers) it takes any object
with ``tokens`` (the bytes of each id) and a ``__call__`` that tokenizes *byte-exactly*:
Metaspace would turn ``"{"`` into the token ``" {"``, and llguidance would then force a
token the grammar forbids.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def token_bytes(tokenizer: Any) -> tuple[bytes, ...]:
    """The text bytes of each token id (ByteLevel, or Metaspace with byte fallback)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab = [token if token is not None else "" for token in vocab]
    if _decoder_is_byte_level(tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        return tuple(
            bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else token.encode()
            for token in vocab
        )
    return tuple(_sentencepiece_bytes(token) for token in vocab)


def _decoder_is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return "ByteLevel" in json.dumps(decoder)


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(match.group(1), 16)]) if match else token.replace(_METASPACE, " ").encode()


class ByteExactTokenizer:
    """What ``llguidance.TokenizerWrapper`` takes: the vocabulary as bytes, and a tokenizer
    whose tokens' bytes always join back to its input (HF's when they do, else a greedy
    longest match over the vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = list(token_bytes(tokenizer))
        self.special_token_ids = list(tokenizer.all_special_ids)
        specials = set(self.special_token_ids)
        self._ids_by_bytes: dict[bytes, int] = {}
        for token_id, data in enumerate(self.tokens):
            if token_id not in specials and data:
                self._ids_by_bytes.setdefault(data, token_id)
        self._longest = max(map(len, self._ids_by_bytes), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        decoded = data.decode("utf-8", errors="replace")
        ids = list(self._tokenizer.encode(decoded, add_special_tokens=False))
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._longest_match(data)

    def _longest_match(self, data: bytes) -> list[int]:
        ids, position = [], 0
        while position < len(data):
            for size in range(min(self._longest, len(data) - position), 0, -1):
                token_id = self._ids_by_bytes.get(data[position : position + size])
                if token_id is not None:
                    ids.append(token_id)
                    position += size
                    break
            else:
                raise ValueError(f"byte {data[position]:#x} has no token in this vocabulary")
        return ids
