"""Model components: collect them from a pipeline or dict, save them, load them back.

A component is the model or one of its preprocessors (tokenizer, feature extractor,
image processor, processor). They are saved side by side in one Hugging Face
checkpoint directory and loaded with classes from the ``transformers`` namespace
only, never with remote code unless the caller asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow_tfx_plugin.checkpoint import CheckpointInfo
from mlflow_tfx_plugin.errors import InvalidInputError

MODEL = "model"
PREPROCESSOR_NAMES = ("tokenizer", "feature_extractor", "image_processor", "processor")
AUTO_CLASSES = {
    "tokenizer": "AutoTokenizer",
    "feature_extractor": "AutoFeatureExtractor",
    "image_processor": "AutoImageProcessor",
    "processor": "AutoProcessor",
}


def components_from_pipeline(pipeline: Any) -> dict[str, Any]:
    """The model and the preprocessors a pipeline holds."""
    components = {MODEL: pipeline.model}
    for name in PREPROCESSOR_NAMES:
        if (value := getattr(pipeline, name, None)) is not None:
            components[name] = value
    return components


def validate_component_dict(components: Mapping[str, Any]) -> dict[str, Any]:
    """Check a user-supplied component dict: a ``model`` and only known keys."""
    unknown = sorted(set(components) - {MODEL, *PREPROCESSOR_NAMES})
    if unknown:
        # Stock's wording first: MLflow's own tests match on it.
        raise InvalidInputError(
            f"Invalid dictionary submitted for 'transformers_model'. The key(s) {unknown} are "
            f"not permitted. Must be one of: {[MODEL, *PREPROCESSOR_NAMES]}. Unknown "
            f"component(s) {unknown}: rename each to one of these keys, or drop it.",
            param="transformers_model",
        )
    if components.get(MODEL) is None:
        raise InvalidInputError(
            f"The 'transformers_model' dictionary must have an entry for {MODEL}; got keys "
            f"{sorted(components)}. Add 'model': <a PreTrainedModel>.",
            param="transformers_model",
        )
    return {name: value for name, value in components.items() if value is not None}


def component_classes(components: Mapping[str, Any]) -> dict[str, str]:
    """Class names of the preprocessors, as recorded in the flavor config."""
    return {name: type(value).__name__ for name, value in components.items() if name != MODEL}


def save_components(components: Mapping[str, Any], directory: Path, **save_kwargs: Any) -> None:
    """``save_pretrained`` every component into one checkpoint directory."""
    for name, component in components.items():
        kwargs = save_kwargs if name == MODEL else {}
        component.save_pretrained(str(directory), **kwargs)


def detect_checkpoint_components(info: CheckpointInfo) -> dict[str, str]:
    """Preprocessors present in a checkpoint, from its small config files only."""
    found: dict[str, str] = {}
    if info.has_tokenizer:
        found["tokenizer"] = AUTO_CLASSES["tokenizer"]
    preprocessor = info.path / "preprocessor_config.json"
    if preprocessor.is_file():
        config = json.loads(preprocessor.read_text(encoding="utf-8"))
        if "image_processor_type" in config:
            found["image_processor"] = AUTO_CLASSES["image_processor"]
        else:
            found["feature_extractor"] = AUTO_CLASSES["feature_extractor"]
    if "processor_config.json" in info.files:
        found["processor"] = AUTO_CLASSES["processor"]
    return found


def load_preprocessors(
    directory: Path | str,
    classes: Mapping[str, str],
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """Load the recorded preprocessors from a checkpoint directory (or a pinned repo id)."""
    kwargs = {"revision": revision} if revision else {}
    return {
        name: resolve_class(class_name, fallback=AUTO_CLASSES[name]).from_pretrained(
            str(directory), trust_remote_code=trust_remote_code, **kwargs
        )
        for name, class_name in classes.items()
    }


def unpack_processor(components: dict[str, Any]) -> dict[str, Any]:
    """Fill tokenizer/feature extractor/image processor from a processor that bundles them.

    Pipelines such as automatic-speech-recognition need the parts, not the processor, and
    some processors (Whisper's) are saved as one ``processor_config.json``.
    """
    processor = components.get("processor")
    if processor is None:
        return components
    for name in ("tokenizer", "feature_extractor", "image_processor"):
        if components.get(name) is None and (part := getattr(processor, name, None)) is not None:
            components[name] = part
    return components


def resolve_class(class_name: str, *, fallback: str) -> Any:
    """A class from the ``transformers`` namespace, or the Auto fallback for custom classes."""
    import transformers

    return getattr(transformers, class_name, None) or getattr(transformers, fallback)
