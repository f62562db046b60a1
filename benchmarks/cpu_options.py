"""CPU options side by side: the speed and the quality cost of each, on the serving engine.

    python benchmarks/cpu_options.py                    # every variant, 2 rounds
    python benchmarks/cpu_options.py --only fp32,bf16 --rounds 3

Variants (``--only`` takes these keys), SmolLM2-135M-Instruct through
:class:`ContinuousBatchingEngine` as a deployment runs it (default settings, greedy):

  fp32         float32, the default
  bf16         ``-C torch_dtype=bfloat16``: weights and compute in bfloat16
  int8         int8 dynamic quantization of every linear layer
               (``torch.ao.quantization.quantize_dynamic``, weights int8, activations
               quantized per batch at run time)
  prefix-off   float32 with ``-C prefix_caching=false``: no KV pages shared between
               prompts with a common prefix

Each variant runs in a child process of its own (one model, one engine), the order rotating
between rounds. Each child measures:

  perplexity   of the model on a fixed English text (``TEXT``, teacher-forced, one pass):
               the quality cost; the same for every round
  c=1          3 requests one after the other, 32 forced tokens: median request seconds
  c=16         2 waves of 16 different questions at once, 32 forced tokens: tok/s
  shared       16 requests at once that share a ~600-token system prompt, 8 tokens each:
               wave seconds (what prefix caching is for)

Reported: medians over rounds, ratios to fp32 from the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT / "examples"))

VARIANTS = ("fp32", "bf16", "int8", "prefix-off")
NEW_TOKENS = 32
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in "
    "Europe experimented with two-wheeled machines that riders pushed along with their feet. "
    "Pedals attached to the front wheel came decades later, and the high-wheeled designs that "
    "followed were fast but dangerous. The safety bicycle, with two wheels of equal size and a "
    "chain driving the rear wheel, made cycling practical for millions of people. Pneumatic "
    "tires softened the ride, and within a few years bicycles changed how people travelled to "
    "work, how cities were planned, and even how women dressed. Today the bicycle remains one "
    "of the most efficient machines ever built: a rider converts food energy into motion more "
    "efficiently than any car, train or animal, and the basic design has changed remarkably "
    "little in more than a century."
)
SYSTEM = " ".join(
    f"Rule {i}: answer politely, briefly and accurately, and say when you are unsure."
    for i in range(1, 41)
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated variants: " + ",".join(VARIANTS))
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.variants = [v for v in (args.only.split(",") if args.only else VARIANTS) if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {VARIANTS}")
    return args


# --------------------------------------------------------------------------- the child


def _child(variant: str) -> None:
    """Load one variant, measure it, print one JSON line."""
    import serve
    import torch
    import transformers
    from smollm2 import ensure_smollm2_checkpoint

    from mlflow_tfx_plugin.deployments.engine import ContinuousBatchingEngine, EngineSettings
    from mlflow_tfx_plugin.deployments.engine.threads import run_in_passing_thread
    from mlflow_tfx_plugin.generation import TextGenerator
    from mlflow_tfx_plugin.protocol import GenerationParams

    transformers.utils.logging.disable_progress_bar()
    checkpoint = ensure_smollm2_checkpoint()

    def load() -> Any:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
        if variant == "int8":
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        return TextGenerator(model, tokenizer)

    generator = run_in_passing_thread(load)
    perplexity = run_in_passing_thread(_perplexity, generator)
    settings = EngineSettings(prefix_caching=variant != "prefix-off")
    engine = run_in_passing_thread(ContinuousBatchingEngine, generator, settings)
    forced = GenerationParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    short = GenerationParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def chat(question: str, system: str | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return generator.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    async def wave(prompts: list[str], params: GenerationParams) -> tuple[float, int]:
        began = time.perf_counter()
        results = await asyncio.gather(
            *(engine.generate(p, params, add_special_tokens=False) for p in prompts)
        )
        tokens = sum(r.completions[0].completion_tokens for r in results)
        return time.perf_counter() - began, tokens

    questions = [chat(q) for q in serve.QUESTIONS]
    shared = [chat(q, SYSTEM) for q in serve.QUESTIONS]
    try:
        asyncio.run(wave(questions[:2], short))  # warm-up
        lone = [asyncio.run(wave([questions[i]], forced))[0] for i in range(3)]
        rates = []
        for _ in range(2):
            wall, tokens = asyncio.run(wave(questions, forced))
            rates.append(tokens / wall)
        shared_walls = [asyncio.run(wave(shared, short))[0] for _ in range(2)]
    finally:
        engine.close()
    result = {
        "variant": variant,
        "perplexity": perplexity,
        "c1_request_s": statistics.median(lone),
        "c16_tok_s": statistics.median(rates),
        "shared_wave_s": min(shared_walls),  # the first wave fills the cache for prefix-on
        "shared_prompt_tokens": len(generator.encode(shared[0], add_special_tokens=False)),
    }
    print(json.dumps(result))


def _perplexity(generator: Any) -> float:
    import torch

    ids = torch.tensor([generator.encode(TEXT, add_special_tokens=False)])
    with torch.inference_mode():
        loss = generator.model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss.float()))


# --------------------------------------------------------------------------- the parent


def run_variant(variant: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(ROOT)])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = "import sys, cpu_options; cpu_options._child(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, variant], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"variant": variant, "unavailable": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    args = parse_arguments()
    rounds: list[dict[str, dict[str, Any]]] = []
    load_before = os.getloadavg()[0]
    for number in range(args.rounds):
        shift = number % len(args.variants)
        order = args.variants[shift:] + args.variants[:shift]
        measured = {}
        for variant in order:
            print(f"round {number + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            measured[variant] = run_variant(variant)
            print(f"  {measured[variant]}", file=sys.stderr, flush=True)
        rounds.append(measured)
    print_report(args.variants, rounds, load_before)
    if args.output:
        args.output.write_text(json.dumps(rounds, indent=2))


def print_report(variants: list[str], rounds: list[dict[str, Any]], load_before: float) -> None:
    print(
        f"\nSmolLM2-135M-Instruct, {len(rounds)} round(s), medians; load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after; ratios to fp32 of the "
        "same round.\n"
    )
    print(
        "| variant | perplexity | c=1 request (s) | vs fp32 | c=16 tok/s | vs fp32 | "
        "shared-prefix wave (s) | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        runs = [r[variant] for r in rounds if _measured(r, variant)]
        if not runs:
            print(f"| {variant} | n/a ({rounds[0][variant]['unavailable']}) |" + " |" * 6)
            continue
        cells = [f"{statistics.median(r['perplexity'] for r in runs):.3f}"]
        for key in ("c1_request_s", "c16_tok_s", "shared_wave_s"):
            cells.append(f"{statistics.median(r[key] for r in runs):.2f}")
            ratios = [
                r[variant][key] / r["fp32"][key]
                for r in rounds
                if "fp32" in r
                and "unavailable" not in r[variant]
                and "unavailable" not in r["fp32"]
            ]
            cells.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    tokens = [r[v]["shared_prompt_tokens"] for r in rounds for v in r if _measured(r, v)]
    print(f"\nShared-prefix prompts: {tokens[0] if tokens else '?'} tokens each.")


def _measured(round_: dict[str, Any], variant: str) -> bool:
    return variant in round_ and "unavailable" not in round_[variant]


if __name__ == "__main__":
    main()
