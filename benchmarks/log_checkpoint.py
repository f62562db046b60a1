"""Log a ~1 GB checkpoint four ways, side by side, each in its own child process.

    python benchmarks/log_checkpoint.py [--size-gb 1.0] [--shards 1] [--repeat 2]
        [--only a,d,e] [--baseline DIR] [--workdir DIR]

Modes:
  (a) tfx checkpoint   ``tfx.log_model("<dir>")``: weights never loaded
  (b) tfx pipeline     ``transformers.pipeline(...)`` then ``tfx.log_model(pipe)``
  (c) stock pipeline   ``transformers.pipeline(...)`` then ``mlflow.transformers.log_model(pipe)``
  (d) cp -r            copying the directory: the floor
  (e) tfx checkpoint of a ~1 MB model: MLflow's and the flavor's fixed cost per log call,
      so (a) - (e) is what the weights themselves cost (printed per GB after the table)

For each: the operation's wall time measured inside the child after its imports, the
child's whole wall time, and its peak RSS (``wait4``'s ru_maxrss). The checkpoint is a
random-weight Llama (float32, ``--shards`` safetensors files) with a small BPE tokenizer,
built here once and cached in the work directory. ``--baseline DIR`` runs the tfx modes a
second time with another copy of the package first on ``PYTHONPATH`` (``DIR`` holds a
``mlflow_tfx_plugin`` directory, e.g. ``git archive <commit> mlflow_tfx_plugin | tar -x -C
DIR``), interleaved with the others. Before every run (untimed) the checkpoint is read
into the page cache and dirty pages are flushed: no run pays for the one before it.
Prints a Markdown table with ratios to ``cp -r``, then fixed and per-GB costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD_PRELUDE = """
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import mlflow, transformers
mlflow.set_tracking_uri(sys.argv[2])
experiment_id = mlflow.create_experiment("bench", artifact_location=sys.argv[3])
mlflow.set_experiment(experiment_id=experiment_id)
checkpoint = sys.argv[1]
start = time.perf_counter()
"""

MODES = {
    "tfx checkpoint (a)": """
import mlflow_tfx_plugin as tfx
with mlflow.start_run():
    tfx.log_model(checkpoint, name="model", task="text-generation")
""",
    "tfx pipeline (b)": """
import mlflow_tfx_plugin as tfx
pipe = transformers.pipeline("text-generation", model=checkpoint)
with mlflow.start_run():
    tfx.log_model(pipe, name="model")
""",
    "stock mlflow.transformers pipeline (c)": """
pipe = transformers.pipeline("text-generation", model=checkpoint)
with mlflow.start_run():
    # Stock default requirements import torchvision and fail without it: pass them.
    mlflow.transformers.log_model(pipe, name="model", pip_requirements=["transformers", "torch"])
""",
}
_CHILD_EPILOGUE = """
print(json.dumps({"op_s": time.perf_counter() - start}))
"""
FLOOR = "cp -r (d)"
TINY_MODE = "tfx checkpoint, ~1 MB model (e)"
BASELINE_SUFFIX = " [baseline]"

_TOKENIZER_CORPUS = [
    "Paris is the capital of France.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! Hello, how are you today?",
    "You are a helpful assistant. Answer the question briefly.",
    "The quick brown fox jumps over the lazy dog.",
]
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Sample:
    op_s: float
    total_s: float
    peak_rss_mb: float


def build_checkpoint(directory: Path, size_gb: float, shards: int = 1) -> Path:
    """A random-weight Llama checkpoint of about ``size_gb`` GB (float32) in ``shards``
    safetensors files, built once.

    Built in a child process: children forked later would otherwise report this
    process's peak memory as theirs.
    """
    suffix = f"-{shards}shards" if shards > 1 else ""
    target = directory / (f"llama-{size_gb:g}gb{suffix}" if size_gb > 0 else "llama-tiny")
    if not (target / "config.json").is_file():
        code = "import sys; from log_checkpoint import _build; _build(*sys.argv[1:])"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        args = [str(target), str(size_gb), str(shards)]
        subprocess.run([sys.executable, "-c", code, *args], check=True, env=env)
    return target


def build_tiny_checkpoint(directory: Path) -> Path:
    """A ~1 MB Llama checkpoint (2 layers, 32 wide) with the same tokenizer."""
    return build_checkpoint(directory, 0.0)


def _build(target_dir: str, size_gb_text: str, shards_text: str = "1") -> None:
    target, size_gb, shards = Path(target_dir), float(size_gb_text), int(shards_text)
    import torch
    import transformers

    tokenizer = _tokenizer()
    if size_gb > 0:
        layers = max(1, round((size_gb * 1e9 / 4 - 65.6e6) / 12.8e6))
        shape = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16}
    else:
        layers = 2
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    config = transformers.LlamaConfig(
        vocab_size=32000 if size_gb > 0 else len(tokenizer),
        num_hidden_layers=layers,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted build
    # 5% over an even split, so tensor boundaries still give exactly ``shards`` files
    shard_mb = max(1, round(size_gb * 1e3 / shards * 1.05))
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(partial, max_shard_size=f"{shard_mb}MB" if shards > 1 else "1000GB")
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def _tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on a few lines, with a ChatML chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Sample:
    """Run one timed child; its JSON line ``{"op_s": ...}`` (if any) gives the operation time."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    op_s = json.loads(lines[-1])["op_s"] if lines else total
    return Sample(op_s=op_s, total_s=total, peak_rss_mb=usage.ru_maxrss / 1024)


def child_env(
    name: str, baseline: Path | None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a mode's child: ``baseline`` first on PYTHONPATH for its twin."""
    env = dict(base if base is not None else os.environ)
    if name.endswith(BASELINE_SUFFIX):
        assert baseline is not None
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline), env.get("PYTHONPATH")]))
    return env


def bench_mode(name: str, checkpoint: Path, workdir: Path, baseline: Path | None = None) -> Sample:
    store = workdir / "store" / name.split()[0] / str(time.time_ns())
    store.mkdir(parents=True)
    env = child_env(name, baseline)
    mode = name.removesuffix(BASELINE_SUFFIX)
    if mode == TINY_MODE:
        mode, checkpoint = "tfx checkpoint (a)", build_tiny_checkpoint(workdir)
    code = _CHILD_PRELUDE + textwrap.dedent(MODES.get(mode, "")) + _CHILD_EPILOGUE
    uri = f"sqlite:///{store / 'mlflow.db'}"
    artifacts = (store / "artifacts").as_uri()
    settle(checkpoint.rglob("*"))
    try:
        if name == FLOOR:
            return run_child(["cp", "-r", str(checkpoint), str(store / "copy")])
        # cwd: ``python -c`` puts it first on sys.path, ahead of PYTHONPATH
        cmd = [sys.executable, "-c", code, str(checkpoint), uri, artifacts]
        return run_child(cmd, env=env, cwd=store)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def settle(inputs: Iterable[Path]) -> None:
    """Untimed, before every run: read the input files, so each run finds them in the page
    cache whichever mode ran before it (a shared machine evicts them), and flush dirty
    pages, so no run pays for the previous one's writes."""
    buffer = bytearray(8 << 20)
    for path in inputs:
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    os.sync()


def bench_arguments(doc: str) -> argparse.Namespace:
    """The options the benchmarks share; ``--workdir`` is created."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=1, help="safetensors files to split into")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", help="mode letters to run, e.g. 'a,d,e' (default: all)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a directory holding another mlflow_tfx_plugin: its tfx modes run too",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tfx-bench")
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "mlflow_tfx_plugin" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline} holds no mlflow_tfx_plugin/__init__.py")
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def selected_modes(names: list[str], args: argparse.Namespace) -> list[str]:
    """``names`` narrowed to ``--only``, each tfx mode followed by its ``--baseline`` twin."""
    letters = set(args.only.split(",")) if args.only else None
    chosen = [n for n in names if letters is None or n.rsplit("(", 1)[-1].rstrip(")") in letters]
    if not args.baseline:
        return chosen
    return [twin for n in chosen for twin in ([n, n + BASELINE_SUFFIX] if "tfx" in n else [n])]


def main() -> None:
    args = bench_arguments(__doc__ or "")
    checkpoint = build_checkpoint(args.workdir, args.size_gb, args.shards)
    files = sorted(checkpoint.iterdir())
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    shards = sum(f.suffix == ".safetensors" for f in files)
    names = selected_modes([FLOOR, *MODES, TINY_MODE], args)
    results: dict[str, list[Sample]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so drift in the page cache hits every mode alike
            results[name].append(bench_mode(name, checkpoint, args.workdir, args.baseline))
            print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    heading = f"Checkpoint: {size_mb:.0f} MB of files, {shards} safetensors file(s)"
    print_table(results, floor=FLOOR, heading=heading)
    print_costs(
        results, floor=FLOOR, pairs={"tfx checkpoint (a)": TINY_MODE}, size_gb=size_mb / 1e3
    )


def print_table(
    results: dict[str, list[Sample]], *, floor: str, heading: str, operation: str = "operation"
) -> None:
    """A Markdown table of medians, with each mode's ratio to the ``floor`` mode (when it
    ran: ``--only`` may leave it out)."""
    floor_s = statistics.median(s.op_s for s in results[floor]) if floor in results else None
    print(f"\n{heading}; median of {len(next(iter(results.values())))} runs.\n")
    columns = [f"{operation} wall (s)", f"vs {floor.split(' (')[0]}", "child total wall (s)"]
    print(f"| mode | {' | '.join(columns)} | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, samples in results.items():
        op = statistics.median(s.op_s for s in samples)
        total = statistics.median(s.total_s for s in samples)
        rss = max(s.peak_rss_mb for s in samples)
        ratio = f"{op / floor_s:.2f}x" if floor_s else "-"
        print(f"| {name} | {op:.2f} | {ratio} | {total:.2f} | {rss:.0f} |")


def print_costs(
    results: dict[str, list[Sample]], *, floor: str, pairs: dict[str, str], size_gb: float
) -> None:
    """Fixed and per-GB cost of each ``full`` mode whose ``tiny`` twin (a ~1 MB model) ran:
    fixed = tiny's median, per GB = (full - tiny) / size; the floor's per GB beside them."""
    median = {name: statistics.median(s.op_s for s in samples) for name, samples in results.items()}
    if floor in median:
        print(f"\n- {floor}: {median[floor] / size_gb:.2f} s/GB")
    for full, tiny in pairs.items():
        for suffix in ("", BASELINE_SUFFIX):
            if full + suffix in median and tiny + suffix in median:
                fixed = median[tiny + suffix]
                per_gb = (median[full + suffix] - fixed) / size_gb
                print(f"- {full}{suffix}: fixed {fixed:.2f} s + {per_gb:.2f} s/GB")


if __name__ == "__main__":
    main()
