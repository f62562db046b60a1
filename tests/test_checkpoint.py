"""Checkpoint-path logging: no weights loaded, files copied, hard-linked or uploaded while
hashed, manifest exact, nothing left behind on failure."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

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
    return [t for t in threading.enumerate() if t.name.startswith(("tfx-hash", "tfx-upload"))]


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


def _loggable_shards(root: Path, shards: int = 4) -> Path:
    """:func:`sharded_checkpoint` with a config that names its architecture (logging infers
    the pipeline from it; the random bytes are uploaded and hashed, never parsed)."""
    sharded_checkpoint(root, shards)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _stored_weights(tracking_uri: str) -> list[Path]:
    """Weight files in the tracking fixture's artifact root (``tmp_path/artifacts``)."""
    root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    return sorted(root.rglob("*.safetensors"))


def _weight_uploads(monkeypatch: pytest.MonkeyPatch, before_upload: Any = None) -> threading.Event:
    """Wrap the local store's ``log_artifacts``; the event is set once a weight file stored.

    ``before_upload(local_dir)`` runs first, to fail an upload the way a full store would
    (which cannot be made to happen here for real)."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    stored = threading.Event()
    real = LocalArtifactRepository.log_artifacts

    def noted(self: Any, local_dir: str, artifact_path: str | None = None) -> None:
        weights = any(Path(local_dir).rglob("*.safetensors"))
        if weights and before_upload is not None:
            before_upload(local_dir)
        real(self, local_dir, artifact_path)
        if weights:
            stored.set()

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", noted)
    return stored


def test_logged_checkpoint_weights_upload_while_hashed_and_load(
    tiny_llama_dir: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
):
    """One read of the weights: a hash that waited for the upload to finish would wait
    forever if MLflow copied them after the hash, as it copies its temporary directory."""
    stored = _weight_uploads(monkeypatch)
    real_sha256 = checkpoint.sha256_of

    def sha256_once_stored(path: Path, stop: threading.Event | None = None) -> str:
        if not stored.wait(timeout=30):
            raise AssertionError("the weights were not uploaded while they were hashed")
        return real_sha256(path, stop)

    monkeypatch.setattr(checkpoint, "sha256_of", sha256_once_stored)
    with mlflow.start_run():
        info = tfx.log_model(str(tiny_llama_dir), name="model")

    weights = tiny_llama_dir / "model.safetensors"
    [uploaded] = _stored_weights(tracking_uri)
    assert uploaded.parent.name == "model" and _sha256(uploaded) == _sha256(weights)
    assert info.flavors["tfx"]["weights"][0]["sha256"] == _sha256(weights)
    mlmodel = mlflow.models.Model.load(info.model_uri)
    assert mlmodel.model_size_bytes > weights.stat().st_size
    pipe = tfx.load_model(info.model_uri)
    assert pipe("Hello", max_new_tokens=2, do_sample=False)


def test_a_failed_weight_upload_logs_nothing_and_names_the_file(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
):
    ckpt = _loggable_shards(tmp_path / "ckpt")

    def full_on_the_third_shard(local_dir: str) -> None:
        if (Path(local_dir) / "model-00003-of-00004.safetensors").exists():
            raise OSError(28, "No space left on device")

    _weight_uploads(monkeypatch, before_upload=full_on_the_third_shard)
    with mlflow.start_run(), pytest.raises(OSError, match="No space left") as raised:
        tfx.log_model(str(ckpt), name="model", task="text-generation")

    notes = " ".join(raised.value.__notes__)
    assert (
        "Uploading 'model-00003-of-00004.safetensors'" in notes and "log the model again" in notes
    )
    assert _stored_weights(tracking_uri) == [], "the shards already stored are deleted again"
    assert not _hash_workers()


def test_a_failed_hash_deletes_the_uploaded_weights(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
):
    ckpt = _loggable_shards(tmp_path / "ckpt", shards=2)
    stored = _weight_uploads(monkeypatch)

    def unreadable_once_stored(path: Path, stop: threading.Event | None = None) -> str:
        stored.wait(timeout=30)
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "sha256_of", unreadable_once_stored)
    with mlflow.start_run(), pytest.raises(OSError, match="Input/output error"):
        tfx.log_model(str(ckpt), name="model", task="text-generation")

    assert stored.is_set()
    assert _stored_weights(tracking_uri) == []
    assert not _hash_workers()
