"""The only module that imports MLflow's private helpers.

MLflow moves and renames these between releases; keeping every import here means
one file to fix when it does.
"""

from __future__ import annotations

from mlflow.models.utils import _save_example as save_example
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME as CONDA_ENV_FILE_NAME,
)
from mlflow.utils.environment import (
    _CONSTRAINTS_FILE_NAME as CONSTRAINTS_FILE_NAME,
)
from mlflow.utils.environment import (
    _PYTHON_ENV_FILE_NAME as PYTHON_ENV_FILE_NAME,
)
from mlflow.utils.environment import (
    _REQUIREMENTS_FILE_NAME as REQUIREMENTS_FILE_NAME,
)
from mlflow.utils.environment import (
    _mlflow_conda_env as mlflow_conda_env,
)
from mlflow.utils.environment import (
    _process_conda_env as process_conda_env,
)
from mlflow.utils.environment import (
    _process_pip_requirements as process_pip_requirements,
)
from mlflow.utils.environment import (
    _PythonEnv as PythonEnv,
)
from mlflow.utils.environment import (
    _validate_env_arguments as validate_env_arguments,
)
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path as add_code_from_conf_to_system_path,
)
from mlflow.utils.model_utils import (
    _download_artifact_from_uri as download_artifact_from_uri,
)
from mlflow.utils.model_utils import (
    _get_flavor_configuration as get_flavor_configuration,
)
from mlflow.utils.model_utils import (
    _validate_and_copy_code_paths as validate_and_copy_code_paths,
)
from mlflow.utils.model_utils import (
    _validate_and_prepare_target_save_path as validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement as get_pinned_requirement

__all__ = [
    "CONDA_ENV_FILE_NAME",
    "CONSTRAINTS_FILE_NAME",
    "PYTHON_ENV_FILE_NAME",
    "REQUIREMENTS_FILE_NAME",
    "PythonEnv",
    "add_code_from_conf_to_system_path",
    "download_artifact_from_uri",
    "get_flavor_configuration",
    "get_pinned_requirement",
    "mlflow_conda_env",
    "process_conda_env",
    "process_pip_requirements",
    "save_example",
    "validate_and_copy_code_paths",
    "validate_and_prepare_target_save_path",
    "validate_env_arguments",
]
