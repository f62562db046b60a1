"""The ``tfx`` MLflow deployment target (entry point ``mlflow.deployments: tfx``).

MLflow's plugin loader requires ``run_local``, ``target_help`` and exactly one
``BaseDeploymentClient`` subclass in this module's namespace; keep it that way.
"""

from mlflow_tfx_plugin.deployments.client import TfxDeploymentClient, run_local
from mlflow_tfx_plugin.deployments.usage import target_help

__all__ = ["TfxDeploymentClient", "run_local", "target_help"]
