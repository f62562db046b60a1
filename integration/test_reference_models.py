"""Reference-only models against a local Hub double: log without weights, load at the pinned
commit, persist in place with sha256 checks, and stay loadable when things go wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mlflow_tfx_plugin as tfx
from integration.hub_server import LocalHub, patch_hf_client
from mlflow_tfx_plugin.errors import HubError, IntegrityError, InvalidInputError, ModelNotFoundError

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402

REPO = "org/tiny-gpt2"
GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture
def hub(checkpoint: Path, tmp_path: Path) -> Iterator[LocalHub]:
    """The Hub double serving REPO, with this test's own empty HF cache."""
    local_hub = LocalHub()
    local_hub.add_repo_from_dir(REPO, checkpoint)
    with local_hub.serve(), patch_hf_client(local_hub.endpoint, tmp_path / "hf-cache"):
        yield local_hub


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(
        "ref", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    mlflow.set_tracking_uri(None)


def _weight_gets(hub: LocalHub) -> list[Any]:
    return [
        r for r in hub.requests if r.method == "GET" and str(r.filename).endswith(".safetensors")
    ]


def _model_files(model_uri: str) -> set[str]:
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    return {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}


def test_repo_id_logs_a_pinned_reference_without_weights(hub: LocalHub, store: str):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")

    conf = info.flavors["tfx"]
    assert conf["reference_only"] is True
    assert conf["task"] == "text-generation", "inferred from the repo's config.json"
    assert conf["source_model_name"] == REPO
    assert conf["source_model_revision"] == hub.head(REPO)
    blob = hub.file_blob(REPO, "model.safetensors")
    assert conf["weights"] == [
        {"path": "model.safetensors", "size": blob.size, "sha256": blob.sha256}
    ]
    assert _weight_gets(hub) == [], "no weight file is downloaded"
    files = _model_files(info.model_uri)
    assert "model/config.json" in files
    assert not any(name.endswith(".safetensors") for name in files)


def test_revision_is_the_commit_not_the_branch(
    hub: LocalHub, checkpoint: Path, store: str, tmp_path: Path
):
    first = hub.head(REPO)
    second = _push_new_weights(hub, checkpoint, tmp_path)
    with mlflow.start_run():
        pinned = tfx.log_model(f"{REPO}@{first}", name="pinned")
        latest = tfx.log_model(REPO, name="latest")
    assert pinned.flavors["tfx"]["source_model_revision"] == first
    assert latest.flavors["tfx"]["source_model_revision"] == second

    loaded = tfx.load_model(pinned.model_uri)
    original = load_file(checkpoint / "model.safetensors")
    assert torch.equal(loaded.model.transformer.wte.weight, original["transformer.wte.weight"])


def _push_new_weights(hub: LocalHub, checkpoint: Path, tmp_path: Path) -> str:
    changed = tmp_path / "changed"
    changed.mkdir()
    weights = {k: v + 1 for k, v in load_file(checkpoint / "model.safetensors").items()}
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    return hub.add_repo(
        REPO, {"model.safetensors": changed / "model.safetensors"}, keep_existing=True
    )


def test_pipeline_reference_resolves_offline_from_the_cache(hub: LocalHub, store: str):
    pipe = transformers.pipeline("text-generation", model=REPO)
    commit = hub.head(REPO)
    hub.stop()  # the Hub is gone: the commit must come from the local cache

    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model", save_pretrained=False, task="llm/v1/chat")

    assert info.flavors["tfx"]["source_model_revision"] == commit
    assert info.flavors["tfx"]["inference_task"] == "llm/v1/chat"
    reloaded = tfx.load_model(info.model_uri)  # weights from the HF cache, offline
    assert reloaded("Hello", **GREEDY) == pipe("Hello", **GREEDY)


def test_unreachable_reference_names_repo_revision_and_fix(
    hub: LocalHub, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    endpoint = hub.endpoint
    hub.stop()
    # huggingface_hub retries a dead endpoint with 1-8 s back-offs (~45 s here); skip the
    # waits, not the retries.
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda _: None)
    with (
        patch_hf_client(endpoint, tmp_path / "empty-cache"),
        pytest.raises(ModelNotFoundError) as err,
    ):
        tfx.load_model(info.model_uri)
    message = err.value.message
    assert REPO in message and info.flavors["tfx"]["source_model_revision"] in message
    assert "HF_ENDPOINT" in message and "persist_pretrained_model" in message


def test_local_directory_has_nothing_to_reference(checkpoint: Path, tmp_path: Path):
    with pytest.raises(InvalidInputError, match="nothing to reference"):
        tfx.save_model(str(checkpoint), tmp_path / "m", save_pretrained=False)
    assert not (tmp_path / "m").exists()


def test_unknown_repo_is_a_clear_error(hub: LocalHub, tmp_path: Path):
    with pytest.raises(HubError, match="org/missing"):
        tfx.save_model("org/missing", tmp_path / "m")


def test_persist_in_place_then_load_without_the_hub(
    hub: LocalHub, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TFX_AUTO_PERSIST", "false")  # register as a plain reference
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model", registered_model_name="ref")
    result = tfx.persist_pretrained_model("models:/ref/1")
    endpoint = hub.endpoint
    hub.stop()

    assert result is not None and result.files == 1
    conf = mlflow.models.get_model_info("models:/ref/1").flavors["tfx"]
    assert conf["reference_only"] is False
    assert conf["weights"] == info.flavors["tfx"]["weights"]
    assert "model/model.safetensors" in _model_files(info.model_uri)
    with patch_hf_client(endpoint, tmp_path / "empty-cache"):
        assert tfx.load_model("models:/ref/1")("Hi", **GREEDY)
        assert tfx.persist_pretrained_model(info.model_uri) is None, "idempotent"


def test_persist_aborts_on_corrupt_bytes(hub: LocalHub, store: str):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    hub.set_faults(path_glob="*.safetensors", corrupt=True)

    with pytest.raises(IntegrityError, match="sha256"):
        tfx.persist_pretrained_model(info.model_uri)

    assert mlflow.models.get_model_info(info.model_uri).flavors["tfx"]["reference_only"] is True
    assert not any(name.endswith(".safetensors") for name in _model_files(info.model_uri))


def test_persist_stock_reference_model(hub: LocalHub, store: str):
    pipe = transformers.pipeline("text-generation", model=REPO)
    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            pipe, name="model", save_pretrained=False, pip_requirements=["transformers"]
        )
    assert tfx.persist_pretrained_model(info.model_uri) is not None
    hub.stop()

    conf = mlflow.models.get_model_info(info.model_uri).flavors["transformers"]
    assert conf["model_binary"] == "model"
    assert "source_model_revision" not in conf
    reloaded = mlflow.transformers.load_model(info.model_uri)  # stock still loads it
    assert reloaded("Hello", **GREEDY) == pipe("Hello", **GREEDY)


def test_a_corrupt_download_leaves_a_stock_reference_as_it_was(
    hub: LocalHub, store: str, tmp_path: Path
):
    """Weights upload while they are hashed; on a mismatch they are deleted again, and the
    snapshot's other files (which overwrite stock's components) were never uploaded."""
    pipe = transformers.pipeline("text-generation", model=REPO)
    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            pipe, name="model", save_pretrained=False, pip_requirements=["transformers"]
        )
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    before = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    hub.set_faults(path_glob="*.safetensors", corrupt=True)

    with (
        patch_hf_client(hub.endpoint, tmp_path / "fresh-cache"),  # the pipeline's is complete
        pytest.raises(IntegrityError, match="sha256"),
    ):
        tfx.persist_pretrained_model(info.model_uri)

    after = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert {str(p.relative_to(after)): p.read_bytes() for p in after.rglob("*") if p.is_file()} == (
        before
    )


def test_peft_reference_persists_base_weights_under_base_keys(
    hub: LocalHub, checkpoint: Path, store: str
):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(REPO)
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = pipe("Hello", **GREEDY)

    with mlflow.start_run():
        info = tfx.log_model(pipe, name="model", save_pretrained=False)
    assert info.flavors["tfx"]["source_model_name"] == REPO
    assert "peft/adapter_config.json" in _model_files(info.model_uri)
    tfx.persist_pretrained_model(info.model_uri)

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    persisted = set(load_file(local / "model" / "model.safetensors"))
    assert persisted == set(load_file(checkpoint / "model.safetensors")), "base keys, no LoRA names"
    reloaded = tfx.load_model(info.model_uri)
    assert isinstance(reloaded.model, peft.PeftModel)
    assert reloaded("Hello", **GREEDY) == expected


def test_registering_a_stock_reference_persists_it(hub: LocalHub, store: str):
    pipe = transformers.pipeline("text-generation", model=REPO)
    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            pipe, name="model", save_pretrained=False, pip_requirements=["transformers"]
        )
    version = mlflow.register_model(info.model_uri, "stock-ref")

    conf = mlflow.models.get_model_info(f"models:/stock-ref/{version.version}").flavors
    assert conf["transformers"]["model_binary"] == "model"
    reloaded = mlflow.transformers.load_model(f"models:/stock-ref/{version.version}")
    assert reloaded("Hello", **GREEDY) == pipe("Hello", **GREEDY)


def test_persist_survives_a_dropped_connection(
    hub: LocalHub, store: str, monkeypatch: pytest.MonkeyPatch
):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    hub.set_faults(path_glob="*.safetensors", drop_after_bytes=50_000, times=1)
    monkeypatch.setattr(
        "huggingface_hub.file_download.time.sleep", lambda _: None
    )  # its retry wait

    assert tfx.persist_pretrained_model(info.model_uri) is not None

    dropped = [r for r in hub.requests if r.dropped]
    assert dropped, "the first download was cut off"
    conf = mlflow.models.get_model_info(info.model_uri).flavors["tfx"]
    assert conf["reference_only"] is False
    assert conf["weights"] == info.flavors["tfx"]["weights"], "verified against the Hub's sha256"


def test_checkpoint_inside_the_hf_cache_is_a_reference(hub: LocalHub, tmp_path: Path):
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(REPO)
    tfx.save_model(snapshot, tmp_path / "m", save_pretrained=False)

    conf = mlflow.models.Model.load(str(tmp_path / "m" / "MLmodel")).flavors["tfx"]
    assert conf["reference_only"] is True
    assert conf["source_model_name"] == REPO
    assert conf["source_model_revision"] == hub.head(REPO)
    assert not (tmp_path / "m" / "model" / "model.safetensors").exists()
