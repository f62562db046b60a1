"""Which model architectures can do which task, read without importing torch.

transformers keeps its Auto-class tables (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ...) as
literal ``OrderedDict``s in ``models/auto/modeling_auto.py``. Importing that module
imports torch (about 2 s and 200 MB here), which logging a checkpoint directory never
needs otherwise; so the literals are read from the source with ``ast`` and the module is
imported only if that fails.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)
_MODULE = "transformers.models.auto.modeling_auto"


def mapping_names(name: str) -> dict[str, str | tuple[str, ...]]:
    """The ``model_type -> class name(s)`` table called ``name`` in ``modeling_auto``."""
    tables = _tables_from_source()
    if name in tables:
        return tables[name]
    return dict(getattr(importlib.import_module(_MODULE), name, {}))


@functools.cache
def _tables_from_source() -> dict[str, dict[str, str | tuple[str, ...]]]:
    try:
        source = _modeling_auto_path().read_text(encoding="utf-8")
        return dict(_literal_tables(ast.parse(source)))
    except (OSError, SyntaxError, ValueError) as err:
        _logger.debug("Reading %s from source failed (%s); importing it instead.", _MODULE, err)
        return {}


def _modeling_auto_path() -> Path:
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise OSError("transformers is not installed")
    return Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py"


def _literal_tables(tree: ast.Module):  # type: ignore[no-untyped-def]
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if (
            isinstance(target, ast.Name)
            and target.id.endswith("_MAPPING_NAMES")
            and isinstance(value, ast.Call)
            and getattr(value.func, "id", None) == "OrderedDict"
            and len(value.args) == 1
        ):
            try:
                yield target.id, dict(ast.literal_eval(value.args[0]))
            except ValueError:  # not a pure literal: that table is imported instead
                continue
