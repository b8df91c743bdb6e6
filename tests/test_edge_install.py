"""The edge install: no torch, transformers or peft required, and the device side runs without them."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "peft", "optimum", "optimum-onnx"}


def _requirements(extra: str | None) -> set[str]:
    """Distribution names that ``pip install fedpeft[extra]`` pulls in directly."""
    names = set()
    for text in importlib.metadata.requires("fedpeft") or []:
        req = Requirement(text)
        if req.marker is None or (extra is not None and req.marker.evaluate({"extra": extra})):
            names.add(req.name.lower())
    return names


def test_the_edge_extra_pulls_no_torch_and_brings_onnx_runtime_training() -> None:
    edge = _requirements("edge")
    assert not edge & HEAVY, edge & HEAVY
    assert {"onnxruntime-training", "tokenizers", "paho-mqtt", "numpy"} <= edge
    assert "onnxruntime" not in edge  # onnxruntime-training provides the module; both would clash
    assert "torch" in _requirements("server")


def test_the_device_side_imports_and_starts_with_torch_unimportable() -> None:
    script = textwrap.dedent(
        """
        import sys
        for name in ("torch", "transformers", "peft"):
            sys.modules[name] = None
        import edge_runtime.agent, edge_runtime.transport, edge_runtime.wire, edge_runtime.chunking
        import edge_runtime.engines.ort_engine, sdk.edge_client
        from edge_runtime.engines.ort_engine import ort_available
        from sdk.cli import main
        assert ort_available()
        try:
            main(["edge", "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        print("loaded:", [n for n in ("torch", "transformers", "peft") if sys.modules.get(n) is not None])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded: []" in done.stdout and "--broker" in done.stdout
