"""Time the continuous-batching engine in-process: per-token step times and batch throughput.

    python benchmarks/engine_step.py                     # SmolLM2-135M-Instruct, float32
    python benchmarks/engine_step.py --tokens 8 --repeats 1 --concurrency 2   # smoke
    python benchmarks/engine_step.py --concurrency 16 --profile 30   # top 30 functions

Three measurements, one model load:

  solo      one sequence, ``--tokens`` forced greedy tokens: plain ``model.generate`` (what
            :class:`TextGenerator` runs; before the manager starts) against transformers'
            manager alone, both in ms per token after the first (prefill excluded),
            ``--repeats`` times each
  engine    ``--concurrency`` concurrent greedy requests through
            :class:`ContinuousBatchingEngine`, completion tok/s and p50 latency, ``--repeats``
            waves
  profile   with ``--profile N``: one more engine wave under cProfile, in the event loop,
            the dispatcher and transformers' loop thread; the top N functions by own time

``--max-batch-size`` and ``--kv-cache-tokens`` go to :class:`EngineSettings` (default: what
the deployment config derives); ``--greedy-only`` picks the greedy batch loop.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

QUESTION = "Why is the sky blue?"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="forced new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=16, help="engine wave size (0: skip)")
    parser.add_argument("--max-batch-size", type=int, help="EngineSettings.max_batch_size")
    parser.add_argument("--kv-cache-tokens", type=int, help="EngineSettings.kv_cache_tokens")
    parser.add_argument("--greedy-only", action="store_true", help="the greedy batch loop")
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions")
    parser.add_argument("--skip-solo", action="store_true", help="leave out the solo timing")
    parser.add_argument(
        "--stock-sampling", action="store_true", help="transformers' own warpers and sampler"
    )
    return parser.parse_args()


def load_generator() -> Any:
    import torch
    import transformers
    from smollm2 import ensure_smollm2_checkpoint

    from mlflow_tfx_plugin.generation import TextGenerator

    checkpoint = ensure_smollm2_checkpoint()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    return TextGenerator(model, tokenizer)


def chat_ids(generator: Any) -> list[int]:
    messages = [{"role": "user", "content": QUESTION}]
    text = generator.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return list(generator.encode(text, add_special_tokens=False))


def build_engine(generator: Any, args: argparse.Namespace) -> Any:
    from mlflow_tfx_plugin.deployments.config import DeploymentConfig
    from mlflow_tfx_plugin.deployments.engine import (
        ContinuousBatchingEngine,
        EngineSettings,
        continuous,
    )

    if args.stock_sampling:
        continuous.install_fast_sampling = lambda manager: False

    explicit = {
        key: value
        for key, value in (
            ("max_batch_size", args.max_batch_size),
            ("kv_cache_tokens", args.kv_cache_tokens),
        )
        if value is not None
    }
    settings = EngineSettings.from_config(DeploymentConfig(**explicit))
    settings = type(settings)(**{**vars(settings), "greedy_only": args.greedy_only})
    engine = ContinuousBatchingEngine(generator, settings)
    manager = engine._manager
    print(
        f"engine: max_batch_size={settings.max_batch_size} "
        f"kv_cache_tokens={manager.continuous_batching_config.num_blocks * 32} "
        f"greedy_only={settings.greedy_only} stock_sampling={args.stock_sampling}"
    )
    return engine


def forced(tokens: int) -> Any:
    from mlflow_tfx_plugin.protocol import GenerationParams

    return GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def time_generate(generator: Any, input_ids: list[int], tokens: int) -> tuple[float, float]:
    """(ms per token after the first, request seconds), plain ``generate``."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Stamps(BaseStreamer):
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = generator.model
    start = time.perf_counter()
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            streamer=Stamps(),
            **generator.decoding_kwargs(forced(tokens), tokens),
        )
    # stamps[0]: the prompt, [1]: the first token (after prefill)
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1000, stamps[-1] - start


def time_manager(engine: Any, input_ids: list[int], tokens: int) -> tuple[float, float]:
    """(ms per token after the first, request seconds), one sequence alone in the manager."""

    async def run() -> list[float]:
        stamps: list[float] = [time.perf_counter()]
        outputs = engine._manager_outputs(input_ids, forced(tokens), tokens)
        async for _ in outputs:
            stamps.append(time.perf_counter())
        return stamps

    stamps = asyncio.run(run())
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1000, stamps[-1] - stamps[0]


def engine_wave(engine: Any, generator: Any, concurrency: int, tokens: int) -> tuple[float, float]:
    """(completion tok/s, p50 latency s) of ``concurrency`` concurrent requests."""
    text = generator.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )

    async def one() -> tuple[float, int]:
        start = time.perf_counter()
        result = await engine.generate(text, forced(tokens), add_special_tokens=False)
        return time.perf_counter() - start, result.completions[0].completion_tokens

    async def wave() -> tuple[float, list[tuple[float, int]]]:
        start = time.perf_counter()
        done = await asyncio.gather(*(one() for _ in range(concurrency)))
        return time.perf_counter() - start, list(done)

    elapsed, done = asyncio.run(wave())
    return sum(n for _, n in done) / elapsed, statistics.median(t for t, _ in done)


def profiled_wave(engine: Any, generator: Any, args: argparse.Namespace) -> None:
    """One wave with cProfile in the loop thread, the dispatcher and the event loop."""
    from transformers.generation.continuous_batching import continuous_api

    profiles: list[cProfile.Profile] = []
    manager = engine._manager
    body = continuous_api.ContinuousBatchingManager._generation_loop_body
    profile_lock = threading.Lock()
    per_thread: dict[int, cProfile.Profile] = {}

    def thread_profile() -> cProfile.Profile:
        with profile_lock:
            ident = threading.get_ident()
            if ident not in per_thread:
                per_thread[ident] = cProfile.Profile()
                profiles.append(per_thread[ident])
            return per_thread[ident]

    def profiled_body(*a: Any, **k: Any) -> Any:
        return thread_profile().runcall(body, manager, *a, **k)

    manager._generation_loop_body = profiled_body
    main = cProfile.Profile()
    profiles.append(main)
    main.enable()
    try:
        rate, p50 = engine_wave(engine, generator, args.concurrency, args.tokens)
    finally:
        main.disable()
        del manager._generation_loop_body
    print(f"profiled wave: {rate:.1f} tok/s, p50 {p50:.2f} s (cProfile slows it)")
    out = io.StringIO()
    stats = pstats.Stats(*profiles, stream=out)
    stats.sort_stats("tottime").print_stats(args.profile)
    print(out.getvalue())


def main() -> None:
    from mlflow_tfx_plugin.deployments.engine.threads import run_in_passing_thread

    args = parse_arguments()
    # As the server does (engine/threads.py): the manager's loop keeps the only OpenMP pool.
    generator = run_in_passing_thread(load_generator)
    input_ids = chat_ids(generator)
    plain: list[tuple[float, float]] = []
    if not args.skip_solo:  # before the manager's loop starts: no second pool meanwhile
        run_in_passing_thread(time_generate, generator, input_ids, 4)  # warm-up
        plain = [
            run_in_passing_thread(time_generate, generator, input_ids, args.tokens)
            for _ in range(args.repeats)
        ]
    engine = run_in_passing_thread(build_engine, generator, args)
    try:
        if not args.skip_solo:
            time_manager(engine, input_ids, 4)  # warm-up
            paged = [time_manager(engine, input_ids, args.tokens) for _ in range(args.repeats)]
            for name, runs in (("generate", plain), ("manager ", paged)):
                per_token, request = _spread([r[0] for r in runs]), _spread([r[1] for r in runs])
                print(f"solo {name} ms/token: {per_token}  request s: {request}")
        if args.concurrency:
            engine_wave(engine, generator, min(args.concurrency, 2), 4)  # warm-up
            rates, p50s = [], []
            for _ in range(args.repeats):
                rate, p50 = engine_wave(engine, generator, args.concurrency, args.tokens)
                rates.append(rate)
                p50s.append(p50)
            print(f"engine c={args.concurrency} tok/s: {_spread(rates)}  p50 s: {_spread(p50s)}")
        if args.profile:
            profiled_wave(engine, generator, args)
    finally:
        engine.close()


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
