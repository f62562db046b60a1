"""Model card and license files, taken from a local checkpoint. Never from the network."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

MODEL_CARD_FILE = "model_card.md"
LICENSE_FILE = "LICENSE.txt"
_LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
_FRONT_MATTER_LICENSE = re.compile(r"^---\s*$.*?^license:\s*(\S+)\s*$.*?^---\s*$", re.M | re.S)


def write_model_card(source_dir: Path | None, destination: Path) -> None:
    """Copy README.md as the model card and write the license, when the source has them."""
    if source_dir is None or not source_dir.is_dir():
        return
    readme = source_dir / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, destination / MODEL_CARD_FILE)
    for name in _LICENSE_NAMES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, destination / LICENSE_FILE)
            return
    if readme.is_file() and (license_id := license_from_card(readme.read_text(encoding="utf-8"))):
        (destination / LICENSE_FILE).write_text(
            f"This model is licensed under '{license_id}' (from its model card).\n",
            encoding="utf-8",
        )


def license_from_card(text: str) -> str | None:
    """The ``license:`` value of a model card's YAML front matter."""
    match = _FRONT_MATTER_LICENSE.search(text)
    return match.group(1) if match else None
