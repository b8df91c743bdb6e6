"""Device profiles: the schema, bundled profiles of real devices, and ``measure()`` for this host.

Bundled profiles are JSON files in ``hw_profiles/profiles/``, one per device, named after the
profile. Errors are :class:`ProfileError` (a ``ValueError``); ``edge_runtime`` reports them as
``ConfigError``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from hw_profiles.measure import measure
from hw_profiles.schema import DeviceProfile, ProfileError

__all__ = ["DeviceProfile", "ProfileError", "list_profiles", "load_profile", "measure"]


def list_profiles() -> list[str]:
    """Names of the bundled profiles, sorted."""
    folder = resources.files("hw_profiles").joinpath("profiles")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A bundled profile by name (see ``list_profiles()``), or a profile JSON file by path."""
    text_name = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text_name.endswith(".json") or "/" in text_name
    if looks_like_path:
        path = Path(name_or_path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ProfileError(
                f"cannot read device profile file {path}: {exc.strerror or exc}; "
                f"bundled profiles: {', '.join(list_profiles())}"
            ) from None
        source = str(path)
    else:
        res = resources.files("hw_profiles").joinpath("profiles", f"{text_name}.json")
        if not res.is_file():
            raise ProfileError(f"unknown device profile {text_name!r}; known: {', '.join(list_profiles())}")
        text = res.read_text()
        source = f"bundled profile {text_name!r}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source} is not valid JSON: {exc}") from None
    try:
        return DeviceProfile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None
