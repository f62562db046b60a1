"""Grammars from constraints, checked and cached per model tokenizer (llguidance).

llguidance is an optional extra: :func:`require_engine` turns its absence into a 400 that
names the extra. Compiling a schema takes well under a millisecond, but the llguidance view
of a vocabulary takes about half a second, so :class:`GrammarCompiler` builds it once per
model, on the first constrained request.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from types import ModuleType
from typing import Any

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.structured.spec import ConstraintSpec
from mlflow_tfx_plugin.structured.tokens import ByteExactTokenizer

INSTALL_HINT = 'pip install "mlflow-tfx-plugin[structured]"'
#: Grammars kept compiled per model (agents may send a new schema with every request).
GRAMMAR_CACHE_SIZE = 256
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[.*?\])")


def require_engine(param: str) -> ModuleType:
    """The llguidance module, with its submodules loaded.

    Raises:
        InvalidInputError: naming ``param`` and the extra to install, without llguidance.
    """
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise InvalidInputError(
            f"'{param}' needs constrained decoding, which this deployment does not have "
            f"installed. Install it with: {INSTALL_HINT}",
            param=param,
        ) from None
    return llguidance


class GrammarCompiler:
    """Compiles constraints into llguidance grammars for one tokenizer, and makes matchers.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's output width (``config.vocab_size``), which may exceed
            ``len(tokenizer)`` (padded embeddings): the extra ids are never allowed.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._lltokenizer: Any = None
        self._lock = threading.Lock()
        self.compile = lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    def lltokenizer(self, param: str = "response_format") -> Any:
        """llguidance's view of the vocabulary (built once)."""
        llg = require_engine(param)
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = _lltokenizer(llg, self._tokenizer, self._vocab_size)
        return self._lltokenizer

    def _compile(self, spec: ConstraintSpec) -> str:
        """The checked grammar for ``spec``.

        Raises:
            InvalidInputError: the schema uses a keyword llguidance does not implement, or
                is not valid (the message names the keyword and the field).
        """
        llg = require_engine(spec.param)
        lltokenizer = self.lltokenizer(spec.param)
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                spec.source, defaults={"whitespace_flexible": False}
            )
        except (ValueError, TypeError) as err:
            raise _schema_error(spec.param, str(err)) from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
        if is_error:
            raise _schema_error(spec.param, messages[0] if messages else "invalid grammar")
        return str(grammar)

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher (one per generated sequence) for a grammar from :meth:`compile`."""
        llg = require_engine("response_format")
        matcher = llg.LLMatcher(self.lltokenizer(), grammar)
        if matcher.is_error():
            raise InvalidInputError(
                f"The grammar could not start: {matcher.get_error()}.", param="response_format"
            )
        return matcher

    @property
    def vocab_size(self) -> int:
        """The bitmask width: llguidance's vocabulary size."""
        return int(self.lltokenizer().vocab_size)


def _lltokenizer(llg: ModuleType, tokenizer: Any, vocab_size: int) -> Any:
    try:
        return llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    except (ValueError, AttributeError, TypeError):  # e.g. a Metaspace decoder, a slow tokenizer
        wrapper = llg.TokenizerWrapper(ByteExactTokenizer(tokenizer))
        return llg.LLTokenizer(wrapper, n_vocab=vocab_size)


def _schema_error(param: str, message: str) -> InvalidInputError:
    unimplemented = _UNIMPLEMENTED.search(message)
    if unimplemented:
        keywords = ", ".join(repr(k) for k in json.loads(unimplemented.group(1)))
        return InvalidInputError(
            f"'{param}' uses unsupported JSON Schema keyword(s) {keywords} ({message}); "
            "constrained decoding cannot enforce them. Remove them from the schema.",
            param=param,
        )
    return InvalidInputError(
        f"'{param}' cannot be enforced: {message}. Fix the schema.", param=param
    )
