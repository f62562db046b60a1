"""Batching over one loaded model, for the deployment server: engines behind one protocol.

- :mod:`.continuous`: transformers' continuous batching, sequences joining and leaving
  the running batch at every step; :mod:`.cb_sampling` keeps the manager's greedy rows
  off its vocabulary-wide sorts, :mod:`.cb_hooks` runs grammars and logprobs in it.
- :mod:`.threads`: every other piece of torch work runs in a thread that ends with it,
  so the manager's loop keeps the only OpenMP pool (two pools slow CPU matmuls down).
- :mod:`.micro`: requests collected for a few milliseconds share one ``generate``.
- :mod:`.base`: the :class:`GenerationEngine` protocol and :class:`EngineSettings`.

No request can fail another: sampling parameters are checked (or made greedy) before a
request joins a batch (:func:`~mlflow_tfx_plugin.generation.runnable_params`), a
micro-batch fails per group of equal parameters, and if transformers' loop dies anyway,
its requests fail and the engine restarts it (a bounded number of times per window).
"""

from mlflow_tfx_plugin.deployments.engine.base import (
    EngineSettings,
    GenerationEngine,
    check_max_tokens,
)
from mlflow_tfx_plugin.deployments.engine.continuous import (
    KV_TOKENS_PER_SEQUENCE,
    ContinuousBatchingEngine,
    kv_cache_blocks,
)
from mlflow_tfx_plugin.deployments.engine.factory import create_generation_engine
from mlflow_tfx_plugin.deployments.engine.micro import MicroBatchingEngine

__all__ = [
    "KV_TOKENS_PER_SEQUENCE",
    "ContinuousBatchingEngine",
    "EngineSettings",
    "GenerationEngine",
    "MicroBatchingEngine",
    "check_max_tokens",
    "create_generation_engine",
    "kv_cache_blocks",
]
