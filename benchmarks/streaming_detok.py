"""Streaming detokenization: the old full re-decode at every token against the incremental
detokenizer, on the tiny models' byte-level BPE tokenizer, interleaved.

    python benchmarks/streaming_detok.py [--tokens 500,4000,8000] [--repeat 3]

Each contender turns one token sequence (English from the test corpus with "é", "中文" and
"🙂" mixed in, so tokens split characters) into stream deltas with a stop string that never
matches, as the engines do, token by token:

  full re-decode  ``tokenizer.decode`` of all tokens so far at every token, then the text
                  so far into a stop-string filter (the continuous engine before issue #16)
  DecodeStream    :class:`~mlflow_tfx_plugin.detokenize.IncrementalDetokenizer` on the fast
                  tokenizer (``tokenizers``' ``DecodeStream``), then ``StopStringStream``
  offset window   the same detokenizer over ``tokenizer.decode`` (vLLM's offsets: what a
                  tokenizer without a Rust backend gets)

Every contender's joined deltas are checked against one full decode. Reported: the median
total over ``--repeat`` rounds (the contenders' order rotating), and the time per token over
the first and the last tenth of the longest stream.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import CORPUS, build_llama_tokenizer  # noqa: E402

from mlflow_tfx_plugin.detokenize import IncrementalDetokenizer  # noqa: E402
from mlflow_tfx_plugin.generation import (  # noqa: E402
    StopStringStream,
    cut_at_stop,
    partial_stop_length,
)

STOPS = ("\n\nUser:",)
#: One stream: its deltas joined, the seconds each token took, and the seconds ending it took.
Run = tuple[str, list[float], float]


class _OldStopStream:
    """``StopStringStream.update`` as it was: fed the whole text so far at every token."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._sent = 0
        self.stopped = False

    def update(self, text: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        stable = len(text.rstrip("\ufffd"))
        text, self.stopped = cut_at_stop(text, self._stops)
        end = len(text)
        if not (final or self.stopped):
            end = min(stable, end - partial_stop_length(text, self._stops))
        if end <= self._sent:
            return ""
        delta, self._sent = text[self._sent : end], end
        return delta


class _DecodeOnly:
    """The tokenizer seen through ``decode`` alone: the detokenizer's generic path."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self._tokenizer.decode(ids, **kwargs))


def full_redecode(tokenizer: Any, ids: Sequence[int]) -> Run:
    stream, pieces, times = _OldStopStream(STOPS), [], []
    for count in range(1, len(ids) + 1):
        start = time.perf_counter()
        text = tokenizer.decode(ids[:count], skip_special_tokens=True)
        pieces.append(stream.update(text, final=count == len(ids)))
        times.append(time.perf_counter() - start)
    return "".join(pieces), times, 0.0  # the last token's full decode ended it


def incremental(tokenizer: Any, ids: Sequence[int]) -> Run:
    texts, stream = IncrementalDetokenizer(tokenizer), StopStringStream(STOPS)
    pieces, times = [], []
    for token in ids:
        start = time.perf_counter()
        pieces.append(stream.push(texts.push(token)))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    pieces.append(stream.push(texts.flush()) + stream.finish())  # one full decode
    return "".join(pieces), times, time.perf_counter() - start


def token_ids(tokenizer: Any, count: int) -> list[int]:
    text = " ".join(f"{line} é 中文 🙂" for line in CORPUS)
    ids: list[int] = []
    while len(ids) < count:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ids[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="500,4000,8000", help="stream lengths, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per length")
    args = parser.parse_args()
    tokenizer = build_llama_tokenizer()
    contenders: dict[str, Callable[[Sequence[int]], Run]] = {
        "full re-decode": lambda ids: full_redecode(tokenizer, ids),
        "DecodeStream": lambda ids: incremental(tokenizer, ids),
        "offset window": lambda ids: incremental(_DecodeOnly(tokenizer), ids),
    }
    lengths = sorted(int(n) for n in args.tokens.split(","))
    totals: dict[tuple[str, int], list[float]] = {}
    last: dict[str, tuple[list[float], float]] = {}
    for count in lengths:
        ids = token_ids(tokenizer, count)
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        names = list(contenders)
        for round_ in range(args.repeat):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                text, times, end = contenders[name](ids)
                if text != expected:
                    raise SystemExit(f"{name}: the joined deltas differ from the full decode")
                totals.setdefault((name, count), []).append(sum(times) + end)
                last[name] = times, end
    _print_tables(contenders, lengths, totals, last)


def _print_tables(
    contenders: dict[str, Any],
    lengths: list[int],
    totals: dict[tuple[str, int], list[float]],
    last: dict[str, tuple[list[float], float]],
) -> None:
    baseline = "full re-decode"
    print(f"Median stream time (s) over rounds; {sys.platform}, Python {sys.version.split()[0]}\n")
    print("| tokens | " + " | ".join(contenders) + f" | speed-up vs {baseline} |")
    print("|---" * (len(contenders) + 2) + "|")
    for count in lengths:
        medians = {name: statistics.median(totals[(name, count)]) for name in contenders}
        cells = " | ".join(f"{medians[name]:.4f}" for name in contenders)
        ups = ", ".join(
            f"{medians[baseline] / medians[name]:.0f}x" for name in contenders if name != baseline
        )
        print(f"| {count} | {cells} | {ups} |")
    tenth = max(lengths) // 10
    print(f"\nTime per token (µs), {max(lengths)}-token stream (last round)\n")
    print("| contender | first tenth | last tenth | last / first | ending the stream |")
    print("|---|---|---|---|---|")
    for name, (times, end) in last.items():
        first_us = statistics.mean(times[:tenth]) * 1e6
        last_us = statistics.mean(times[-tenth:]) * 1e6
        ratio = last_us / first_us
        print(f"| {name} | {first_us:.1f} | {last_us:.1f} | {ratio:.2f} | {end * 1e6:.0f} |")


if __name__ == "__main__":
    main()
