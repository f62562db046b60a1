"""Greedy rows without sorting the vocabulary, in transformers' continuous-batching manager.

A manager that mixes greedy and sampled requests runs transformers' per-request warpers:
its top-k and its top-p warper each sort every row over the whole vocabulary at every step,
even a row with ``top_k=1`` (greedy) or ``top_p=1``, and its sampler then draws every row
with ``torch.multinomial``. On SmolLM2-135M (CPU, 16 sequences) those took about a third
of each step. :func:`install_fast_sampling` swaps in equivalents that pick the same tokens:

- top-k: a ``topk`` of the largest ``top_k`` in the batch instead of a full sort, and no
  work when no row limits it;
- top-p: only rows with ``top_p < 1`` are sorted (a row at 1 keeps every token that can
  be drawn: the stock warper masks only tokens of probability exactly 0);
- sampling: rows with ``top_k=1`` take the argmax (as ``generate`` does when greedy), the
  others are drawn as before.

Like :mod:`.cb_hooks`, it needs the synchronous loop without CUDA graphs (its checks read
tensors on the host), so it is installed only there; elsewhere the stock warpers run.
"""

from __future__ import annotations

import logging
from typing import Any

_logger = logging.getLogger(__name__)

#: Above this share of the vocabulary a ``topk`` is no cheaper than the stock full sort.
_TOPK_SHARE = 0.25


class _GreedyRows:
    """The rows of the current step that are greedy (``top_k <= 1``), for the sampler."""

    def __init__(self) -> None:
        self.mask: Any = None

    def take(self) -> Any:
        mask, self.mask = self.mask, None
        return mask


def install_fast_sampling(manager: Any) -> bool:
    """Replace the warped manager's top-k, top-p and sampler (after ``warmup``, before
    ``start``). Returns False (and logs why) where they are not the ones this was written
    for, or there is nothing to replace (a greedy-only manager)."""
    try:
        config = manager.continuous_batching_config
        if config.use_async_batching or any(config.cuda_graph_booleans):
            raise TypeError("it needs the synchronous loop without CUDA graphs")
        runner = manager.batch_processor.model_runner
        processors = manager.logit_processor.logits_processor
        if not runner.do_sample or runner.return_logprobs:
            return False  # argmax already, or transformers' own logprobs: leave it as it is
        greedy_rows = _GreedyRows()
        top_k_at = _index_of(processors, "ContinuousBatchingTopKLogitsWarper")
        top_p_at = _index_of(processors, "ContinuousBatchingTopPLogitsWarper")
        if top_k_at is None:
            return False  # no per-request top-k: no row is known greedy
        processors[top_k_at] = _fast_top_k(processors[top_k_at], greedy_rows)
        if top_p_at is not None:
            processors[top_p_at] = _fast_top_p(processors[top_p_at])
        runner._sample = _fast_sampler(runner, runner._sample, greedy_rows)
    except Exception as err:  # any other transformers version: keep the stock warpers
        _logger.warning("Using transformers' own warpers and sampler: %s", err)
        return False
    return True


def _index_of(processors: Any, class_name: str) -> int | None:
    for index, processor in enumerate(processors):
        if type(processor).__name__ == class_name:
            return index
    return None


def _fast_top_k(stock: Any, greedy_rows: _GreedyRows) -> Any:
    """The stock top-k warper's result through ``topk``; records the greedy rows."""
    import torch

    class FastTopK(type(stock)):  # type: ignore[misc]
        def __init__(self) -> None:
            self.__dict__.update(vars(stock))

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            vocab = scores.size(-1)
            top_k = tensor_arg[: scores.size(0)].clamp(max=vocab)
            greedy_rows.mask = top_k <= 1
            limited = top_k < vocab
            if not bool(limited.any()):
                return scores
            k_max = int(top_k[limited].max())
            if k_max < 1 or k_max > vocab * _TOPK_SHARE:
                return super().__call__(scores, tensor_arg)
            largest = torch.topk(scores, k_max, dim=-1).values  # descending, as the sort
            index = (top_k.clamp(max=k_max) - 1).unsqueeze(-1).to(torch.int64)
            thresholds = largest.gather(-1, index).masked_fill(
                ~limited.unsqueeze(-1), float("-inf")
            )
            return scores.masked_fill(scores < thresholds, self.filter_value)

    return FastTopK()


def _fast_top_p(stock: Any) -> Any:
    """The stock top-p warper, run only on the rows with ``top_p < 1``."""
    import torch

    class FastTopP(type(stock)):  # type: ignore[misc]
        def __init__(self) -> None:
            self.__dict__.update(vars(stock))

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            nucleus = top_p < 1.0
            if not bool(nucleus.any()):
                return scores
            if bool(nucleus.all()):
                return super().__call__(scores, tensor_arg)
            rows = nucleus.nonzero().squeeze(-1)
            warped = scores.clone()
            warped[rows] = super().__call__(scores[rows], top_p[rows].view(dtype=torch.int32))
            return warped

    return FastTopP()


def _fast_sampler(runner: Any, stock_sample: Any, greedy_rows: _GreedyRows) -> Any:
    """The runner's sampler with argmax for greedy rows (``torch.multinomial`` for the rest)."""
    import torch

    def sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        greedy = greedy_rows.take()
        logits = scores[0]  # [rows, vocab]
        if greedy is None or runner.return_logprobs or greedy.size(0) != logits.size(0):
            stock_sample(scores, output_ids)
            return
        next_tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            drawn = (~greedy).nonzero().squeeze(-1)
            probs = torch.nn.functional.softmax(logits[drawn], dim=-1)
            next_tokens[drawn] = torch.multinomial(probs, num_samples=1).squeeze(-1)
        output_ids[0, : next_tokens.size(0)].copy_(next_tokens)

    return sample
