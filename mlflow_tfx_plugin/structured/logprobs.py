"""Token log-probabilities: recorded while decoding, aligned with the returned text, shaped
for the OpenAI wire.

:class:`~mlflow_tfx_plugin.structured.controls.ControlProcessor` records a
:class:`LogprobRecord` for every token it picks: the log-softmax of the row's logits after
the grammar mask and before temperature (so greedy's token is always the top one).
:class:`~mlflow_tfx_plugin.detokenize.IncrementalDetokenizer` gives each token the
character span its text takes in the output; a token that ends half way through a
character takes no text, and the next one takes the whole character. With a stop string,
the tokens that start past the cut are dropped (:func:`kept_before_cut`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: OpenAI allows 20 ``top_logprobs`` for chat; vLLM allows as many ``logprobs`` for completions.
MAX_TOP_LOGPROBS = 20
#: OpenAI: "-9999.0 signifies that the token is very unlikely"; JSON cannot carry -inf.
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class LogprobRecord:
    """One picked token, as the logits processor saw it.

    Attributes:
        token_id: the picked token.
        logprob: its log-probability.
        top: the most likely (token id, log-probability) pairs, most likely first, without
            the tokens the grammar forbade.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """One returned token's log-probability, with its place in the returned text.

    Attributes:
        token: the token's bytes.
        logprob: its log-probability, at least :data:`LOGPROB_FLOOR`.
        top: the most likely alternatives, as (bytes, log-probability).
        text_offset: where its text starts in the returned text (characters).
    """

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]
    text_offset: int


def record(logprobs: Any, token_id: int, top_count: int) -> LogprobRecord:
    """The record for ``token_id`` from one row's log-softmax (a 1-D tensor)."""
    top: tuple[tuple[int, float], ...] = ()
    if top_count > 0:
        values, indices = logprobs.topk(min(top_count, logprobs.numel()))
        top = tuple(
            (int(i), float(v))
            for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            if v != -math.inf
        )
    return LogprobRecord(token_id, float(logprobs[token_id]), top)


def kept_before_cut(span: tuple[int, int], cut: int | None) -> bool:
    """Whether a token with this text span survives a stop string cut at ``cut`` (None: no
    cut): it starts before the cut, or takes no text past it."""
    start, end = span
    return cut is None or start < cut or end <= cut


def resolve(recorded: LogprobRecord, span: tuple[int, int], vocab: Sequence[bytes]) -> TokenLogprob:
    """A record with its token ids turned into bytes, and its text offset."""
    return TokenLogprob(
        token=_bytes_of(recorded.token_id, vocab),
        logprob=max(recorded.logprob, LOGPROB_FLOOR),
        top=tuple(
            (_bytes_of(token_id, vocab), max(value, LOGPROB_FLOOR))
            for token_id, value in recorded.top
        ),
        text_offset=span[0],
    )


def _bytes_of(token_id: int, vocab: Sequence[bytes]) -> bytes:
    return vocab[token_id] if 0 <= token_id < len(vocab) else b""  # padded embedding rows


def token_text(data: bytes) -> str:
    """A token's bytes as text (a partial UTF-8 character becomes U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or a chunk of one)."""
    return {
        "content": [
            {
                "token": token_text(item.token),
                "logprob": item.logprob,
                "bytes": list(item.token),
                "top_logprobs": [
                    {"token": token_text(token), "logprob": value, "bytes": list(token)}
                    for token, value in item.top
                ],
            }
            for item in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion: OpenAI's legacy shape, whose top
    entries include the chosen token (so up to ``logprobs + 1`` of them)."""
    tops = []
    for item in logprobs:
        top = {token_text(token): value for token, value in item.top}
        top.setdefault(token_text(item.token), item.logprob)
        tops.append(top)
    return {
        "tokens": [token_text(item.token) for item in logprobs],
        "token_logprobs": [item.logprob for item in logprobs],
        "top_logprobs": tops,
        "text_offset": [item.text_offset for item in logprobs],
    }
