"""Model card and license files: from the user's ``model_card=`` or a local checkpoint.

Written as stock ``mlflow.transformers`` writes them: the card's text in ``model_card.md``
and its YAML metadata in ``model_card_data.yaml``. Never fetched from the network.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from mlflow_tfx_plugin.errors import InvalidInputError

_logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "model_card.md"
MODEL_CARD_DATA_FILE = "model_card_data.yaml"
LICENSE_FILE = "LICENSE.txt"
_LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def write_model_card(source_dir: Path | None, destination: Path, model_card: Any = None) -> None:
    """Write the model card and the license, when there are any.

    Args:
        source_dir: a local checkpoint directory; its README.md is the card unless
            ``model_card`` is given, and its LICENSE file is copied.
        destination: the saved model's directory.
        model_card: a ``huggingface_hub.ModelCard`` (anything with ``text`` and ``data``).
    """
    readme = source_dir / "README.md" if source_dir is not None else None
    card = _as_card(model_card) if model_card is not None else _card_from_readme(readme)
    if card is not None:
        (destination / MODEL_CARD_FILE).write_text(card.text, encoding="utf-8")
        with open(destination / MODEL_CARD_DATA_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(card.data.to_dict(), f, default_flow_style=False)
    _write_license(source_dir, destination, card)


def _as_card(model_card: Any) -> Any:
    if not (hasattr(model_card, "text") and hasattr(getattr(model_card, "data", None), "to_dict")):
        raise InvalidInputError(
            f"model_card must be a huggingface_hub.ModelCard, got {type(model_card).__name__}. "
            "Build one with huggingface_hub.ModelCard(text) or ModelCard.load(path).",
            param="model_card",
        )
    return model_card


def _card_from_readme(readme: Path | None) -> Any:
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme)
    except Exception as err:  # a malformed card must not fail the save: keep the raw text
        _logger.warning("Could not parse the model card %s (%s); saving it as is.", readme, err)
        return ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True)


def _write_license(source_dir: Path | None, destination: Path, card: Any) -> None:
    """The checkpoint's LICENSE file; else a note, as stock writes one, naming the card's
    declared license when there is one."""
    for name in _LICENSE_NAMES:
        if source_dir is not None and (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, destination / LICENSE_FILE)
            return
    where = f" in '{source_dir}'" if source_dir is not None else ""
    note = (
        f"A license file could not be found{where}. To ensure that you are in compliance with "
        "the license requirements for this model, check the license where it comes from."
    )
    license_id = getattr(getattr(card, "data", None), "license", None)
    if license_id and license_id != "other":
        note += f"\nThe declared license type is: '{license_id}' (from its model card)."
    else:
        _logger.warning(
            "No license information was found for this model; check its license before use."
        )
    (destination / LICENSE_FILE).write_text(note + "\n", encoding="utf-8")
