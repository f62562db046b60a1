"""The only module that imports MLflow's private helpers.

MLflow moves and renames these between releases; keeping every import here means
one file to fix when it does.
"""

from __future__ import annotations

from mlflow.models.utils import _contains_params as contains_params
from mlflow.models.utils import _save_example as save_example
from mlflow.store.artifact.utils.models import (
    get_model_name_and_version as get_model_name_and_version,
)
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

# ``mlflow.server.constants.READ_REPLICA_BACKEND_STORE_URI_ENV_VAR``: the variable through which
# ``mlflow server`` hands its ``--read-replica-backend-store-uri`` to the workers, whose
# registry-store builder passes it on as ``read_db_uri``. Copied, not imported: importing
# ``mlflow.server`` pulls in Flask and every handler (about 2 s), and ``mlflow.server.handlers``
# loads the registry entry points while it is being imported. tests/test_registry.py checks
# that the copy still matches.
READ_REPLICA_BACKEND_STORE_URI_ENV_VAR = "_MLFLOW_SERVER_READ_REPLICA_BACKEND_STORE"

__all__ = [
    "CONDA_ENV_FILE_NAME",
    "CONSTRAINTS_FILE_NAME",
    "PYTHON_ENV_FILE_NAME",
    "READ_REPLICA_BACKEND_STORE_URI_ENV_VAR",
    "REQUIREMENTS_FILE_NAME",
    "PythonEnv",
    "add_code_from_conf_to_system_path",
    "contains_params",
    "download_artifact_from_uri",
    "get_flavor_configuration",
    "get_model_name_and_version",
    "get_pinned_requirement",
    "mlflow_conda_env",
    "process_conda_env",
    "process_pip_requirements",
    "save_example",
    "validate_and_copy_code_paths",
    "validate_and_prepare_target_save_path",
    "validate_env_arguments",
]


# --- Inside `mlflow server`: the backend store and artifact destination it was started with.
# ``mlflow.server.constants`` names the variables through which MLflow hands them to its
# workers. Copied for the same reason as above (importing mlflow.server costs ~2 s and
# re-enters the registry entry points); tests/test_persist.py checks the copies.
BACKEND_STORE_URI_ENV_VAR = "_MLFLOW_SERVER_FILE_STORE"
ARTIFACTS_DESTINATION_ENV_VAR = "_MLFLOW_SERVER_ARTIFACT_DESTINATION"


def server_artifact_destination() -> str | None:
    """The ``--artifacts-destination`` of the running ``mlflow server``, if in one."""
    import os

    return os.environ.get(ARTIFACTS_DESTINATION_ENV_VAR)


def server_tracking_store() -> object | None:
    """The tracking store of the running ``mlflow server``, if in one."""
    import os

    if not os.environ.get(BACKEND_STORE_URI_ENV_VAR):
        return None
    from mlflow.server.handlers import _get_tracking_store  # already imported by the server

    return _get_tracking_store()
