"""The presets shipped with the package (YAML files in ``ecoadapt/presets``), found by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ecoadapt.core.errors import UserError


def preset_names() -> list[str]:
    """The presets shipped with the package, by name (the file name without ``.yaml``)."""
    folder = resources.files("ecoadapt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name: str | Path) -> Path:
    """A config file's path, or the path of the shipped preset of that name.

    Raises:
        UserError: neither a file nor a preset (the message lists the presets).
    """
    path = Path(name)
    if path.exists() or str(name).endswith((".yaml", ".yml")):
        return path
    if str(name) in preset_names():
        return Path(str(resources.files("ecoadapt") / "presets" / f"{name}.yaml"))
    raise UserError(f"{name}: no such config file or preset (presets: {', '.join(preset_names())})")
