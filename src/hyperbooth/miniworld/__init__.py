"""The miniature world: procedural portraits with exact ground truth, and their captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hyperbooth.errors import HyperboothError


def recipe_from_json(recipe_class: type, path: str | Path | None) -> Any:
    """A recipe dataclass with the fields a JSON file sets (None: the defaults)."""
    if path is None:
        return recipe_class()
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise HyperboothError(f"cannot read the recipe overrides {path}: {error}") from error
    unknown = sorted(set(overrides) - set(recipe_class.__dataclass_fields__))
    if unknown:
        raise HyperboothError(f"{path}: unknown recipe field {unknown[0]!r}")
    return recipe_class(**overrides)
