"""Turn what the user passed to ``save_model`` into a saved MLflow model on disk.

:func:`save` runs a save from start to end: :func:`resolve_source` validates the input
(pipeline, component dict, checkpoint path or Hub repo id) and the task before anything is
written; :func:`write_model_files` writes the checkpoint directory and returns the weights
manifest, still being hashed in worker threads while the environment files, signature and
input example are written; MLmodel comes last. A failure after writing started removes the
directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import mlflow
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.models.model import MLMODEL_FILE_NAME

from mlflow_tfx_plugin import _compat
from mlflow_tfx_plugin import components as comp
from mlflow_tfx_plugin.checkpoint import (
    ADAPTER_CONFIG,
    TOKENIZER_FILES,
    CheckpointInfo,
    PendingManifest,
    WeightEntry,
    checked_base_model_path,
    inspect_checkpoint,
    is_weight_file,
    start_copy_checkpoint,
    start_hash_weight_files,
)
from mlflow_tfx_plugin.errors import CheckpointError, InvalidInputError, UnsupportedTaskError
from mlflow_tfx_plugin.flavor_config import (
    FLAVOR_NAME,
    MODEL_DIR,
    PEFT_DIR,
    PROMPT_TEMPLATE_KEY,
    STOCK_COMPONENTS_DIR,
    STOCK_FLAVOR_NAME,
    FlavorConfig,
)
from mlflow_tfx_plugin.hub import (
    SMALL_FILE_IGNORE,
    HubReference,
    download_files,
    looks_like_repo_id,
    parse_repo_reference,
    reference_from_cache_path,
    resolve_reference,
    weight_manifest,
)
from mlflow_tfx_plugin.loading import as_torch_dtype
from mlflow_tfx_plugin.model_card import write_model_card
from mlflow_tfx_plugin.pyfunc import to_python
from mlflow_tfx_plugin.requirements import get_default_pip_requirements
from mlflow_tfx_plugin.tasks import (
    ADAPTERS,
    TASK_ALIASES,
    LLMAdapter,
    TaskAdapter,
    get_adapter,
    infer_task,
    model_can_do,
)
from mlflow_tfx_plugin.tasks.base import Runner
from mlflow_tfx_plugin.uploads import Upload, delete_uploads, upload_files, uploaded_artifact

_logger = logging.getLogger(__name__)

#: Tokenizer files copied for stock ``mlflow.transformers`` (it reads components/tokenizer/).
_STOCK_TOKENIZER_FILES = (
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "tokenizer.model",
)


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """What ``save_model`` was asked to do besides choosing the model and its task.

    :func:`save` validates these; ``torch_dtype`` is then the dtype's name and
    ``prompt_template`` a checked template.
    """

    torch_dtype: Any = None
    model_config: Mapping[str, Any] = field(default_factory=dict)
    prompt_template: Any = None
    signature: ModelSignature | None = None
    input_example: Any = None
    metadata: dict[str, Any] | None = None
    code_paths: list[str] | None = None
    #: Set by ``log_model``: ``path`` is MLflow's temporary directory, which it copies into
    #: ``mlflow_model.artifact_path``, the logged model's artifact location.
    for_log_model: bool = False
    convert_pickle_weights: bool = False
    model_card: Any = None
    conda_env: Any = None
    pip_requirements: list[str] | str | None = None
    extra_pip_requirements: list[str] | str | None = None


def save(
    transformers_model: Any,
    path: str | os.PathLike[str],
    *,
    task: str | None,
    save_pretrained: bool,
    processor: Any,
    base_model_path: str | os.PathLike[str] | None,
    mlflow_model: Model | None,
    options: SaveOptions,
) -> None:
    """Validate everything, then write the model to ``path`` (see ``flavor.save_model``).

    Raises:
        InvalidInputError: bad arguments. No partially written model is left behind.
    """
    _check_environment(options)
    _check_prompt_template_task(
        options.prompt_template, task or getattr(transformers_model, "task", None)
    )
    source = resolve_source(
        transformers_model,
        task=task,
        processor=processor,
        save_pretrained=save_pretrained,
        base_model_path=base_model_path,
    )
    mlflow_model = mlflow_model or Model()
    _check_metadata_task(mlflow_model.metadata or options.metadata, source)
    template = _validate_prompt_template(options.prompt_template, source.adapter)
    target = Path(path).absolute()
    _compat.validate_and_prepare_target_save_path(str(target))
    store = _weights_store(source, mlflow_model) if options.for_log_model else None
    try:
        checked = replace(
            options,
            torch_dtype=_dtype_name(options.torch_dtype) or source.model_dtype,
            model_config=dict(options.model_config or {}),
            prompt_template=template,
        )
        _write_model(source, target, mlflow_model=mlflow_model, options=checked, store=store)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if store is not None:
            store.delete()
        raise


@dataclass(kw_only=True)
class ModelSource:
    """A validated model to save: in-memory components or a checkpoint on disk."""

    adapter: type[TaskAdapter]
    components: dict[str, Any] | None = None
    pipeline: Any = None
    checkpoint: CheckpointInfo | None = None
    source_model_name: str | None = None
    model_class: str | None = None
    component_classes: dict[str, str]
    is_peft: bool = False
    base_model_name: str | None = None
    #: Set for reference-only models: the repo and commit the weights come from.
    reference: HubReference | None = None
    #: For a Hub repo id input: the downloaded small files (config, tokenizer, ...).
    small_files_dir: Path | None = None
    #: For a PEFT model saved with ``base_model_path=``: the local base checkpoint, whose
    #: weights are referenced, not saved.
    local_base_model_path: Path | None = None

    @property
    def model_dtype(self) -> str | None:
        """The in-memory model's dtype when it is not the default float32."""
        dtype = getattr((self.components or {}).get(comp.MODEL), "dtype", None)
        name = str(dtype).removeprefix("torch.") if dtype is not None else None
        return None if name in (None, "float32") else name

    @property
    def card_dir(self) -> Path | None:
        """A local directory holding the model's README.md / LICENSE, if known."""
        if self.checkpoint is not None:
            return self.checkpoint.path
        if self.source_model_name and os.path.isdir(self.source_model_name):
            return Path(self.source_model_name)
        return None

    @property
    def inference_task(self) -> str | None:
        return self.adapter.task if issubclass(self.adapter, LLMAdapter) else None

    @property
    def native_task(self) -> str:
        return (
            self.adapter.native_task if issubclass(self.adapter, LLMAdapter) else self.adapter.task
        )

    def flavor_config(self, *, weights: list[WeightEntry], torch_dtype: str | None) -> FlavorConfig:
        return FlavorConfig(
            task=self.native_task,
            inference_task=self.inference_task,
            task_options=self.adapter.read_task_options(self.card_dir),
            source_model_name=self.reference.repo_id if self.reference else self.source_model_name,
            source_model_revision=self.reference.commit if self.reference else None,
            reference_only=self.reference is not None,
            torch_dtype=torch_dtype,
            pipeline_class=(
                type(self.pipeline).__name__
                if self.pipeline is not None
                else self.adapter.pipeline_class_name()
            ),
            model_class=self.model_class,
            components=self.component_classes,
            peft_adapter_dir=PEFT_DIR if self.is_peft else None,
            base_model_name=self.base_model_name,
            local_base_model_path=(
                str(self.local_base_model_path) if self.local_base_model_path else None
            ),
            weights=weights,
        )


def resolve_source(
    transformers_model: Any,
    *,
    task: str | None,
    processor: Any = None,
    save_pretrained: bool = True,
    base_model_path: str | os.PathLike[str] | None = None,
) -> ModelSource:
    """Validate the model argument and the task; nothing is written yet.

    ``save_pretrained=False`` (or a Hub repo id string) makes a reference-only source: the
    weights stay on the Hub, pinned to the commit they came from. ``base_model_path`` (PEFT
    models only) keeps the adapter and references a local base checkpoint instead.

    Raises:
        InvalidInputError: unsupported model type, unknown task, or a task the model
            cannot perform.
        CheckpointError: a checkpoint directory that is incomplete.
        HubError: a reference that cannot be pinned to a commit.
    """
    if isinstance(transformers_model, (str, os.PathLike)):
        text = str(transformers_model)
        if not os.path.exists(text) and looks_like_repo_id(text):
            return _hub_source(text, task)
        source = _checkpoint_source(Path(transformers_model), task)
        return _as_reference(source, Path(text)) if not save_pretrained else source
    if isinstance(transformers_model, Mapping):
        components = comp.validate_component_dict(transformers_model)
        source = _memory_source(components, task=task, pipeline=None, processor=processor)
    elif _is_pipeline(transformers_model):
        components = comp.components_from_pipeline(transformers_model)
        task = task or transformers_model.task
        source = _memory_source(
            components, task=task, pipeline=transformers_model, processor=processor
        )
    else:
        raise InvalidInputError(
            "The pipeline type submitted is not a valid transformers Pipeline. The type "
            f"{type(transformers_model).__name__} is not supported: transformers_model must be a "
            "transformers Pipeline, a dict of components with a 'model' key, the path of a "
            "local checkpoint directory, or a Hub repo id ('org/name[@revision]').",
            param="transformers_model",
        )
    if base_model_path is not None:
        return _with_local_base(source, base_model_path)
    return source if save_pretrained else _as_reference(source, None)


def _with_local_base(source: ModelSource, base_model_path: str | os.PathLike[str]) -> ModelSource:
    if not source.is_peft:
        raise InvalidInputError(
            "base_model_path is only supported for PEFT models (it saves the adapter and "
            f"references the base weights); this is a {source.model_class}. Drop the argument "
            "to save the whole model.",
            param="base_model_path",
        )
    source.local_base_model_path = checked_base_model_path(base_model_path)
    return source


def _as_reference(source: ModelSource, checkpoint_path: Path | None) -> ModelSource:
    """Turn a loaded or local source into a reference to the Hub snapshot it came from."""
    name = (
        str(checkpoint_path)
        if checkpoint_path
        else source.base_model_name or source.source_model_name
    )
    reference = reference_from_cache_path(name) if name and os.path.isdir(name) else None
    if reference is None and name and not os.path.isdir(name) and looks_like_repo_id(name):
        reference = resolve_reference(name, prefer_cache=True)
    if reference is None:
        raise InvalidInputError(
            f"save_pretrained=False needs a model loaded from the Hugging Face Hub (or its "
            f"cache), but this one comes from the local directory '{name}', so there is nothing "
            "to reference. Save the weights (save_pretrained=True), or load the model by repo id.",
            param="save_pretrained",
        )
    source.reference = reference
    return source


def write_model_files(
    source: ModelSource,
    path: Path,
    *,
    hardlink: bool,
    convert_pickle_weights: bool,
    store: WeightsStore | None = None,
) -> PendingManifest:
    """Write ``model/`` (and ``peft/``, ``components/``); the weights manifest comes from
    the returned handle, whose threads may still be copying and hashing weight files.

    With ``store``, a checkpoint's safetensors files go there instead of into ``path``."""
    model_dir = path / MODEL_DIR
    if source.reference is not None:
        pending = PendingManifest(ready=_write_reference_files(source, path))
    elif source.local_base_model_path is not None:
        pending = PendingManifest(ready=_write_adapter_only(source, path))
    elif source.checkpoint is not None:
        pending = start_copy_checkpoint(
            source.checkpoint,
            model_dir,
            hardlink=hardlink,
            convert_pickle_weights=convert_pickle_weights,
            store_weights=store.upload if store is not None else None,
        )
    else:
        pending = _save_memory_components(source.components or {}, path)
    try:
        _write_stock_components(model_dir, path / STOCK_COMPONENTS_DIR, source.component_classes)
    except BaseException:
        pending.close()
        raise
    return pending


def _hub_source(text: str, task: str | None) -> ModelSource:
    """A Hub repo id: pinned to a commit; only its small files are downloaded."""
    repo_id, revision = parse_repo_reference(text)
    reference = resolve_reference(repo_id, revision, prefer_cache=False)
    small_files = download_files(reference, ignore=SMALL_FILE_IGNORE)
    config = small_files / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{reference} has no config.json, so it is not a Transformers model.")
    info = CheckpointInfo(
        path=small_files,
        config=json.loads(config.read_text(encoding="utf-8")),
        files=tuple(
            sorted(str(p.relative_to(small_files)) for p in small_files.rglob("*") if p.is_file())
        ),
        weight_files=(),
        pickle_weight_files=(),
    )
    adapter = _check_task(task, info.architecture, info.model_type)
    return ModelSource(
        adapter=adapter,
        source_model_name=repo_id,
        model_class=info.architecture,
        component_classes=comp.detect_checkpoint_components(info),
        reference=reference,
        small_files_dir=small_files,
    )


def _checkpoint_source(path: Path, task: str | None) -> ModelSource:
    if not path.exists():
        raise CheckpointError(
            f"'{path}' is not a local directory. Pass the directory of a checkpoint written by "
            "`save_pretrained`, or a Hub repo id ('org/name[@revision]').",
            param="transformers_model",
        )
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"'{path}' is a PEFT adapter directory, not a full checkpoint. Load it with "
            "`peft.PeftModel.from_pretrained(base_model, path)` and log the model or pipeline.",
            param="transformers_model",
        )
    info = inspect_checkpoint(path)
    adapter = _check_task(task, info.architecture, info.model_type)
    return ModelSource(
        adapter=adapter,
        checkpoint=info,
        source_model_name=str(path.absolute()),
        model_class=info.architecture,
        component_classes=comp.detect_checkpoint_components(info),
    )


def _memory_source(
    components: dict[str, Any], *, task: str | None, pipeline: Any, processor: Any
) -> ModelSource:
    if processor is not None:
        components["processor"] = processor
    model = components[comp.MODEL]
    is_peft = _is_peft_model(model)
    base = model.get_base_model() if is_peft else model
    config = getattr(base, "config", None)
    if config is None:
        raise InvalidInputError(
            f"components['model'] is a {type(model).__name__}, not a transformers PreTrainedModel.",
            param="transformers_model",
        )
    adapter = _check_task(task, type(base).__name__, getattr(config, "model_type", None))
    _require_components(adapter, components)
    return ModelSource(
        adapter=adapter,
        components=components,
        pipeline=pipeline,
        source_model_name=getattr(base, "name_or_path", None) or None,
        model_class=type(base).__name__,
        component_classes=comp.component_classes(components),
        is_peft=is_peft,
        base_model_name=_peft_base_name(model) if is_peft else None,
    )


def _check_task(
    task: str | None, architecture: str | None, model_type: str | None
) -> type[TaskAdapter]:
    if task is None:
        return get_adapter(infer_task(architecture, model_type))
    adapter = get_adapter(task)
    if not model_can_do(adapter, architecture, model_type):
        prefix = ""
        if issubclass(adapter, LLMAdapter):  # stock's wording first: callers match on it
            native = infer_task(architecture, model_type)
            valid = [
                name
                for name, other in ADAPTERS.items()
                if issubclass(other, LLMAdapter) and model_can_do(other, architecture, model_type)
            ]
            prefix = (
                f"The task provided is invalid. '{adapter.task}' is not a supported task for "
                f"the {native} pipeline. Must be one of {sorted(valid)}. "
            )
        raise UnsupportedTaskError(
            f"{prefix}A {architecture} model (model_type '{model_type}') cannot perform task "
            f"'{adapter.task}'. Pass a task it supports, e.g. "
            f"'{infer_task(architecture, model_type)}', or a model built for this task.",
            param="task",
        )
    return adapter


def _require_components(adapter: type[TaskAdapter], components: Mapping[str, Any]) -> None:
    if not adapter.has_needed_components(components):
        raise InvalidInputError(
            f"Task '{adapter.task}' needs a tokenizer: add a 'tokenizer' entry to the "
            "transformers_model dict.",
            param="transformers_model",
        )


def _write_reference_files(source: ModelSource, path: Path) -> list[WeightEntry]:
    """Small files only (config, generation config, tokenizer, ...); weights stay on the Hub."""
    assert source.reference is not None
    model_dir = path / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    if source.components is not None:
        model = source.components[comp.MODEL]
        base = model.get_base_model() if source.is_peft else model
        base.config.save_pretrained(str(model_dir))
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(str(model_dir))
        others = {name: value for name, value in source.components.items() if name != comp.MODEL}
        comp.save_components(others, model_dir)
        if source.is_peft:
            model.save_pretrained(str(path / PEFT_DIR))
    else:
        _copy_small_files(source.small_files_dir or source.checkpoint.path, model_dir)  # type: ignore[union-attr]
    return weight_manifest(source.reference)


def _write_adapter_only(source: ModelSource, path: Path) -> list[WeightEntry]:
    """The PEFT adapter in ``peft/`` and the preprocessors in ``model/``; no base weights."""
    components = source.components or {}
    (path / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    others = {name: value for name, value in components.items() if name != comp.MODEL}
    comp.save_components(others, path / MODEL_DIR)
    components[comp.MODEL].save_pretrained(str(path / PEFT_DIR))
    return []


def _copy_small_files(source_dir: Path, model_dir: Path) -> None:
    for file in sorted(source_dir.rglob("*")):
        if file.is_file() and not is_weight_file(file.name):
            target = model_dir / file.relative_to(source_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)


def _save_memory_components(components: Mapping[str, Any], path: Path) -> PendingManifest:
    model_dir = path / MODEL_DIR
    model = components[comp.MODEL]
    others = {name: value for name, value in components.items() if name != comp.MODEL}
    if _is_peft_model(model):
        base = model.get_base_model()
        base.save_pretrained(str(model_dir), state_dict=_base_state_dict(base))
        model.save_pretrained(str(path / PEFT_DIR))
    else:
        model.save_pretrained(str(model_dir))
    comp.save_components(others, model_dir)
    return start_hash_weight_files(model_dir)


def _base_state_dict(base: Any) -> dict[str, Any]:
    """The base model's weights under its own keys, without the injected LoRA layers."""
    state = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def _write_stock_components(
    model_dir: Path, components_dir: Path, classes: Mapping[str, str]
) -> None:
    if "tokenizer" not in classes:
        return
    target = components_dir / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in _STOCK_TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, target / name)


def _is_pipeline(obj: Any) -> bool:
    from transformers import Pipeline

    return isinstance(obj, (Pipeline, Runner))


def _is_peft_model(model: Any) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model")


def _peft_base_name(model: Any) -> str | None:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "base_model_name_or_path", None)


def _write_model(
    source: ModelSource,
    path: Path,
    *,
    mlflow_model: Model,
    options: SaveOptions,
    store: WeightsStore | None,
) -> None:
    """Write a validated source: 1. files, then, while the weights are hashed in worker
    threads, 2. environment and 3. signature/example; 4. MLmodel, once the manifest is."""
    path.mkdir(parents=True, exist_ok=True)
    code_dir = _compat.validate_and_copy_code_paths(options.code_paths, str(path))
    with write_model_files(
        source,
        path,
        hardlink=options.for_log_model,
        convert_pickle_weights=options.convert_pickle_weights,
        store=store,
    ) as pending:
        write_model_card(source.card_dir, path, options.model_card)
        # MLflow's requirement check (~0.5 s of Python on a first save) costs no time here.
        _write_environment(
            path,
            source,
            options.conda_env,
            options.pip_requirements,
            options.extra_pip_requirements,
        )
        _add_signature_and_example(source, path, mlflow_model, options)
        weights = pending.result()
    config = source.flavor_config(weights=weights, torch_dtype=options.torch_dtype)
    _add_flavors(mlflow_model, config, options, code_dir)
    stored = store.stored_bytes(weights) if store is not None else 0
    mlflow_model.model_size_bytes = _directory_size(path) + stored
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))


class WeightsStore:
    """The artifact location of the model ``log_model`` is writing, into which a
    checkpoint's safetensors files upload while they are hashed.

    Otherwise MLflow would copy them from its temporary directory after the hash (the
    manifest in MLmodel waits for it): one read of the weights instead of two in a row.
    MLflow's later copy of that directory adds the other files beside them.
    """

    def __init__(self, repository: Any, checkpoint_dir: Path) -> None:
        self._repository = repository
        self._checkpoint_dir = checkpoint_dir
        self._uploads: list[Upload] = []

    def upload(self, names: Sequence[str], stop: threading.Event) -> None:
        """Store the named files (relative to the checkpoint) under ``model/``."""
        self._uploads = [(name, str(PurePosixPath(MODEL_DIR, name).parent)) for name in names]
        upload_files(
            self._repository,
            self._checkpoint_dir,
            self._uploads,
            failure_note=_UPLOAD_FAILED,
            stop=stop,
        )

    def stored_bytes(self, weights: Sequence[WeightEntry]) -> int:
        stored = {name for name, _ in self._uploads}
        return sum(entry.size for entry in weights if entry.path in stored)

    def delete(self) -> None:
        """Take back what was uploaded: the failed save logs nothing."""
        delete_uploads(
            self._repository,
            [uploaded_artifact(name, target) for name, target in self._uploads],
            why="the logged model is incomplete; delete it, or log the model again.",
        )


_UPLOAD_FAILED = (
    "Nothing was logged: the weight files already stored are deleted again. Fix the "
    "artifact store (space, permissions, connection), then log the model again."
)


def _weights_store(source: ModelSource, mlflow_model: Model) -> WeightsStore | None:
    """A store for a checkpoint's weights when ``mlflow_model.artifact_path`` (set by
    ``Model.log``) opens as an artifact repository; else None, and MLflow copies them."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if source.checkpoint is None or not source.checkpoint.weight_files:
        return None
    location = mlflow_model.artifact_path
    if not location:
        return None
    try:
        repository = get_artifact_repository(location, tracking_uri=mlflow.get_tracking_uri())
    except Exception as err:  # MLflow's own copy will then fail, or succeed, as it would
        _logger.debug("Cannot open %s (%s); MLflow copies the weights.", location, err)
        return None
    return WeightsStore(repository, source.checkpoint.path)


def _add_signature_and_example(
    source: ModelSource, path: Path, mlflow_model: Model, options: SaveOptions
) -> None:
    adapter = source.adapter
    if options.signature is not None:
        mlflow_model.signature = options.signature
    elif (
        options.input_example is not None
        and source.components is not None
        and not issubclass(adapter, LLMAdapter)  # llm/v1 signatures are the OpenAI schemas
    ):
        mlflow_model.signature = _signature_from_example(source, options)
    else:
        mlflow_model.signature = adapter.default_signature(options.model_config)
    if options.input_example is not None:
        _compat.save_example(mlflow_model, _formatted_example(adapter, options), str(path))


def _signature_from_example(source: ModelSource, options: SaveOptions) -> ModelSignature | None:
    """The signature of what the example gives; the task's default if it does not run.

    An ``(data, params)`` example's params become the signature's param defaults, as
    MLflow's ``infer_signature(data, output, params)`` makes them.
    """
    adapter_cls = source.adapter
    data, example_params = _split_example(_formatted_example(adapter_cls, options))
    runner = source.pipeline or adapter_cls.build_runner(source.components or {})
    adapter = adapter_cls(
        runner,
        model_config=options.model_config,
        prompt_template=options.prompt_template,
        signature_params=example_params,
    )
    probe = {k: v for k, v in adapter_cls.probe_params.items() if k not in options.model_config}
    try:
        output = adapter.predict(to_python(data), {**probe, **example_params})
    except Exception as err:
        _logger.warning(
            "The input_example did not run through the '%s' model (%s), so the signature is the "
            "task's default. Check that the example matches the task's input format, or pass "
            "signature=.",
            adapter_cls.task,
            err,
        )
        return adapter_cls.default_signature(options.model_config)
    signature = infer_signature(to_python(data), output)
    signature.params = adapter_cls.params_schema({**options.model_config, **example_params})
    return signature


def _formatted_example(adapter: type[TaskAdapter], options: SaveOptions) -> Any:
    """The input example as the task saves it (see :meth:`TaskAdapter.signature_example`)."""
    data, params = _split_example(options.input_example)
    data = adapter.signature_example(data)
    return (data, params) if params else data


def _split_example(example: Any) -> tuple[Any, dict[str, Any]]:
    """``(data, params)``, as MLflow's flavors take an example with params; else no params."""
    if _compat.contains_params(example):
        data, params = example
        return data, dict(params or {})
    return example, {}


def _add_flavors(
    mlflow_model: Model, config: FlavorConfig, options: SaveOptions, code_dir: str | None
) -> None:
    import transformers

    config.transformers_version = transformers.__version__
    mlflow_model.add_flavor(FLAVOR_NAME, **config.to_dict())
    mlflow_model.add_flavor(STOCK_FLAVOR_NAME, **config.to_stock_dict())
    if options.metadata:
        mlflow_model.metadata = {**(mlflow_model.metadata or {}), **options.metadata}
    if options.prompt_template:
        mlflow_model.metadata = {
            **(mlflow_model.metadata or {}),
            PROMPT_TEMPLATE_KEY: options.prompt_template,
        }
    if config.inference_task:  # what serving platforms read to pick the OpenAI route
        mlflow_model.metadata = {**(mlflow_model.metadata or {}), "task": config.inference_task}
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_tfx_plugin",
        conda_env=_compat.CONDA_ENV_FILE_NAME,
        python_env=_compat.PYTHON_ENV_FILE_NAME,
        code=code_dir,
        model_config=options.model_config or None,
        **({"streamable": True} if get_adapter(config.adapter_task).streamable else {}),
    )


def _directory_size(path: Path) -> int:
    """Bytes of every file under ``path``: MLmodel's ``model_size_bytes``, shown by the UI."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _check_environment(options: SaveOptions) -> None:
    conda_env = options.conda_env
    _compat.validate_env_arguments(
        conda_env, options.pip_requirements, options.extra_pip_requirements
    )
    if isinstance(conda_env, (str, os.PathLike)) and not os.path.isfile(conda_env):
        raise InvalidInputError(
            f"conda_env '{conda_env}' is not a file: pass the path of a conda YAML file, or the "
            "environment as a dict.",
            param="conda_env",
        )


def _write_environment(
    path: Path, source: ModelSource, conda_env: Any, pip_requirements: Any, extra: Any
) -> None:
    import yaml

    if conda_env is None:
        defaults = None
        if pip_requirements is None:
            defaults = get_default_pip_requirements(
                source.components, task=source.adapter.task, peft=source.is_peft
            )
        conda_env, requirements, constraints = _compat.process_pip_requirements(
            defaults, pip_requirements, extra
        )
    else:
        conda_env, requirements, constraints = _compat.process_conda_env(conda_env)
    with open(path / _compat.CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        (path / _compat.CONSTRAINTS_FILE_NAME).write_text("\n".join(constraints))
    (path / _compat.REQUIREMENTS_FILE_NAME).write_text("\n".join(requirements))
    _compat.PythonEnv.current().to_yaml(str(path / _compat.PYTHON_ENV_FILE_NAME))


def _check_metadata_task(metadata: Mapping[str, Any] | None, source: ModelSource) -> None:
    """``metadata={"task": ...}`` must name the task the model is saved for, as stock requires.

    Serving platforms read ``metadata.task`` to pick the OpenAI route, so a mismatch would
    serve the model as something it is not.
    """
    declared = (metadata or {}).get("task")
    if declared is None or declared in (source.inference_task, source.adapter.task):
        return
    saved_as = source.inference_task or source.native_task
    raise InvalidInputError(  # stock's wording first: callers match on it
        f"LLM v1 task type {declared!r} is specified in metadata, but it doesn't match the task "
        f"type provided in the `task` argument: {saved_as!r}. metadata['task'] is {declared!r} "
        f"but the model is saved for task {saved_as!r}. Pass the task explicitly, e.g. "
        f"log_model(..., task={declared!r}), or drop metadata['task'].",
        param="metadata",
    )


def _check_prompt_template_task(template: Any, task: str | None) -> None:
    """Refuse a template for a task that takes none (or one unknown to us), before the model
    is checked against the task, as stock checks it right after building the pipeline."""
    if template is None or task is None:
        return
    adapter = ADAPTERS.get(TASK_ALIASES.get(task, task))
    if adapter is None or not adapter.supports_prompt_template:
        _refuse_prompt_template_task(task)


def _refuse_prompt_template_task(task: str) -> NoReturn:
    supported = sorted(
        name for name, adapter in ADAPTERS.items() if adapter.supports_prompt_template
    )
    # Stock's wording first: callers (and MLflow's tests) match on it.
    raise InvalidInputError(
        f"Prompt templating is not supported for the `{task}` task type. Supported task types "
        f"are: {supported}. prompt_template applies to text generation, seq2seq generation, "
        "fill-mask and feature-extraction models; drop it to save this one.",
        param="prompt_template",
    )


def _validate_prompt_template(template: Any, adapter: type[TaskAdapter]) -> str | None:
    if template is None:
        return None
    if not adapter.supports_prompt_template:
        _refuse_prompt_template_task(adapter.task)
    if not isinstance(template, str):
        raise InvalidInputError(
            f"Argument `prompt_template` must be a string, received {type(template)}: pass a "
            f"template string with the placeholder '{{prompt}}', got {template!r}.",
            param="prompt_template",
        )
    try:
        if template.format(prompt="") == template or "{prompt}" not in template:
            raise KeyError("prompt")
    except (KeyError, IndexError, ValueError) as err:
        raise InvalidInputError(
            "Argument `prompt_template` must be a string with a single format arg, 'prompt'. "
            "For example: 'Answer the following question in a friendly tone. Q: {prompt}. A:'. "
            f"Received {template!r}: prompt_template must contain exactly the placeholder "
            "'{prompt}' and no other braces (use '{{' for a literal brace).",
            param="prompt_template",
        ) from err
    return template


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(as_torch_dtype(dtype)).removeprefix("torch.")
