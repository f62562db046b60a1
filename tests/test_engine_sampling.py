"""The continuous-batching manager's warpers and sampler as the engine installs them
(engine/cb_sampling.py): the same tokens as transformers' own, without their full sorts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlflow_tfx_plugin.deployments.engine import ContinuousBatchingEngine, EngineSettings
from mlflow_tfx_plugin.generation import TextGenerator
from mlflow_tfx_plugin.protocol import GenerationParams

PROMPTS = ["Hello there", "Once upon a time", "The capital of France", "x"]


@pytest.fixture(scope="module")
def generator(tiny_llama_dir: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)))


@pytest.fixture(scope="module")
def engine(generator: TextGenerator):
    built = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=8))
    yield built
    built.close()


def _installed(engine: ContinuousBatchingEngine, name: str):
    processors = engine._manager.logit_processor.logits_processor
    return next(p for p in processors if type(p).__name__ == name)


def test_the_mixed_manager_runs_the_fast_warpers(engine):
    assert engine.fast_sampling
    assert _installed(engine, "FastTopK") is not None
    assert _installed(engine, "FastTopP") is not None


def test_a_greedy_only_manager_keeps_its_argmax(generator: TextGenerator):
    built = ContinuousBatchingEngine(generator, EngineSettings(max_batch_size=2, greedy_only=True))
    try:
        assert not built.fast_sampling
    finally:
        built.close()


def _run(engine, requests: list[tuple[str, GenerationParams]]):
    async def run():
        return await asyncio.gather(
            *(engine.generate(p, params, add_special_tokens=True) for p, params in requests)
        )

    return asyncio.run(run())


def test_greedy_requests_beside_sampled_ones_match_generate(engine, generator: TextGenerator):
    greedy = GenerationParams(max_tokens=12, temperature=0)
    sampled = GenerationParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20)
    requests = [(p, greedy) for p in PROMPTS] + [(p, sampled) for p in PROMPTS]

    results = _run(engine, requests)

    for prompt, result in zip(PROMPTS, results[: len(PROMPTS)], strict=True):
        assert result == generator.generate([prompt], greedy)[0]
    assert all(r.completions[0].completion_tokens > 0 for r in results[len(PROMPTS) :])


@pytest.mark.parametrize(
    "narrow",
    [
        GenerationParams(max_tokens=10, temperature=1.5, top_k=1),  # only the top token
        GenerationParams(max_tokens=10, temperature=1.0, top_p=1e-6),  # a nucleus of one
    ],
    ids=["top_k=1", "top_p=1e-6"],
)
def test_sampling_narrowed_to_one_token_is_greedy(engine, generator, narrow: GenerationParams):
    greedy = GenerationParams(max_tokens=10, temperature=0)
    wide = GenerationParams(max_tokens=10, temperature=1.0)  # unlimited rows in the same batch
    requests = [(p, narrow) for p in PROMPTS] + [(p, wide) for p in PROMPTS]

    results = _run(engine, requests)

    for prompt, result in zip(PROMPTS, results[: len(PROMPTS)], strict=True):
        expected = generator.generate([prompt], greedy)[0].completions[0]
        assert result.completions[0].text == expected.text


def test_the_fast_warpers_keep_what_transformers_keeps(engine):
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopKLogitsWarper,
        ContinuousBatchingTopPLogitsWarper,
    )

    fast_k = _installed(engine, "FastTopK")
    fast_p = _installed(engine, "FastTopP")
    stock_k = ContinuousBatchingTopKLogitsWarper.__new__(ContinuousBatchingTopKLogitsWarper)
    stock_p = ContinuousBatchingTopPLogitsWarper.__new__(ContinuousBatchingTopPLogitsWarper)
    stock_k.__dict__.update(vars(fast_k))
    stock_p.__dict__.update(vars(fast_p))
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 500, generator=generator) * 4
    top_k = torch.tensor([1, 7, 500, 40, 1, 500], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.05]).view(dtype=torch.int32)

    assert torch.equal(fast_k(scores, top_k), stock_k(scores, top_k))
    assert torch.equal(fast_k(scores[:2], top_k[[2, 5]]), scores[:2])  # nothing to cut
    # Rows at top_p=1 may keep tokens of probability 0 that transformers masks: compare the
    # distributions the sampler draws from.
    kept = fast_k(scores, top_k)
    assert torch.equal(fast_p(kept, top_p).softmax(-1), stock_p(kept, top_p).softmax(-1))
