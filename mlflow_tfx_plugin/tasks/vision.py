"""``image-classification``: PIL images, image bytes, base64 strings or local paths."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks.base import (
    STOCK_INVALID_STRING_INPUT,
    TaskAdapter,
    column_schema,
    decode_base64,
    unwrap_record,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.types.schema import Schema


class ImageClassificationAdapter(TaskAdapter):
    """A DataFrame with one row per image whose columns ``0..k-1`` hold the top-k
    ``{"label", "score"}`` dicts, as stock MLflow returns (``pd.DataFrame`` of the pipeline's
    output for a list of images)."""

    task = "image-classification"
    pipeline_task = "image-classification"
    pipeline_class = "ImageClassificationPipeline"
    model_mappings = ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",)
    auto_model_class = "AutoModelForImageClassification"
    call_params: ClassVar[dict[str, str]] = {"top_k": "long"}
    needs_tokenizer = False
    pip_packages = ("pillow",)

    @classmethod
    def output_schema(cls) -> Schema:
        return column_schema(("string", "label"), ("double", "score"))

    def run(self, data: Any, call_kwargs: dict[str, Any]) -> pd.DataFrame:
        import pandas as pd

        if isinstance(data, np.ndarray):  # REST `inputs` parsed without a schema
            data = data.tolist()
        items = data if isinstance(data, list) else [data]
        if not items:
            raise InvalidInputError("Expected at least one image.", param="inputs")
        images = [to_image(unwrap_record(item)) for item in items]
        # A list in, a list of top-k lists out, even for one image: one row per image.
        return pd.DataFrame(self.runner(images, **call_kwargs))


def to_image(item: Any) -> Any:
    """A PIL image from a PIL image, image bytes, a base64 string or a local file path.

    The pipeline itself applies the EXIF orientation and converts to RGB.
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        return _open_image(_read_path_or_base64(item), f"'{item[:80]}' (a file or base64)")
    if isinstance(item, (bytes, bytearray)):
        return _open_image(bytes(item), "the image bytes")
    raise InvalidInputError(
        f"Cannot read an image from {type(item).__name__}; pass a PIL image, bytes, a base64 "
        "string or a local file path.",
        param="inputs",
    )


def _open_image(payload: bytes, source: str) -> Any:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(payload))
        image.load()  # decode now: a truncated file fails here, not inside the pipeline
    except OSError as err:
        raise InvalidInputError(
            f"Could not decode {source} as an image ({err}); send PNG, JPEG or another format "
            "Pillow reads, as bytes, a local path or base64.",
            param="inputs",
        ) from err
    return image


def _read_path_or_base64(text: str) -> bytes:
    if "://" in text:
        raise InvalidInputError(
            f"Image URLs are not fetched ('{text[:80]}'): pass the bytes, base64 or a local path.",
            param="inputs",
        )
    if len(text) < 4096 and os.path.isfile(text):
        with open(text, "rb") as f:
            return f.read()
    decoded = decode_base64(text)
    if decoded is None:
        raise InvalidInputError(
            f"{STOCK_INVALID_STRING_INPUT} '{text[:80]}' is neither an existing file nor base64 "
            "image data; send a local path or the base64 encoding of the image file.",
            param="inputs",
        )
    return decoded
