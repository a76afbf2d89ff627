"""Scale presets, read from ``datasets/presets.toml`` at the repository root.

``MEMBENCH_PRESETS`` points at another file when the suite runs from an
installed copy that has no repository beside it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference_impl.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = REPO_ROOT / "datasets"
PRESET_NAMES = ("ci", "default", "production")


def presets_path() -> Path:
    return Path(os.environ.get("MEMBENCH_PRESETS", DATASETS_DIR / "presets.toml"))


@dataclass(frozen=True)
class Preset:
    """One scale: the dataset it builds and the load of each scenario."""

    name: str
    dataset: dict[str, Any]
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def load(self, scenario: str) -> dict[str, Any]:
        try:
            return self.loads[scenario]
        except KeyError:
            known = ", ".join(sorted(self.loads))
            raise UsageError(
                f"preset {self.name!r} has no load for scenario {scenario!r}"
                f" (it has: {known})"
            ) from None


def load_preset(name: str) -> Preset:
    path = presets_path()
    with path.open("rb") as fh:
        table = tomllib.load(fh)
    if name not in table:
        known = ", ".join(sorted(table))
        raise UsageError(f"unknown preset {name!r} in {path} (known: {known})")
    entry = table[name]
    return Preset(name=name, dataset=entry["dataset"], loads=entry.get("loads", {}))


def default_dataset_dir(preset: str) -> Path:
    """Where ``dataset build`` writes a preset when no ``--out`` is given."""
    return DATASETS_DIR / preset
