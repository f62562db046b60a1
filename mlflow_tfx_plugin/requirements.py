"""Default pip requirements: what the saved model needs, and nothing it does not.

torchvision is never added unless asked for: the stock flavor's default requirements
import it and fail where it is not installed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mlflow_tfx_plugin import _compat

PLUGIN_DISTRIBUTION = "mlflow-tfx-plugin"


def get_default_pip_requirements(
    model: Any = None, *, task: str | None = None, peft: bool = False
) -> list[str]:
    """Pinned pip requirements for a model saved by this flavor.

    Args:
        model: the model object or component dict, if one is at hand (used to detect
            PEFT models and SentencePiece tokenizers).
        task: the native task, for task-specific libraries (audio decoding, images).
        peft: whether the model carries a PEFT adapter.

    Returns:
        Requirement strings such as ``"transformers==5.23.0"``.

    Example:
        >>> get_default_pip_requirements(task="text-generation")  # doctest: +SKIP
        ['mlflow-tfx-plugin==0.1.0', 'transformers==5.23.0', 'torch==2.13.0', ...]
    """
    packages = ["transformers", "torch", "accelerate", "safetensors", "tokenizers"]
    if peft or _is_peft(model):
        packages.append("peft")
    if _uses_sentencepiece(model):
        packages.append("sentencepiece")
    packages.extend(_task_packages(task))
    return [_plugin_requirement(), *(_pinned(name) for name in packages)]


def get_default_conda_env(model: Any = None) -> dict[str, Any]:
    """The default conda environment for a model saved by this flavor: Python plus
    :func:`get_default_pip_requirements`.

    Example:
        >>> get_default_conda_env()["dependencies"][-1]  # doctest: +SKIP
        {'pip': ['mlflow==3.17.2', 'mlflow-tfx-plugin==0.1.0', 'transformers==5.24.0', ...]}
    """
    return _compat.mlflow_conda_env(additional_pip_deps=get_default_pip_requirements(model))


def _task_packages(task: str | None) -> tuple[str, ...]:
    from mlflow_tfx_plugin.tasks import ADAPTERS, TASK_ALIASES

    adapter = ADAPTERS.get(TASK_ALIASES.get(task or "", task or ""))
    return adapter.pip_packages if adapter is not None else ()


def _pinned(name: str) -> str:
    try:
        return _compat.get_pinned_requirement(name)
    except Exception:  # not installed here: leave it unpinned rather than fail the save
        return name


def _plugin_requirement() -> str:
    try:
        return f"{PLUGIN_DISTRIBUTION}=={version(PLUGIN_DISTRIBUTION)}"
    except PackageNotFoundError:
        return PLUGIN_DISTRIBUTION


def _is_peft(model: Any) -> bool:
    """A PEFT model itself, or a pipeline or component dict holding one."""
    if type(model).__module__.startswith("peft."):
        return True
    inner = model.get("model") if isinstance(model, dict) else getattr(model, "model", None)
    return inner is not None and type(inner).__module__.startswith("peft.")


def _uses_sentencepiece(model: Any) -> bool:
    tokenizer = (
        model.get("tokenizer") if isinstance(model, dict) else getattr(model, "tokenizer", None)
    )
    return (
        tokenizer is not None
        and "vocab_file" in getattr(tokenizer, "vocab_files_names", {})
        and (str(getattr(tokenizer, "vocab_file", "")).endswith(".model"))
    )
