"""The two helpers benchmarks share with the integration tests, loaded by file path.

``integration/hub_server.py`` (the local Hugging Face Hub double) and
``integration/servers.py`` (start a server, wait until it answers, stop it) import the
standard library, ``requests`` and ``psutil`` only: they are support code kept beside the
tests, not tests. Loading them by path, instead of importing the ``integration`` package, keeps the
benchmarks off pytest and the test suite, and means one copy of each for both.

    from _shared import hub_server, servers
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

INTEGRATION_DIR = Path(__file__).resolve().parents[1] / "integration"


def _load(name: str) -> ModuleType:
    """``integration/<name>.py`` as the module ``_shared_<name>`` (loaded once)."""
    module_name = f"_shared_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, INTEGRATION_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {INTEGRATION_DIR / f'{name}.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


hub_server = _load("hub_server")
servers = _load("servers")
