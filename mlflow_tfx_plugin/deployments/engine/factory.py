"""Choose the generation engine for a model: continuous batching where it runs."""

from __future__ import annotations

import logging

from mlflow_tfx_plugin.deployments.engine.base import EngineSettings, GenerationEngine
from mlflow_tfx_plugin.deployments.engine.continuous import ContinuousBatchingEngine
from mlflow_tfx_plugin.deployments.engine.micro import MicroBatchingEngine
from mlflow_tfx_plugin.generation import TextGenerator

_logger = logging.getLogger(__name__)


def create_generation_engine(
    generator: TextGenerator, settings: EngineSettings, *, continuous: bool = True
) -> GenerationEngine:
    """Continuous batching when the model supports it, else dynamic micro-batching."""
    if continuous:
        try:
            return ContinuousBatchingEngine(generator, settings)
        except Exception as err:  # an architecture or attention the manager cannot run
            _logger.warning(
                "Continuous batching is not available for this model (%s); using dynamic "
                "micro-batching instead.",
                err,
            )
    return MicroBatchingEngine(generator, settings)
