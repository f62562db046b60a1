"""Text generation for the llm/v1 tasks: batched ``generate``, exact stop strings, streaming.

Stop strings use transformers' ``stop_strings`` (matched on decoded text, across token
boundaries), and the returned text is cut before the first stop string, so it never
contains one. Streaming detokenizes incrementally (:mod:`mlflow_tfx_plugin.detokenize`)
and holds back any tail that could still become a stop string, so the joined stream
equals the non-streamed text.

A request with ``response_format`` (``params.constraint``) is decoded under its grammar
(:mod:`mlflow_tfx_plugin.structured`); rows of one batch may each have their own. A request
with ``logprobs`` (``params.logprobs``) gets each returned token's log-probability; a
stream sends each token's with the text delta that completes the token's text.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from mlflow_tfx_plugin.detokenize import IncrementalDetokenizer
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError
from mlflow_tfx_plugin.protocol import DEFAULT_MAX_TOKENS, SAMPLING_EPS, GenerationParams
from mlflow_tfx_plugin.structured.logprobs import (
    LogprobRecord,
    TokenLogprob,
    kept_before_cut,
    resolve,
)

if TYPE_CHECKING:
    from mlflow_tfx_plugin.structured import ConstraintSpec, GrammarCompiler, RowControls

FinishReason = Literal["stop", "length"]

#: repetition_penalty divides or multiplies logits in float32 (1e-300 makes them inf).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts
#: Slack over the longest vocabulary entry for normalizers that shorten text (NFC
#: composition joins up to 3 code points into one).
_NORMALIZER_SLACK = 4


@dataclass(frozen=True)
class Completion:
    """One generated choice."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    #: Each returned token's logprob (None: the request asked for none).
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class PromptResult:
    """The ``n`` choices generated for one prompt."""

    prompt_tokens: int
    completions: list[Completion]


@dataclass(frozen=True)
class StreamDelta:
    """A piece of streamed text; the last event carries the finish reason and counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: The logprobs of the tokens whose text this delta completes.
    logprobs: tuple[TokenLogprob, ...] = ()


class TextGenerator:
    """Runs a causal LM on prompts with OpenAI semantics.

    Args:
        model: a ``PreTrainedModel`` for causal LM.
        tokenizer: its tokenizer.
        default_max_tokens: used when a request sets no ``max_tokens``.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, default_max_tokens: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        self.stop_token_ids = _eos_ids(model, tokenizer)
        self.default_max_tokens = default_max_tokens or _checkpoint_max_new_tokens(model)
        self._lock = threading.Lock()  # generate() is not safe to run concurrently on one model
        # A fast tokenizer's padding setting is mutated by calls that pad and calls that do
        # not; concurrent calls then fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    @property
    def context_window(self) -> int:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(value := getattr(config, name, None), int):
                return value
        return int(self.tokenizer.model_max_length)

    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        *,
        add_special_tokens: bool = True,
        constraints: Sequence[ConstraintSpec | None] | None = None,
        logprobs: Sequence[int | None] | None = None,
    ) -> list[PromptResult]:
        """Generate ``params.n`` choices for every prompt in one batched ``generate`` call.

        ``constraints`` and ``logprobs`` give each prompt its own (default:
        ``params.constraint`` and ``params.logprobs`` for all).
        """
        params = runnable_params(params)
        if constraints is None:
            constraints = [params.constraint] * len(prompts)
        if logprobs is None:
            logprobs = [params.logprobs] * len(prompts)
        grammars = [self.grammar(spec) for spec in constraints]  # a bad schema fails first
        batch, prompt_lengths = self._encode(prompts, add_special_tokens)
        kwargs = self._generate_kwargs(params, max(prompt_lengths))
        rows = None
        if any(grammars) or any(top is not None for top in logprobs):
            per_prompt = 1 if params.greedy else params.n
            batch, rows = self._controlled(batch, kwargs, params, grammars, logprobs, per_prompt)
        with self._lock:
            output = self._run(batch, kwargs, params.seed)
        _raise_row_errors(rows)
        return self._split(output, batch["input_ids"].shape[1], prompt_lengths, params, rows)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Grammars for this model's tokenizer (compiled once per constraint)."""
        from mlflow_tfx_plugin.structured import GrammarCompiler

        vocab_size = int(self.model.config.get_text_config().vocab_size)
        return GrammarCompiler(self.tokenizer, vocab_size=max(vocab_size, len(self.tokenizer)))

    def grammar(self, spec: ConstraintSpec | None) -> str | None:
        """The checked grammar of a constraint (None for none).

        Raises:
            InvalidInputError: the grammar engine is not installed, or the schema uses a
                feature it cannot enforce (naming the request field).
        """
        return None if spec is None else self.grammars.compile(spec)

    @cached_property
    def vocab_bytes(self) -> tuple[bytes, ...]:
        """The bytes of every token id (the ``bytes`` of logprobs)."""
        from mlflow_tfx_plugin.structured.tokens import token_bytes

        return token_bytes(self.tokenizer)

    def _controlled(
        self,
        batch: Any,
        kwargs: dict[str, Any],
        params: GenerationParams,
        grammars: Sequence[str | None],
        logprobs: Sequence[int | None],
        per_prompt: int,
    ) -> tuple[Any, list[RowControls | None]]:
        """Set up a batch with controlled rows (a grammar, or logprobs to record): each
        choice is its own row, decoded by
        :class:`~mlflow_tfx_plugin.structured.ControlProcessor` (``do_sample=False``)."""
        from transformers import LogitsProcessorList

        from mlflow_tfx_plugin.structured import ControlProcessor, RowControls

        rows: list[RowControls | None] = []
        for grammar, top in zip(grammars, logprobs, strict=True):
            for _ in range(per_prompt):
                if grammar is None and top is None and params.greedy:
                    rows.append(None)  # transformers' argmax is the same choice
                    continue
                matcher = self.grammars.matcher(grammar) if grammar is not None else None
                rows.append(
                    RowControls(
                        matcher=matcher,
                        temperature=params.temperature if not params.greedy else 0.0,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        top_logprobs=top,
                    )
                )
        if per_prompt > 1:  # what num_return_sequences does, with a row per choice
            batch = {
                key: value.repeat_interleave(per_prompt, dim=0) for key, value in batch.items()
            }
        kwargs.pop("num_return_sequences", None)
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        mask_width = self.grammars.vocab_size if any(grammars) else None
        processor = ControlProcessor(rows, eos_token_id=self._end_token_id, mask_width=mask_width)
        kwargs["logits_processor"] = LogitsProcessorList([processor])
        return batch, rows

    @property
    def _end_token_id(self) -> int:
        """The token that ends a sequence whose grammar is complete."""
        eos = self.tokenizer.eos_token_id
        return (
            int(eos)
            if eos in self.stop_token_ids or not self.stop_token_ids
            else min(self.stop_token_ids)
        )

    def stream(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        add_special_tokens: bool = True,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamDelta]:
        """Stream one choice: text deltas, then a final event with the finish reason.

        Setting ``cancel`` stops generation at the next token (the server sets it when the
        client disconnects).
        """
        from transformers import StoppingCriteriaList

        params = runnable_params(params)
        if params.n != 1:
            raise InvalidInputError("Streaming supports n=1 only.", param="n")
        grammar = self.grammar(params.constraint)
        batch, [prompt_length] = self._encode([prompt], add_special_tokens)
        kwargs = self._generate_kwargs(params, prompt_length)
        rows = None
        if grammar is not None or params.logprobs is not None:
            batch, rows = self._controlled(
                batch, kwargs, params, [grammar], [params.logprobs], per_prompt=1
            )
        tokens = _TokenQueue()
        kwargs["streamer"] = tokens
        deltas: Iterator[StreamDelta]
        if rows is not None and rows[0] is not None and rows[0].top_logprobs is not None:
            deltas = self._logprob_deltas(tokens, rows[0].records, params)
        else:
            deltas = _text_deltas(IncrementalDetokenizer(self.tokenizer), tokens, params.stop)
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([cancel_criterion(cancel)])
        holder: dict[str, Any] = {}
        thread = threading.Thread(target=self._run_into, args=(holder, batch, kwargs, params.seed))
        thread.start()
        yield from deltas
        thread.join()
        if "error" in holder:
            raise holder["error"]
        _raise_row_errors(rows)
        [result] = self._split(
            holder["output"], batch["input_ids"].shape[1], [prompt_length], params, rows
        )
        [completion] = result.completions
        yield StreamDelta("", completion.finish_reason, prompt_length, completion.completion_tokens)

    def _logprob_deltas(
        self, token_ids: Iterable[int], records: Sequence[LogprobRecord], params: GenerationParams
    ) -> Iterator[StreamDelta]:
        """Text deltas, each with the logprobs of the tokens whose text it completes
        (detokenized incrementally, as :meth:`_aligned_logprobs` does)."""
        texts = IncrementalDetokenizer(self.tokenizer)
        text_stream = StopStringStream(params.stop)
        ends = set() if params.ignore_eos else self.stop_token_ids
        pending: list[int] = []  # tokens whose logprobs are not sent yet

        def release(ready: Any) -> tuple[TokenLogprob, ...]:
            count = next((n for n, i in enumerate(pending) if not ready(i)), len(pending))
            sent, pending[:] = pending[:count], pending[count:]
            return tuple(resolve(records[i], texts.spans[i], self.vocab_bytes) for i in sent)

        for token in token_ids:
            if token not in ends:  # an end-of-sequence token takes no text: no logprob
                pending.append(len(texts.ids))
            delta = text_stream.push(texts.push(token))
            logprobs = release(lambda i: texts.spans[i][1] <= text_stream.sent)
            if delta or logprobs:
                yield StreamDelta(delta, logprobs=logprobs)
            if text_stream.stopped:
                for _ in token_ids:  # drain: generation stops on its own at the stop string
                    pass
                break
        delta = "" if text_stream.stopped else text_stream.push(texts.flush())
        delta += text_stream.finish()
        cut = text_stream.sent if text_stream.stopped else None
        kept = [i for i in pending if kept_before_cut(texts.spans[i], cut)]
        pending[:] = kept
        if logprobs := release(lambda i: True):
            yield StreamDelta(delta, logprobs=logprobs)
        elif delta:
            yield StreamDelta(delta)

    def _aligned_logprobs(
        self, token_ids: Sequence[int], records: Sequence[LogprobRecord], cut: int | None
    ) -> tuple[TokenLogprob, ...]:
        """The records of the tokens whose text is returned: none for an end-of-sequence
        token, none past a stop string's ``cut``."""
        texts = IncrementalDetokenizer(self.tokenizer)
        for token in token_ids:
            texts.push(token)
        return tuple(
            resolve(recorded, span, self.vocab_bytes)
            for recorded, span in zip(records, texts.spans, strict=False)
            if kept_before_cut(span, cut)
        )

    def encode(self, prompt: str, *, add_special_tokens: bool) -> list[int]:
        """The prompt's token ids, if they leave room to generate in the context window."""
        self.check_prompt_chars(prompt)
        with self._tokenizer_lock:
            input_ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        self.check_prompt_length(len(input_ids))
        return list(input_ids)

    def _encode(self, prompts: Sequence[str], add_special_tokens: bool) -> tuple[Any, list[int]]:
        for prompt in prompts:
            self.check_prompt_chars(prompt)
        with self._tokenizer_lock:
            batch = self.tokenizer(
                list(prompts),
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(self.model.device)
        lengths = [int(n) for n in batch["attention_mask"].sum(dim=1)]
        for length in lengths:
            self.check_prompt_length(length)
        return batch, lengths

    def check_prompt_chars(self, prompt: str) -> None:
        """Reject, before tokenizing it, a prompt too long to fit in the context window.

        Tokenizing 5 MB of text takes seconds and keeps half a gigabyte of memory. No token
        covers more characters than :attr:`max_chars_per_token`, so a longer prompt than
        the window holds at that many per token cannot fit.
        """
        window = self.context_window
        if len(prompt) > window * self.max_chars_per_token:
            at_least = math.ceil(len(prompt) / self.max_chars_per_token)
            raise InvalidInputError(
                f"The prompt has {len(prompt)} characters, so at least {at_least} tokens, but "
                f"the model's context window is {window} tokens. Shorten the prompt.",
                param="messages",
            )

    @cached_property
    def max_chars_per_token(self) -> int:
        """A bound on the characters one token covers (see :meth:`check_prompt_chars`)."""
        longest = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        return max(longest, 1) * _NORMALIZER_SLACK

    def check_prompt_length(self, length: int) -> None:
        """Reject a prompt that leaves no room to generate in the context window."""
        window = self.context_window
        if length >= window:
            raise InvalidInputError(
                f"The prompt has {length} tokens, but the model's context window is {window} "
                "tokens. Shorten the prompt.",
                param="messages",
            )

    def max_new_tokens(self, params: GenerationParams, prompt_length: int) -> int:
        """The request's ``max_tokens`` (or the default), capped by the context window."""
        room = self.context_window - prompt_length
        return min(params.max_tokens or self.default_max_tokens, room)

    def decoding_kwargs(self, params: GenerationParams, max_new: int) -> dict[str, Any]:
        """``generate`` arguments for how one sequence's tokens are chosen: greedy or
        sampled, ``max_new`` of them, and no end before ``max_new`` with ``ignore_eos``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": not params.greedy,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if not params.greedy:
            kwargs.update(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0
            )
        else:  # neutralize sampling defaults a checkpoint's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = max_new
        return kwargs

    def _generate_kwargs(self, params: GenerationParams, prompt_length: int) -> dict[str, Any]:
        max_new = self.max_new_tokens(params, prompt_length)
        kwargs = {**self.decoding_kwargs(params, max_new), "return_dict_in_generate": True}
        if not params.greedy:
            kwargs["num_return_sequences"] = params.n
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.repetition_penalty is not None:
            kwargs["repetition_penalty"] = params.repetition_penalty
        return kwargs

    def _run(self, batch: Any, kwargs: dict[str, Any], seed: int | None) -> Any:
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            return self.model.generate(**batch, **kwargs)

    def _run_into(
        self, holder: dict[str, Any], batch: Any, kwargs: dict[str, Any], seed: int | None
    ) -> None:
        try:
            with self._lock:
                holder["output"] = self._run(batch, kwargs, seed)
        except Exception as err:  # re-raised in the consumer's thread
            holder["error"] = err
            kwargs["streamer"].end()

    def _split(
        self,
        output: Any,
        input_width: int,
        prompt_lengths: list[int],
        params: GenerationParams,
        controls: Sequence[RowControls | None] | None = None,
    ) -> list[PromptResult]:
        rows = output.sequences[:, input_width:].tolist()
        controls = controls or [None] * len(rows)
        per_prompt = 1 if params.greedy else params.n
        results = []
        for index, prompt_length in enumerate(prompt_lengths):
            start, stop = index * per_prompt, (index + 1) * per_prompt
            choices = [
                self._completion(row, params, row_controls)
                for row, row_controls in zip(rows[start:stop], controls[start:stop], strict=True)
            ]
            if params.greedy:  # greedy choices are identical: generate once, return n copies
                choices = choices * params.n
            results.append(PromptResult(prompt_tokens=prompt_length, completions=choices))
        return results

    def _completion(
        self, token_ids: list[int], params: GenerationParams, controls: RowControls | None = None
    ) -> Completion:
        end = next((i + 1 for i, tok in enumerate(token_ids) if tok in self.stop_token_ids), None)
        generated = (
            token_ids[:end] if end else _strip_padding(token_ids, self.tokenizer.pad_token_id)
        )
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        text, hit_stop = cut_at_stop(text, params.stop)
        finish: FinishReason = "stop" if end is not None or hit_stop else "length"
        logprobs = None
        if controls is not None and controls.top_logprobs is not None:
            # A row's records outlast its tokens once it has ended (padding follows).
            with_text = generated[:-1] if end is not None else generated
            records = controls.records[: len(with_text)]
            logprobs = self._aligned_logprobs(with_text, records, len(text) if hit_stop else None)
        return Completion(text, finish, len(generated), logprobs)


def _raise_row_errors(rows: Sequence[RowControls | None] | None) -> None:
    """A matcher that rejected a token means the output broke its grammar: fail."""
    errors = [row.error for row in rows or () if row is not None and row.error]
    if errors:
        raise EngineError(f"Constrained decoding failed: {errors[0]}")


def runnable_params(params: GenerationParams) -> GenerationParams:
    """``params`` as every sampler can run them: the engines call this before any request
    enters a batch, so that no request's values can fail the batch (or stop its loop).

    Temperatures and top_p values below :data:`SAMPLING_EPS` decode greedily.

    Raises:
        InvalidInputError: naming the field whose value no sampler can run.
    """
    _check_range("temperature", params.temperature, 0.0, math.inf)
    _check_range("top_p", params.top_p, 0.0, 1.0, low_open=True)
    if params.top_k is not None and params.top_k < 0:
        raise _out_of_range("top_k", params.top_k, "an integer >= 0")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise _out_of_range("max_tokens", params.max_tokens, "an integer >= 1")
    if params.repetition_penalty is not None:
        _check_range("repetition_penalty", params.repetition_penalty, *REPETITION_PENALTY_RANGE)
    low, high = _SEED_RANGE
    if params.seed is not None and not low <= params.seed <= high:
        raise _out_of_range("seed", params.seed, "a 64-bit integer")
    if not params.greedy and min(params.temperature, params.top_p) < SAMPLING_EPS:
        return replace(params, temperature=0.0, top_p=1.0)
    return params


def _check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        bound = "> " if low_open else ">= "
        upper = "" if math.isinf(high) else f" and <= {high:g}"
        raise _out_of_range(name, value, f"a finite number {bound}{low:g}{upper}")


def _out_of_range(name: str, value: object, expected: str) -> InvalidInputError:
    return InvalidInputError(f"'{name}' must be {expected}, got {value!r}.", param=name)


def cancel_criterion(event: threading.Event) -> Any:
    """A transformers stopping criterion that ends generation once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return Cancelled()


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string."""
    positions = [pos for stop in stops if (pos := text.find(stop)) >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


class StopStringStream:
    """Turns growing generated text into deltas that are safe to send.

    The text ends at the first stop string it reaches, as generation does, and is cut
    before it (of stop strings completed by the same piece, the one starting first wins).
    A delta never includes a tail that may still grow into a stop string: it is held back
    until the text rules it out or ends. Only
    that tail is kept (a stop string cannot start in text already sent), so each
    :meth:`push` costs what its piece and the tail cost, however long the text.

    Args:
        stops: the request's stop strings.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""  # the text after what was sent
        self._sent = 0
        #: Whether the text reached a stop string (nothing follows it).
        self.stopped = False

    def push(self, piece: str) -> str:
        """The next piece of text (whole characters); returns the new delta, ``""`` if
        there is none."""
        return self._advance(piece, final=False)

    def finish(self) -> str:
        """What is left once the text has ended."""
        return self._advance("", final=True)

    def _advance(self, piece: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        held, self.stopped = cut_at_stop(self._held + piece, self._stops)
        end = len(held)
        if not (final or self.stopped):
            end -= partial_stop_length(held, self._stops)
        delta, self._held = held[:end], held[end:]
        self._sent += len(delta)
        return delta

    @property
    def sent(self) -> int:
        """How many characters of the text have been handed out."""
        return self._sent


def _text_deltas(
    texts: IncrementalDetokenizer, token_ids: Iterable[int], stops: Sequence[str]
) -> Iterator[StreamDelta]:
    """The tokens' text, holding back any tail that may still grow into a stop string."""
    text_stream = StopStringStream(stops)
    tokens = iter(token_ids)
    for token in tokens:
        if delta := text_stream.push(texts.push(token)):
            yield StreamDelta(delta)
        if text_stream.stopped:
            for _ in tokens:  # drain: generation stops on its own at the stop string
                pass
            return
    if delta := text_stream.push(texts.flush()) + text_stream.finish():
        yield StreamDelta(delta)


class _TokenQueue:
    """A ``generate`` streamer that queues each generated token id (the prompt is skipped);
    iterating it yields them until generation ends."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            for token in value.reshape(-1).tolist():
                self._queue.put(int(token))
        self._prompt_seen = True

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self._queue.get()) is not None:
            yield token


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _strip_padding(token_ids: list[int], pad_id: int | None) -> list[int]:
    while token_ids and token_ids[-1] == pad_id:
        token_ids = token_ids[:-1]
    return token_ids


def _checkpoint_max_new_tokens(model: Any) -> int:
    value = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    return int(value) if value else DEFAULT_MAX_TOKENS
