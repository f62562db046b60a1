"""Checkpoint-path logging: no weights loaded, files copied or hard-linked, manifest exact."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import mlflow
import pytest
import transformers

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin import checkpoint
from mlflow_tfx_plugin.checkpoint import (
    WeightEntry,
    copy_checkpoint,
    hash_weight_files,
    inspect_checkpoint,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sharded_checkpoint(root: Path, shards: int = 4) -> Path:
    """config.json, an index and ``shards`` weight files of random bytes, each a few 1 MiB
    chunks and a partial one (the bytes are copied and hashed, never parsed)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    rng = random.Random(0)
    for i, name in enumerate(names):
        (root / name).write_bytes(rng.randbytes((2 << 20) + 1000 * i + 1))
    weight_map = {f"layer{i}.weight": name for i, name in enumerate(names)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def expected_manifest(root: Path) -> list[WeightEntry]:
    return [
        WeightEntry(path=p.name, size=p.stat().st_size, sha256=_sha256(p))
        for p in sorted(root.glob("*.safetensors"))
    ]


def test_inspect_reads_config_without_weights(tiny_llama_dir: Path):
    info = inspect_checkpoint(tiny_llama_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.weight_files == ("model.safetensors",)
    assert info.has_tokenizer


@pytest.mark.parametrize("hardlink", [True, False])
def test_copy_builds_exact_manifest(tiny_llama_dir: Path, tmp_path: Path, hardlink: bool):
    manifest = copy_checkpoint(
        inspect_checkpoint(tiny_llama_dir), tmp_path / "out", hardlink=hardlink
    )

    [entry] = manifest
    copied = tmp_path / "out" / entry.path
    assert entry.sha256 == _sha256(tiny_llama_dir / entry.path)
    assert entry.size == copied.stat().st_size
    same_inode = os.stat(copied).st_ino == os.stat(tiny_llama_dir / entry.path).st_ino
    assert same_inode is hardlink
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.json", "tokenizer.json"}


@pytest.mark.parametrize("hardlink", [True, False])
def test_sharded_copy_hashed_in_threads_matches_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hardlink: bool
):
    source = sharded_checkpoint(tmp_path / "ckpt")
    info = inspect_checkpoint(source)

    parallel = copy_checkpoint(info, tmp_path / "parallel", hardlink=hardlink)
    monkeypatch.setattr(checkpoint, "_MAX_HASH_THREADS", 1)
    serial = copy_checkpoint(info, tmp_path / "serial", hardlink=hardlink)

    assert parallel == serial == expected_manifest(source)
    for entry in parallel:  # what was written is what was hashed
        assert _sha256(tmp_path / "parallel" / entry.path) == entry.sha256
    assert (tmp_path / "parallel" / "model.safetensors.index.json").is_file()


def test_manifest_of_a_written_directory_is_exact_and_ordered(tmp_path: Path):
    source = sharded_checkpoint(tmp_path / "ckpt", shards=5)
    assert hash_weight_files(source) == expected_manifest(source)


def _hash_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tfx-hash")]


def test_failed_weight_copy_names_the_file_and_leaves_no_partial_copy(tmp_path: Path, mocker):
    info = inspect_checkpoint(sharded_checkpoint(tmp_path / "ckpt"))
    real = checkpoint._stream_copy

    def disk_full_on_third(src: Path, dst: Path, name: str, stop: threading.Event) -> WeightEntry:
        if name.startswith("model-00003"):
            dst.write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        return real(src, dst, name, stop)

    mocker.patch.object(checkpoint, "_stream_copy", side_effect=disk_full_on_third)
    with pytest.raises(OSError, match="No space left") as raised:
        copy_checkpoint(info, tmp_path / "out")

    notes = " ".join(getattr(raised.value, "__notes__", []))
    assert "'model-00003-of-00004.safetensors'" in notes and "free space" in notes
    assert not (tmp_path / "out" / "model-00003-of-00004.safetensors").exists()
    assert not _hash_workers()


def test_closing_a_pending_copy_stops_it_and_removes_partial_files(tmp_path: Path, monkeypatch):
    info = inspect_checkpoint(sharded_checkpoint(tmp_path / "ckpt"))
    monkeypatch.setattr(checkpoint, "_CHUNK_SIZE", 4096)  # many chunks: a copy to interrupt

    with checkpoint.start_copy_checkpoint(info, tmp_path / "out"):
        pass  # left without waiting for the result, as a failed save leaves it

    assert not _hash_workers()
    for entry in expected_manifest(info.path):  # each shard is whole or absent, never half
        copied = tmp_path / "out" / entry.path
        assert not copied.exists() or _sha256(copied) == entry.sha256


def test_a_save_failing_while_weights_are_copied_leaves_nothing(
    tiny_llama_dir: Path, tmp_path: Path, mocker
):
    from mlflow_tfx_plugin import saving

    mocker.patch.object(saving, "_write_environment", side_effect=RuntimeError("pip check failed"))
    with pytest.raises(RuntimeError, match="pip check failed"):
        tfx.save_model(tiny_llama_dir, tmp_path / "saved")

    assert not (tmp_path / "saved").exists()
    assert not _hash_workers()


def test_hashing_uses_at_most_four_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = sharded_checkpoint(tmp_path / "ckpt", shards=10)
    monkeypatch.setattr(checkpoint, "_usable_cpus", lambda: 64)
    threads: set[str] = set()
    real = checkpoint.sha256_of

    def recording(path: Path, stop: threading.Event | None = None) -> str:
        threads.add(threading.current_thread().name)
        return real(path, stop)

    monkeypatch.setattr(checkpoint, "sha256_of", recording)
    assert hash_weight_files(source) == expected_manifest(source)
    assert 1 <= len(threads) <= 4


def test_log_checkpoint_never_loads_weights(tiny_llama_dir: Path, tracking_uri: str, mocker):
    # A unit seam: from_pretrained must not run while logging a checkpoint path.
    spy = mocker.patch.object(
        transformers.PreTrainedModel, "from_pretrained", side_effect=AssertionError
    )

    with mlflow.start_run():
        info = tfx.log_model(str(tiny_llama_dir), name="model")

    spy.assert_not_called()
    conf = info.flavors["tfx"]
    assert conf["task"] == "text-generation"
    assert conf["model_class"] == "LlamaForCausalLM"
    assert conf["pipeline_class"] == "TextGenerationPipeline"
    assert conf["reference_only"] is False
    assert conf["source_model_name"] == str(tiny_llama_dir)
    assert conf["weights"] == [
        {
            "path": "model.safetensors",
            "size": (tiny_llama_dir / "model.safetensors").stat().st_size,
            "sha256": _sha256(tiny_llama_dir / "model.safetensors"),
        }
    ]


def test_saved_model_dir_is_a_plain_hf_checkpoint(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "saved")
    model_dir = tmp_path / "saved" / "model"

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    assert (model_dir / "generation_config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(p.suffix == ".bin" for p in model_dir.iterdir())


def test_save_model_does_not_hardlink_into_a_permanent_dir(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "saved")
    saved = tmp_path / "saved" / "model" / "model.safetensors"
    assert os.stat(saved).st_ino != os.stat(tiny_llama_dir / "model.safetensors").st_ino


def test_load_forwards_dtype_and_components(tiny_llama_dir: Path, tmp_path: Path):
    import torch

    tfx.save_model(tiny_llama_dir, tmp_path / "saved", torch_dtype=torch.bfloat16)
    components = tfx.load_model(str(tmp_path / "saved"), return_type="components")
    assert components["model"].dtype == torch.bfloat16
    assert components["task"] == "text-generation"
    assert "tokenizer" in components

    overridden = tfx.load_model(str(tmp_path / "saved"), torch_dtype="float32", device="cpu")
    assert overridden.model.dtype == torch.float32


def test_model_card_and_license_from_checkpoint(tiny_gpt2_dir: Path, tmp_path: Path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_gpt2_dir, ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny GPT-2\nA test model.\n")
    tfx.save_model(ckpt, tmp_path / "saved")

    assert "# Tiny GPT-2" in (tmp_path / "saved" / "model_card.md").read_text()
    assert "apache-2.0" in (tmp_path / "saved" / "LICENSE.txt").read_text()
