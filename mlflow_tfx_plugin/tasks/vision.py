"""``image-classification``: PIL images, image bytes, base64 strings or local paths."""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import TYPE_CHECKING, Any, ClassVar

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import TaskAdapter, column_schema, unwrap_record

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.types.schema import Schema


class ImageClassificationAdapter(TaskAdapter):
    """A DataFrame of ``label`` and ``score``: the top ``top_k`` for one image, top 1 per image
    for a list."""

    task = "image-classification"
    pipeline_task = "image-classification"
    pipeline_class = "ImageClassificationPipeline"
    model_mappings = ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForImageClassification"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long"}
    default_input_example = None

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "label"), ("double", "score"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        items = data if isinstance(data, list) else [data]
        if not items:
            raise InvalidInputError("Expected at least one image.", param="inputs")
        images = [_to_image(unwrap_record(item)) for item in items]
        if len(images) > 1:
            call_kwargs.setdefault("top_k", 1)
        outputs = self.runner(images if len(images) > 1 else images[0], **call_kwargs)
        rows = outputs if len(images) == 1 else [row for output in outputs for row in output]
        return pd.DataFrame(rows, columns=["label", "score"])


def _to_image(item: Any) -> Any:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        item = _read_path_or_base64(item)
    if isinstance(item, (bytes, bytearray)):
        try:
            return Image.open(io.BytesIO(item)).convert("RGB")
        except OSError as err:
            raise InvalidInputError(
                f"Could not decode image bytes: {err}.", param="inputs"
            ) from err
    raise InvalidInputError(
        f"Cannot read an image from {type(item).__name__}; pass a PIL image, bytes, a base64 "
        "string or a local file path.",
        param="inputs",
    )


def _read_path_or_base64(text: str) -> bytes:
    if "://" in text:
        raise InvalidInputError(
            f"Image URLs are not fetched ('{text[:80]}'): pass the bytes, base64 or a local path.",
            param="inputs",
        )
    if len(text) < 4096 and os.path.isfile(text):
        with open(text, "rb") as f:
            return f.read()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInputError(
            f"'{text[:80]}' is neither an existing file nor valid base64 image data.",
            param="inputs",
        ) from err
