"""``--set section.key=value`` overrides on a plain config (nested sections, as read from YAML)."""

from __future__ import annotations

from typing import Any

import yaml

from ecoadapt.core.errors import UserError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is read as YAML (numbers, lists, null, true)."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set {item}: the key must be section.key (for example train.lr)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {item}: the value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """Set each ``section.key=value`` of ``overrides`` in the plain config ``raw`` (in place, and returned)."""
    for item in overrides:
        (section, key), value = parse_override(item)
        existing = raw.setdefault(section, {})
        if existing is None:
            existing = raw[section] = {}
        if not isinstance(existing, dict):
            raise UserError(f"{source}: section '{section}' must be a mapping of keys")
        existing[key] = value
    return raw
