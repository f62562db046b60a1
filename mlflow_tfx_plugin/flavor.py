"""The ``tfx`` flavor: save, log and load Transformers models as MLflow models.

Saved layout (the artifact root)::

    MLmodel                 flavors: tfx, transformers (stock-compatible), python_function
    model/                  a plain Hugging Face checkpoint: config, safetensors weights,
                            tokenizer/processor files, generation config, chat template
    peft/                   the PEFT adapter, for PEFT models (base weights are in model/)
    components/<name>/      preprocessor copies where stock ``mlflow.transformers`` looks
    model_card.md, LICENSE.txt, requirements.txt, conda.yaml, python_env.yaml
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from mlflow import pyfunc
from mlflow.models import Model, ModelInputExample, ModelSignature, infer_signature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo

from mlflow_tfx_plugin import _compat
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.flavor_config import (
    FLAVOR_NAME,
    MODEL_DIR,
    PROMPT_TEMPLATE_KEY,
    STOCK_FLAVOR_NAME,
    FlavorConfig,
)
from mlflow_tfx_plugin.loading import (
    as_torch_dtype,
    default_device,
    load_adapter,
    load_components,
    read_flavor_config,
)
from mlflow_tfx_plugin.model_card import write_model_card
from mlflow_tfx_plugin.pyfunc import TfxPyfuncModel, to_python
from mlflow_tfx_plugin.requirements import get_default_pip_requirements
from mlflow_tfx_plugin.saving import ModelSource, resolve_source, write_model_files
from mlflow_tfx_plugin.tasks import ADAPTERS, TASK_ALIASES, LLMAdapter, TaskAdapter, get_adapter

_logger = logging.getLogger(__name__)

ReturnType = Literal["pipeline", "components"]


def save_model(
    transformers_model: Any,
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    save_pretrained: bool = True,
    processor: Any = None,
    torch_dtype: Any = None,
    model_config: Mapping[str, Any] | None = None,
    prompt_template: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    metadata: dict[str, Any] | None = None,
    convert_pickle_weights: bool = False,
    model_card: Any = None,
    base_model_path: str | os.PathLike[str] | None = None,
    validate_serving_input: bool = True,
    _hardlink_weights: bool = False,
) -> None:
    """Save a Transformers model as an MLflow model in a local directory.

    Args:
        transformers_model: a ``transformers.Pipeline``; a dict of components (``model``,
            ``tokenizer``, ``feature_extractor``, ``image_processor``, ``processor``); the
            path of a local checkpoint directory, copied without loading weights; or a Hub
            repo id ``"org/name[@revision]"``, logged as a reference without its weights.
        path: the directory to create. It must not exist or be empty.
        task: the native task (inferred from the pipeline or ``config.json`` when omitted).
        save_pretrained: save the weights. ``False`` records only a reference to the Hub
            repo and the exact commit the model came from (resolved from the local HF
            cache, or the Hub API); a Hub repo id as ``transformers_model`` always does.
        processor: an optional processor saved beside the model.
        torch_dtype: the dtype to load the model with, e.g. ``torch.bfloat16``.
        model_config: default call parameters, overridable per predict call via ``params``.
        prompt_template: a template with a ``{prompt}`` placeholder, applied at predict time.
        signature: the model signature; inferred per task when omitted.
        input_example: an example input, saved with the model and used to infer the signature;
            ``(data, params)`` adds call parameters, as MLflow's other flavors take them. If it
            does not run through the model, a warning says why and the task's default
            signature is used.
        pip_requirements: override the default pip requirements.
        extra_pip_requirements: requirements added to the defaults.
        conda_env: a conda environment (dict or YAML path) instead of pip requirements.
        code_paths: local code paths saved with the model.
        mlflow_model: the MLflow Model to add the flavor to (used by ``log_model``).
        metadata: custom metadata stored in MLmodel.
        convert_pickle_weights: convert a checkpoint's ``*.bin`` weights to safetensors
            (loaded with ``torch.load(weights_only=True)``) instead of refusing them.
        model_card: a ``huggingface_hub.ModelCard``, written as ``model_card.md`` and
            ``model_card_data.yaml`` (default: the checkpoint's README.md, when there is one).
        base_model_path: for a PEFT model, a local directory holding the base checkpoint:
            only the adapter is saved and the base weights load from this path (override it
            at load time with ``load_model(..., base_model_path=)``).
        validate_serving_input: accepted for ``Model.log``; validation happens there.

    Raises:
        InvalidInputError: bad arguments (each error names the argument and the fix). No
            partially written model is left behind.

    Example:
        >>> import mlflow_tfx_plugin as tfx
        >>> tfx.save_model("./my-checkpoint", "./saved", task="text-generation")  # doctest: +SKIP
    """
    del validate_serving_input
    _compat.validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    if isinstance(conda_env, (str, os.PathLike)) and not os.path.isfile(conda_env):
        raise InvalidInputError(
            f"conda_env '{conda_env}' is not a file: pass the path of a conda YAML file, or the "
            "environment as a dict.",
            param="conda_env",
        )
    _check_prompt_template_task(prompt_template, task or getattr(transformers_model, "task", None))
    source = resolve_source(
        transformers_model,
        task=task,
        processor=processor,
        save_pretrained=save_pretrained,
        base_model_path=base_model_path,
    )
    mlflow_model = mlflow_model or Model()
    _check_metadata_task(mlflow_model.metadata or metadata, source)
    template = _validate_prompt_template(prompt_template, source.adapter)
    target = Path(path).absolute()
    _compat.validate_and_prepare_target_save_path(str(target))
    try:
        _save(
            source,
            target,
            mlflow_model=mlflow_model,
            options=_SaveOptions(
                torch_dtype=_dtype_name(torch_dtype) or source.model_dtype,
                model_config=dict(model_config or {}),
                prompt_template=template,
                signature=signature,
                input_example=input_example,
                metadata=metadata,
                code_paths=code_paths,
                hardlink=_hardlink_weights,
                convert_pickle_weights=convert_pickle_weights,
                model_card=model_card,
            ),
            env=(conda_env, pip_requirements, extra_pip_requirements),
        )
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def log_model(
    transformers_model: Any,
    name: str | None = None,
    *,
    task: str | None = None,
    save_pretrained: bool = True,
    input_example: ModelInputExample | None = None,
    signature: ModelSignature | None = None,
    model_config: Mapping[str, Any] | None = None,
    prompt_template: str | None = None,
    torch_dtype: Any = None,
    processor: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = 300,
    metadata: dict[str, Any] | None = None,
    convert_pickle_weights: bool = False,
    model_card: Any = None,
    base_model_path: str | os.PathLike[str] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
) -> ModelInfo:
    """Log a Transformers model to the active run (or a new one) as an MLflow model.

    Takes the same model arguments as :func:`save_model`, plus MLflow's logging options
    (``name``, ``registered_model_name``, ``params``, ``tags``, ...). A checkpoint directory
    is logged without loading its weights: they are hard-linked into MLflow's temporary
    save directory where the file system allows, and streamed to the artifact store.

    Returns:
        The :class:`mlflow.models.model.ModelInfo` of the logged model; its
        ``flavors["tfx"]`` holds the task, source and weights manifest.

    Example:
        >>> import mlflow, mlflow_tfx_plugin as tfx
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     info = tfx.log_model(pipe, name="model", input_example="Hello")
    """
    is_checkpoint = isinstance(transformers_model, (str, os.PathLike))
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        transformers_model=transformers_model,
        task=task,
        save_pretrained=save_pretrained,
        input_example=input_example,
        signature=signature,
        model_config=model_config,
        prompt_template=prompt_template,
        torch_dtype=torch_dtype,
        processor=processor,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        convert_pickle_weights=convert_pickle_weights,
        model_card=model_card,
        base_model_path=base_model_path,
        # Validating the serving input would load the whole checkpoint we avoid loading.
        validate_serving_input=not is_checkpoint,
        _hardlink_weights=True,
    )


def load_model(
    model_uri: str,
    dst_path: str | None = None,
    return_type: ReturnType = "pipeline",
    device: Any = None,
    torch_dtype: Any = None,
    base_model_path: str | os.PathLike[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a model saved by this flavor (or by stock ``mlflow.transformers``) natively.

    Args:
        model_uri: any MLflow model URI (``runs:/``, ``models:/``, a local path, ...).
        dst_path: where to download the artifacts; a temporary directory by default.
        return_type: ``"pipeline"`` for a ready-to-call pipeline (the flavor's own runner
            for tasks transformers 5 dropped), ``"components"`` for a dict of ``model``,
            ``tokenizer``, ... plus ``task`` (and ``device`` when one is given).
        device: the device to load onto (``"cpu"``, ``"cuda:0"``, ``0``; ``-1`` is the CPU,
            as in transformers pipelines).
        torch_dtype: overrides the dtype saved with the model.
        base_model_path: where the base checkpoint of a PEFT model saved with
            ``base_model_path=`` lives now, if not where it was at save time.
        from_pretrained_kwargs: forwarded to ``from_pretrained`` (``device_map``,
            ``attn_implementation``, ``trust_remote_code``, ...).

    Example:
        >>> pipe = tfx.load_model("models:/my-model/1", device="cpu")  # doctest: +SKIP
    """
    if return_type not in ("pipeline", "components"):
        raise InvalidInputError(
            f"return_type must be 'pipeline' or 'components', got {return_type!r}.",
            param="return_type",
        )
    local_path = Path(_compat.download_artifact_from_uri(model_uri, output_path=dst_path))
    config = read_flavor_config(local_path)
    device = default_device(device)
    components = load_components(
        local_path,
        config,
        device=device,
        torch_dtype=torch_dtype,
        base_model_path=base_model_path,
        **from_pretrained_kwargs,
    )
    if return_type == "components":
        return {
            **components,
            "task": config.task,
            **({"device": device} if device is not None else {}),
        }
    return get_adapter(config.task).build_runner(components)


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> TfxPyfuncModel:
    """Entry point for ``mlflow.pyfunc.load_model``: the model as a pyfunc predictor."""
    return TfxPyfuncModel(load_adapter(path, model_config, device=default_device(None)))


def generate_signature_output(
    pipeline: Any,
    data: Any,
    model_config: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Any:
    """Run ``data`` through a pipeline the way pyfunc predict would, to infer a signature.

    Example:
        >>> out = tfx.generate_signature_output(pipe, "Hello")  # doctest: +SKIP
        >>> mlflow.models.infer_signature("Hello", out)  # doctest: +SKIP
    """
    task = getattr(pipeline, "task", None)
    if task is None:
        raise InvalidInputError(
            "The pipeline type submitted is not a valid transformers Pipeline. The type "
            f"{type(pipeline).__name__} is not supported: it has no task; pass a transformers "
            "pipeline.",
            param="pipeline",
        )
    adapter = get_adapter(task)(pipeline, model_config=model_config, signature_params=params or ())
    return adapter.predict(to_python(data), params)


def autolog(**kwargs: Any) -> None:
    """Turn on MLflow's transformers autologging (``mlflow.transformers.autolog``).

    It logs ``Trainer`` runs through transformers' ``MLflowCallback`` and keeps the
    sklearn/pytorch autologgers from logging sub-models during training. Takes the same
    keyword arguments (``disable``, ``silent``, ...).
    """
    import mlflow.transformers

    mlflow.transformers.autolog(**kwargs)


@dataclass(frozen=True, kw_only=True)
class _SaveOptions:
    """What save_model was asked to do besides writing the weights."""

    torch_dtype: str | None
    model_config: dict[str, Any]
    prompt_template: str | None
    signature: ModelSignature | None
    input_example: Any
    metadata: dict[str, Any] | None
    code_paths: list[str] | None
    hardlink: bool
    convert_pickle_weights: bool
    model_card: Any = None


def _save(
    source: ModelSource,
    path: Path,
    *,
    mlflow_model: Model,
    options: _SaveOptions,
    env: tuple[Any, Any, Any],
) -> None:
    """Write a validated source: 1. files, 2. signature/example, 3. MLmodel, 4. environment."""
    path.mkdir(parents=True, exist_ok=True)
    code_dir = _compat.validate_and_copy_code_paths(options.code_paths, str(path))
    weights = write_model_files(
        source,
        path,
        hardlink=options.hardlink,
        convert_pickle_weights=options.convert_pickle_weights,
    )
    write_model_card(source.card_dir, path, options.model_card)
    config = source.flavor_config(weights=weights, torch_dtype=options.torch_dtype)
    _add_signature_and_example(source, path, mlflow_model, options)
    _add_flavors(mlflow_model, config, options, code_dir)
    mlflow_model.model_size_bytes = _directory_size(path)
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    _write_environment(path, source, *env)


def _add_signature_and_example(
    source: ModelSource, path: Path, mlflow_model: Model, options: _SaveOptions
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


def _signature_from_example(source: ModelSource, options: _SaveOptions) -> ModelSignature | None:
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


def _formatted_example(adapter: type[TaskAdapter], options: _SaveOptions) -> Any:
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
    mlflow_model: Model, config: FlavorConfig, options: _SaveOptions, code_dir: str | None
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
    streamable = getattr(get_adapter(config.adapter_task), "streamable", False)
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_tfx_plugin",
        conda_env=_compat.CONDA_ENV_FILE_NAME,
        python_env=_compat.PYTHON_ENV_FILE_NAME,
        code=code_dir,
        model_config=options.model_config or None,
        **({"streamable": True} if streamable else {}),
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


def _directory_size(path: Path) -> int:
    """Bytes of every file under ``path``: MLmodel's ``model_size_bytes``, shown by the UI."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


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


__all__ = [
    "FLAVOR_NAME",
    "MODEL_DIR",
    "autolog",
    "generate_signature_output",
    "load_model",
    "log_model",
    "save_model",
]
