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

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import ModelInfo

from mlflow_tfx_plugin import _compat, saving
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.flavor_config import FLAVOR_NAME, MODEL_DIR
from mlflow_tfx_plugin.loading import (
    default_device,
    load_adapter,
    load_components,
    read_flavor_config,
)
from mlflow_tfx_plugin.pyfunc import TfxPyfuncModel, to_python
from mlflow_tfx_plugin.tasks import get_adapter

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
    _for_log_model: bool = False,
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
    saving.save(
        transformers_model,
        path,
        task=task,
        save_pretrained=save_pretrained,
        processor=processor,
        base_model_path=base_model_path,
        mlflow_model=mlflow_model,
        options=saving.SaveOptions(
            torch_dtype=torch_dtype,
            model_config=model_config or {},
            prompt_template=prompt_template,
            signature=signature,
            input_example=input_example,
            metadata=metadata,
            code_paths=code_paths,
            for_log_model=_for_log_model,
            convert_pickle_weights=convert_pickle_weights,
            model_card=model_card,
            conda_env=conda_env,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
        ),
    )


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
    is logged without loading its weights: they upload straight into the logged model's
    artifact location while threads hash them (deleted again if the call fails).

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
        _for_log_model=True,
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


__all__ = [
    "FLAVOR_NAME",
    "MODEL_DIR",
    "autolog",
    "generate_signature_output",
    "load_model",
    "log_model",
    "save_model",
]
