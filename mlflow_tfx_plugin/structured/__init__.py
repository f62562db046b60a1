"""Constrained decoding: ``response_format`` grammars, enforced token by token (re-exports)."""

from mlflow_tfx_plugin.structured.controls import ControlProcessor, RowControls
from mlflow_tfx_plugin.structured.grammar import (
    INSTALL_HINT,
    GrammarCompiler,
    require_engine,
)
from mlflow_tfx_plugin.structured.spec import ConstraintSpec

__all__ = [
    "INSTALL_HINT",
    "ConstraintSpec",
    "ControlProcessor",
    "GrammarCompiler",
    "RowControls",
    "require_engine",
]
