"""Per-request grammar masks and logprobs inside transformers' continuous-batching manager.

The manager's own per-request processors take only numeric arguments, so a grammar cannot
ride in ``add_request``. Its processor list is open, though: a
:class:`~mlflow_tfx_plugin.structured.ControlProcessor` appended to it (after the
temperature, top-k and top-p warpers) sees every step's logits, one row per request that
gets a new token, in the order of ``batch_processor.inputs_and_outputs.requests_in_batch``.
:class:`ControlRegistry` maps those rows to the :class:`RowControls` registered by request
id; rows without an entry are left untouched. A controlled request is submitted with
neutral warpers (temperature 1, top-k the whole vocabulary, top-p 1), so the processor does
its own warping after the mask and leaves a one-hot row that the manager's sampler keeps.

This and :mod:`.cb_sampling` are the only modules that touch the manager's internals
(checked on transformers 5.24). :func:`install_controls` checks they are there, and
:func:`self_check` runs one short request through the hook; when either fails, the engine
keeps sending controlled requests to micro-batching. The processor runs Python on the host
every step, so it needs the manager's synchronous IO path and no CUDA graphs: what
transformers picks on CPU. Where it picks either (CUDA), the hook is not installed, so
plain requests keep their speed; turning both off for controlled requests there is
unmeasured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mlflow_tfx_plugin.structured.controls import ControlProcessor, RowControls

_logger = logging.getLogger(__name__)

#: How long the start-up check waits for its request (seconds).
_SELF_CHECK_TIMEOUT_S = 30.0


class ControlRegistry:
    """The :class:`RowControls` of the manager's controlled requests, by request id.

    Attributes:
        processor: the processor installed in the manager.
        registered: requests ever registered (how many controlled requests the manager ran).
    """

    def __init__(self, manager: Any, *, eos_token_id: int, mask_width: Callable[[], int]) -> None:
        self._manager = manager
        self._controls: dict[str, RowControls] = {}
        self._lock = threading.Lock()
        self.registered = 0
        self.processor = ControlProcessor(
            self.batch_rows, eos_token_id=eos_token_id, mask_width=mask_width
        )

    def register(self, request_id: str, controls: RowControls, *, served: bool = True) -> None:
        """Decode ``request_id`` with ``controls`` (``served``: count it in ``registered``)."""
        with self._lock:
            self._controls[request_id] = controls
            if served:
                self.registered += 1

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._controls.pop(request_id, None)

    def batch_rows(self) -> list[RowControls | None]:
        """Per row of the current step's logits, its request's controls (loop thread)."""
        requests = self._manager.batch_processor.inputs_and_outputs.requests_in_batch
        with self._lock:
            return [
                self._controls.get(state.state.request_id)
                for state in requests
                if state.has_new_token
            ]


def install_controls(
    manager: Any, *, eos_token_id: int, mask_width: Callable[[], int]
) -> ControlRegistry | None:
    """Append the control processor to a manager that has not started yet.

    Returns None (and logs why) when the manager's internals are not the ones this hook
    was written for.
    """
    try:
        config = manager.continuous_batching_config
        if config.use_async_batching or any(config.cuda_graph_booleans):
            raise TypeError("it needs the synchronous loop without CUDA graphs")
        processors = manager.logit_processor.logits_processor
        if not isinstance(processors, list) or not hasattr(manager, "batch_processor"):
            raise TypeError("unexpected manager layout")
        registry = ControlRegistry(manager, eos_token_id=eos_token_id, mask_width=mask_width)
        processors.append(registry.processor)
        manager.logit_processor.do_processing = True
    except Exception as err:  # any other transformers version: keep the fallback
        _logger.warning(
            "Constrained and logprobs requests will be micro-batched: their processor cannot "
            "run in this continuous-batching manager (%s).",
            err,
        )
        return None
    return registry


def uninstall_controls(manager: Any, registry: ControlRegistry) -> None:
    """Take the processor out again (the self-check failed)."""
    processors = manager.logit_processor.logits_processor
    if registry.processor in processors:
        processors.remove(registry.processor)
    manager.logit_processor.do_processing = len(processors) > 0  # as transformers sets it


def self_check(
    manager: Any, registry: ControlRegistry, input_ids: list[int], sampling: dict[str, Any]
) -> bool:
    """Run one short greedy logprobs request through the started manager, before any other:
    the hook works if it recorded one logprob per generated token, each the top one, and
    the manager kept the tokens it picked."""
    request_id = "tfx-cb-hooks-self-check"
    controls = RowControls(temperature=0.0, top_logprobs=1)
    registry.register(request_id, controls, served=False)
    try:
        manager.add_request(
            list(input_ids),
            request_id=request_id,
            max_new_tokens=3,
            streaming=False,
            eos_token_id=-1,
            **sampling,
        )
        output = _wait_for(manager, request_id)
    except Exception as err:
        _logger.warning("The continuous-batching control hook failed its check: %s", err)
        return False
    finally:
        registry.forget(request_id)
    tokens = list(getattr(output, "generated_tokens", None) or ())
    recorded = [item.token_id for item in controls.records]
    tops = [item.top[0][0] if item.top else None for item in controls.records]
    if not tokens or recorded != tokens or tops != tokens:
        _logger.warning(
            "The continuous-batching control hook failed its check (tokens %s, recorded %s); "
            "constrained and logprobs requests will be micro-batched.",
            tokens,
            recorded,
        )
        return False
    return True


def _wait_for(manager: Any, request_id: str) -> Any:
    deadline = time.monotonic() + _SELF_CHECK_TIMEOUT_S
    while time.monotonic() < deadline:
        output = manager.get_result(request_id=request_id, timeout=1)
        if output is not None and output.error:
            raise RuntimeError(output.error)
        if output is not None and output.is_finished():
            return output
    raise TimeoutError(f"no result within {_SELF_CHECK_TIMEOUT_S:g} s")
