"""The ``tfx`` flavor configuration stored in MLmodel, and its stock-flavor twin.

:class:`FlavorConfig` is the record of what was saved. It converts to and from the
YAML dict in MLmodel (``to_dict``/``from_dict``), and to and from the configuration
of MLflow's built-in ``transformers`` flavor so each flavor can read the other's models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlflow_tfx_plugin.checkpoint import WeightEntry

FLAVOR_NAME = "tfx"
STOCK_FLAVOR_NAME = "transformers"
MODEL_DIR = "model"
PEFT_DIR = "peft"
STOCK_COMPONENTS_DIR = "components"
#: Where stock ``mlflow.transformers`` before 2.4.1 saved the model (no ``model_binary`` key).
OLD_STOCK_MODEL_DIR = "pipeline"
#: MLmodel metadata key of the model's prompt template.
PROMPT_TEMPLATE_KEY = "prompt_template"


@dataclass(kw_only=True)
class FlavorConfig:
    """Everything needed to load a saved model back, as stored under ``flavors.tfx``."""

    task: str
    inference_task: str | None = None
    source_model_name: str | None = None
    source_model_revision: str | None = None
    reference_only: bool = False
    torch_dtype: str | None = None
    pipeline_class: str | None = None
    model_class: str | None = None
    components: dict[str, str] = field(default_factory=dict)
    transformers_version: str | None = None
    model_dir: str = MODEL_DIR
    peft_adapter_dir: str | None = None
    base_model_name: str | None = None
    #: For a PEFT adapter saved with ``base_model_path=``: the local base checkpoint it
    #: loads onto (its weights are not in the model).
    local_base_model_path: str | None = None
    #: Per-task settings read at save time, e.g. embedding pooling.
    task_options: dict[str, Any] = field(default_factory=dict)
    weights: list[WeightEntry] = field(default_factory=list)

    @property
    def adapter_task(self) -> str:
        """The task pyfunc serves: the llm/v1 task when one was asked for, else the native one."""
        return self.inference_task or self.task

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in vars(self).items() if key != "weights"}
        data["weights"] = [entry.to_dict() for entry in self.weights]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlavorConfig:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        known["weights"] = [WeightEntry.from_dict(entry) for entry in data.get("weights") or []]
        known["components"] = dict(data.get("components") or {})
        known["task_options"] = dict(data.get("task_options") or {})
        return cls(**known)

    def to_stock_dict(self) -> dict[str, Any]:
        """The ``flavors.transformers`` section that stock ``mlflow.transformers`` reads."""
        stock_components = [name for name in self.components if name != "processor"]
        data: dict[str, Any] = {
            "task": self.task,
            "instance_type": self.stock_instance_type,
            "framework": "pt",
            "pipeline_model_type": self.model_class,
            "source_model_name": self.source_model_name,
            "components": stock_components,
            "transformers_version": self.transformers_version,
        }
        if self.inference_task:
            data["inference_task"] = self.inference_task
        if self.reference_only:  # stock loads these from the Hub at the pinned commit
            data["source_model_revision"] = self.source_model_revision
            for name in stock_components:
                data[f"{name}_name"] = self.source_model_name
                data[f"{name}_revision"] = self.source_model_revision
        elif self.local_base_model_path:
            data["local_base_model_path"] = self.local_base_model_path
        else:
            data["model_binary"] = self.model_dir
        for name in stock_components:
            data[f"{name}_type"] = self.components[name]
        if "processor" in self.components:
            data["processor_type"] = self.components["processor"]
        if self.torch_dtype:
            data["torch_dtype"] = f"torch.{self.torch_dtype}"  # stock's spelling
        if self.peft_adapter_dir:
            data["peft_adaptor"] = self.peft_adapter_dir
        return {key: value for key, value in data.items() if value is not None}

    @property
    def stock_instance_type(self) -> str | None:
        """The pipeline class stock records: for tasks whose pipelines transformers 5 removed
        (which this flavor runs with runners of its own), the removed pipeline's."""
        # Imported here: `tfx.FLAVOR_NAME` (this module) must not load the task adapters.
        from mlflow_tfx_plugin.tasks import ADAPTERS

        adapter = ADAPTERS.get(self.task)
        return (adapter and adapter.stock_pipeline_class) or self.pipeline_class

    @classmethod
    def from_stock_dict(
        cls, data: dict[str, Any], metadata: dict[str, Any] | None = None
    ) -> FlavorConfig:
        """Read the configuration written by stock ``mlflow.transformers``."""
        components = {name: data[f"{name}_type"] for name in data.get("components") or []}
        if "processor_type" in data:
            components["processor"] = data["processor_type"]
        model_binary = data.get("model_binary")
        local_base = data.get("local_base_model_path")
        inference_task = data.get("inference_task") or (metadata or {}).get("task")
        # Stock's own order: a local base path, else a Hub reference if a revision is
        # recorded, else saved weights (``pipeline/`` before MLflow 2.4.1 wrote model_binary).
        reference_only = not local_base and "source_model_revision" in data and not model_binary
        old_layout = not (model_binary or local_base or reference_only)
        return StockFlavorConfig(
            task=data["task"],
            inference_task=inference_task if str(inference_task).startswith("llm/v1") else None,
            source_model_name=data.get("source_model_name"),
            source_model_revision=data.get("source_model_revision"),
            reference_only=reference_only,
            torch_dtype=data.get("torch_dtype"),
            pipeline_class=data.get("instance_type"),
            model_class=data.get("pipeline_model_type"),
            components=components,
            transformers_version=data.get("transformers_version"),
            model_dir=model_binary or (OLD_STOCK_MODEL_DIR if old_layout else MODEL_DIR),
            peft_adapter_dir=data.get("peft_adaptor"),
            local_base_model_path=local_base,
        )

    @property
    def is_stock_layout(self) -> bool:
        """Stock models keep preprocessors in ``components/<name>/``, not beside the weights."""
        return False


@dataclass(kw_only=True)
class StockFlavorConfig(FlavorConfig):
    """A configuration read from a model logged by stock ``mlflow.transformers``."""

    @property
    def is_stock_layout(self) -> bool:
        return True
