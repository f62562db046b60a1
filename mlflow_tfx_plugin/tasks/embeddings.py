"""``llm/v1/embeddings``: OpenAI embeddings, pooled the way the checkpoint says.

Pooling follows a sentence-transformers checkpoint (``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module) and falls back to mean pooling, so
results match ``SentenceTransformer.encode``. The settings are read at save time and
stored in the flavor config as task options.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mlflow_tfx_plugin.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, Usage
from mlflow_tfx_plugin.tasks.base import Components
from mlflow_tfx_plugin.tasks.llm import LLMAdapter, extend_schema
from mlflow_tfx_plugin.tasks.text import FeatureExtractionAdapter

if TYPE_CHECKING:
    from mlflow.types.schema import Schema

PoolingMode = Literal["mean", "cls", "max", "lasttoken"]
_POOLING_KEYS: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def pooling_options(checkpoint_dir: Path | None) -> dict[str, Any]:
    """Pooling settings of a sentence-transformers checkpoint; mean pooling otherwise."""
    options: dict[str, Any] = {"pooling": "mean", "normalize": False, "max_length": None}
    if checkpoint_dir is None or not (checkpoint_dir / "modules.json").is_file():
        return options
    modules = json.loads((checkpoint_dir / "modules.json").read_text(encoding="utf-8"))
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config_path = checkpoint_dir / module.get("path", "") / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            options["pooling"] = next(
                (mode for key, mode in _POOLING_KEYS.items() if config.get(key)), "mean"
            )
        elif kind.endswith("Normalize"):
            options["normalize"] = True
    st_config = checkpoint_dir / "sentence_bert_config.json"
    if st_config.is_file():
        options["max_length"] = json.loads(st_config.read_text(encoding="utf-8")).get(
            "max_seq_length"
        )
    return options


@dataclass
class EmbeddingRunner:
    """Encodes texts into one vector each: a forward pass, pooling, optional normalization."""

    model: Any
    tokenizer: Any
    pooling: PoolingMode = "mean"
    normalize: bool = False
    max_length: int | None = None
    task: str = "feature-extraction"
    batch_size: int = 32

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Embeddings (one row per text) and each text's number of tokens.

        More than ``batch_size`` texts are encoded in batches of similar lengths (longest
        first, as sentence-transformers does), so little compute goes to padding and memory
        stays bounded however many texts arrive.
        """
        if len(texts) <= self.batch_size:
            return self._encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        parts = [
            self._encode_batch([texts[i] for i in order[start : start + self.batch_size]])
            for start in range(0, len(order), self.batch_size)
        ]
        vectors = np.empty((len(texts), parts[0][0].shape[1]), dtype=parts[0][0].dtype)
        vectors[order] = np.concatenate([part_vectors for part_vectors, _ in parts])
        counts: np.ndarray = np.empty(len(texts), dtype=np.int64)
        counts[order] = np.concatenate([part_counts for _, part_counts in parts])
        return vectors, counts.tolist()

    def _encode_batch(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        import torch

        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",  # positions start at 0 for every text, causal LMs included
            truncation=True,
            max_length=self.max_length,
        ).to(self.model.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        vectors = _pool(hidden, batch["attention_mask"], self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.float().cpu().numpy(), batch["attention_mask"].sum(dim=1).tolist()


def _pool(hidden: Any, mask: Any, mode: PoolingMode) -> Any:
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingsAdapter(LLMAdapter):
    """Embeddings for a string or a list of strings, in ``float`` or ``base64`` encoding."""

    task = "llm/v1/embeddings"
    native_task = FeatureExtractionAdapter.task
    #: What stock ``mlflow.transformers`` records for the same model (see GenerativeAdapter).
    pipeline_class = FeatureExtractionAdapter.pipeline_class
    model_mappings = FeatureExtractionAdapter.model_mappings
    auto_model_class = "AutoModel"
    load_with_auto_class = True
    request_model = EmbeddingRequest
    embeds_text = True

    @classmethod
    def input_schema(cls) -> Schema:
        from mlflow.types.llm import EMBEDDING_MODEL_INPUT_SCHEMA
        from mlflow.types.schema import ColSpec

        encoding_format = ColSpec("string", "encoding_format", required=False)
        return extend_schema(EMBEDDING_MODEL_INPUT_SCHEMA, encoding_format)

    @classmethod
    def output_schema(cls) -> Schema:
        from mlflow.types.llm import EMBEDDING_MODEL_OUTPUT_SCHEMA

        return EMBEDDING_MODEL_OUTPUT_SCHEMA

    @classmethod
    def read_task_options(cls, checkpoint_dir: Path | None) -> dict[str, Any]:
        """The checkpoint's pooling settings (see :func:`pooling_options`)."""
        return pooling_options(checkpoint_dir)

    @classmethod
    def build_runner(cls, components: Components, **task_options: Any) -> EmbeddingRunner:
        model = components["model"]
        return EmbeddingRunner(
            model=getattr(model, "base_model", model),
            tokenizer=components["tokenizer"],
            **task_options,
        )

    def respond(self, requests: list[EmbeddingRequest]) -> list[dict[str, Any]]:
        texts = [text for request in requests for text in request.inputs]
        vectors, token_counts = self.runner.encode(texts)  # every request in one forward pass
        responses = self.respond_encoded(requests, vectors, token_counts)
        return [response.model_dump() for response in responses]

    def respond_encoded(
        self, requests: list[EmbeddingRequest], vectors: np.ndarray, token_counts: list[int]
    ) -> list[EmbeddingResponse]:
        """Responses for ``requests`` from their texts' vectors and token counts, in order."""
        responses, offset = [], 0
        for request in requests:
            end = offset + len(request.inputs)
            own, tokens = vectors[offset:end], sum(token_counts[offset:end])
            offset = end
            data = [
                Embedding(index=i, embedding=_encode(vector, request.encoding_format))
                for i, vector in enumerate(own)
            ]
            response = EmbeddingResponse(
                data=data, model=self.response_model_name(request), usage=Usage.of(tokens)
            )
            responses.append(response)
        return responses


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype(np.float32).tobytes()).decode("ascii")
    return vector.astype(float).tolist()
