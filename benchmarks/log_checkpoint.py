"""Log a ~1 GB checkpoint four ways, side by side, each in its own child process.

    python benchmarks/log_checkpoint.py [--size-gb 1.0] [--repeat 2] [--workdir DIR]

Modes:
  (a) tfx checkpoint   ``tfx.log_model("<dir>")``: weights never loaded
  (b) tfx pipeline     ``transformers.pipeline(...)`` then ``tfx.log_model(pipe)``
  (c) stock pipeline   ``transformers.pipeline(...)`` then ``mlflow.transformers.log_model(pipe)``
  (d) cp -r            copying the directory: the floor
  (e) tfx checkpoint of a ~1 MB model: MLflow's and the flavor's fixed cost per log call,
      so (a) - (e) is what the weights themselves cost

For each: the operation's wall time measured inside the child after its imports, the
child's whole wall time, and its peak RSS (``wait4``'s ru_maxrss). The checkpoint is a
random-weight Llama (float32) built once and cached in the work directory. Prints a
Markdown table with ratios to ``cp -r``.
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


@dataclass
class Sample:
    op_s: float
    total_s: float
    peak_rss_mb: float


def build_checkpoint(directory: Path, size_gb: float) -> Path:
    """A random-weight Llama checkpoint of about ``size_gb`` GB (float32), built once.

    Built in a child process: children forked later would otherwise report this
    process's peak memory as theirs.
    """
    target = directory / f"llama-{size_gb:g}gb"
    if not (target / "config.json").is_file():
        code = "import sys; from log_checkpoint import _build; _build(*sys.argv[1:])"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        subprocess.run([sys.executable, "-c", code, str(target), str(size_gb)], check=True, env=env)
    return target


def build_tiny_checkpoint(directory: Path) -> Path:
    target = directory / "llama-tiny"
    if not (target / "config.json").is_file():
        code = (
            "import sys, pathlib, tiny_models; tiny_models.build_llama(pathlib.Path(sys.argv[1]))"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=env)
    return target


def _build(target_dir: str, size_gb_text: str) -> None:
    target, size_gb = Path(target_dir), float(size_gb_text)
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_llama_tokenizer

    layers = max(1, round((size_gb * 1e9 / 4 - 65.6e6) / 12.8e6))
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted build
    transformers.LlamaForCausalLM(config).save_pretrained(partial)
    build_llama_tokenizer().save_pretrained(partial)
    partial.rename(target)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run one timed child; its JSON line ``{"op_s": ...}`` (if any) gives the operation time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    op_s = json.loads(lines[-1])["op_s"] if lines else total
    return Sample(op_s=op_s, total_s=total, peak_rss_mb=usage.ru_maxrss / 1024)


TINY_MODE = "tfx checkpoint, ~1 MB model (e)"


def bench_mode(name: str, checkpoint: Path, workdir: Path) -> Sample:
    store = workdir / "store" / name.split()[0] / str(time.time_ns())
    store.mkdir(parents=True)
    if name == "cp -r (d)":
        return run_child(["cp", "-r", str(checkpoint), str(store / "copy")])
    if name == TINY_MODE:
        name, checkpoint = "tfx checkpoint (a)", build_tiny_checkpoint(workdir)
    code = _CHILD_PRELUDE + textwrap.dedent(MODES[name]) + _CHILD_EPILOGUE
    uri = f"sqlite:///{store / 'mlflow.db'}"
    artifacts = (store / "artifacts").as_uri()
    try:
        return run_child([sys.executable, "-c", code, str(checkpoint), uri, artifacts])
    finally:
        shutil.rmtree(store, ignore_errors=True)


def bench_arguments(doc: str) -> argparse.Namespace:
    """``--size-gb``, ``--repeat`` and ``--workdir`` (created), shared by the benchmarks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tfx-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = bench_arguments(__doc__ or "")
    checkpoint = build_checkpoint(args.workdir, args.size_gb)
    size_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6
    names = ["cp -r (d)", *MODES, TINY_MODE]
    results: dict[str, list[Sample]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so drift in the page cache hits every mode alike
            results[name].append(bench_mode(name, checkpoint, args.workdir))
            print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    print_table(results, floor="cp -r (d)", heading=f"Checkpoint: {size_mb:.0f} MB of files")


def print_table(
    results: dict[str, list[Sample]], *, floor: str, heading: str, operation: str = "operation"
) -> None:
    """A Markdown table of medians, with each mode's ratio to the ``floor`` mode."""
    floor_s = statistics.median(s.op_s for s in results[floor])
    print(f"\n{heading}; median of {len(results[floor])} runs.\n")
    columns = [f"{operation} wall (s)", f"vs {floor.split(' (')[0]}", "child total wall (s)"]
    print(f"| mode | {' | '.join(columns)} | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, samples in results.items():
        op = statistics.median(s.op_s for s in samples)
        total = statistics.median(s.total_s for s in samples)
        rss = max(s.peak_rss_mb for s in samples)
        print(f"| {name} | {op:.2f} | {op / floor_s:.2f}x | {total:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
