"""The edge install: no torch, transformers or peft required, and the device side runs without them.

The extras are read from this checkout's pyproject.toml (not from the installed metadata, which
may be another checkout's editable install), with their markers evaluated for the target machine:

- ``edge``: plain onnxruntime (engine ort-plain) and no tokenizers (the built-in WordPiece
  tokenizer reads the BERT-family ``tokenizer.json``, ``tests/test_wordpiece.py``, and keeps the
  Hugging Face Hub stack that tokenizers pulls in off the device); it resolves to binary wheels
  only for Linux aarch64 (Raspberry Pi OS, glibc 2.36) on CPython 3.11 and 3.13, checked with
  pip's resolver against the package registry (skipped, with the reason, where it is unreachable).
- ``edge-training``: onnxruntime-training on Linux x86_64 with CPython <= 3.11 (engine ort),
  nothing that clashes with it.
- ``server``/``all``/``dev``: exactly one ONNX Runtime (both install the ``onnxruntime`` module
  and would overwrite each other): onnxruntime-training with onnx 1.16.2 where it installs, plain
  onnxruntime with onnx 1.18.0 everywhere else (CPython 3.12 and 3.13, ARM), so that they install
  on every CPython from 3.11 to 3.13.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "peft", "optimum", "optimum-onnx"}
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Raspberry Pi OS Bookworm has glibc 2.36 (Trixie 2.41): every manylinux tag up to 2.36 installs.
# pip takes --platform tags literally, so each one is named.
AARCH64_TAGS = [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)] + ["manylinux2014_aarch64"]
# what pip prints when it cannot reach an index, as opposed to finding no matching wheel there
OFFLINE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is "
    r"unreachable|Failed to establish a new connection|ConnectTimeout|ReadTimeout|ProxyError|"
    r"Name or service not known|Connection refused"
)


def _environment(machine: str, python: str) -> dict[str, str]:
    """Marker variables of a Linux CPython ``python`` on ``machine``."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "platform_machine": machine,
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def _install_requirements(extra: str | None, env: dict[str, str]) -> list[Requirement]:
    """What ``pip install fedpeft[extra]`` asks for directly on ``env``: the core dependencies and
    the extra's, self-references (``fedpeft[a,b]``) expanded where their markers hold, markers
    evaluated, markers dropped."""
    wanted = [Requirement(t) for t in PROJECT["dependencies"]]
    pending = [extra] if extra else []
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in PROJECT["optional-dependencies"][name]:
            req = Requirement(text)
            if req.name == PROJECT["name"]:  # the server takes the edge extra where it has a marker
                if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                    pending.extend(req.extras)
            else:
                wanted.append(req)
    out = []
    for req in wanted:
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            req.marker = None
            out.append(req)
    return out


def _requirements(extra: str | None, machine: str = "x86_64", python: str = "3.11") -> set[str]:
    """Distribution names that ``pip install fedpeft[extra]`` pulls in directly on that machine."""
    return {r.name.lower() for r in _install_requirements(extra, _environment(machine, python))}


def test_the_edge_extra_pulls_no_torch_and_brings_onnx_runtime_training() -> None:
    # (named before the edge extra moved to plain onnxruntime; edge-training has onnxruntime-training)
    edge = _requirements("edge")
    assert not edge & HEAVY, edge & HEAVY
    assert {"onnxruntime", "paho-mqtt", "numpy"} <= edge
    assert not edge & {"tokenizers", "huggingface-hub"}  # ~35 MB installed: the built-in tokenizer runs
    assert "onnxruntime-training" not in edge  # both provide the onnxruntime module; they would clash
    training = _requirements("edge-training")
    assert {"onnxruntime-training", "tokenizers"} <= training and "onnxruntime" not in training
    assert not training & HEAVY
    server = _requirements("server")
    assert "torch" in server
    # clustering on the server side only (tests/test_import_graph.py: no device module imports them)
    assert {"scikit-learn", "scipy"} <= server and not (edge | training) & {"scikit-learn", "scipy"}


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_each_extra_brings_exactly_one_onnx_runtime(python: str) -> None:
    for machine in ("aarch64", "x86_64"):
        edge = _requirements("edge", machine, python)
        assert "onnxruntime" in edge and "onnxruntime-training" not in edge and not edge & HEAVY
    # onnxruntime-training has wheels for x86_64 and CPython <= 3.11 only: elsewhere it is left out
    assert "onnxruntime-training" not in _requirements("edge-training", "aarch64", python)
    assert ("onnxruntime-training" in _requirements("edge-training", "x86_64", python)) == (python == "3.11")
    # the server, the simulator and the test suite: one ONNX Runtime, and the onnx that suits it
    # (onnx 1.17+ writes IR versions that onnxruntime-training 1.19 cannot load)
    for machine in ("aarch64", "x86_64"):
        training = machine == "x86_64" and python == "3.11"
        for extra in ("server", "all", "dev"):
            pins = {
                r.name.lower(): str(r.specifier)
                for r in _install_requirements(extra, _environment(machine, python))
            }
            assert {"torch", "onnx"} <= pins.keys(), (extra, machine, python)
            assert ("onnxruntime-training" in pins) == training, (extra, machine, python, pins)
            assert ("onnxruntime" in pins) != training, (extra, machine, python, pins)
            assert pins["onnx"] == ("==1.16.2" if training else "==1.18.0"), (extra, machine, python)
            assert pins["torch"] == "==2.13.0"
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"{python}.0")


@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_the_edge_extra_resolves_to_wheels_for_linux_aarch64(python: str, tmp_path: Path) -> None:
    """pip's resolver, binary wheels only, for a Raspberry Pi (64-bit OS) with CPython ``python``."""
    requirements = [str(r) for r in _install_requirements("edge", _environment("aarch64", python))]
    report = tmp_path / "report.json"
    platforms = [arg for tag in AARCH64_TAGS for arg in ("--platform", tag)]
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
        "--only-binary=:all:", *platforms, "--python-version", python, "--implementation", "cp",
        "--target", str(tmp_path / "target"), "--report", str(report), *requirements,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 240 s")
    if done.returncode != 0 and OFFLINE.search(done.stdout + done.stderr):
        pytest.skip(f"the package registry is unreachable: {OFFLINE.search(done.stdout + done.stderr)}")
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {
        i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[-1]
        for i in json.loads(report.read_text())["install"]
    }
    assert {"onnxruntime", "numpy", "paho-mqtt", "psutil", "tqdm"} <= set(installed)
    unwanted = HEAVY | {"onnxruntime-training", "tokenizers", "huggingface-hub"}
    assert not set(installed) & unwanted, sorted(installed)
    pins = {
        r.name.lower(): r.specifier for r in _install_requirements("edge", _environment("aarch64", python))
    }
    version = installed["onnxruntime"].split("-")[1]
    assert pins["onnxruntime"].contains(version), (version, pins["onnxruntime"])
    cp = "cp" + python.replace(".", "")
    for name, wheel in installed.items():
        assert wheel.endswith(".whl"), (name, wheel)
        _, _, py_tag, abi_tag, plat_tag = wheel[: -len(".whl")].rsplit("-", 4)
        assert plat_tag == "any" or all(p.endswith("_aarch64") for p in plat_tag.split(".")), wheel
        assert py_tag.startswith("py") or abi_tag == "abi3" or cp in py_tag.split("."), wheel


def test_the_device_side_imports_and_starts_with_torch_unimportable() -> None:
    script = textwrap.dedent(
        """
        import sys
        for name in ("torch", "transformers", "peft", "sklearn", "scipy"):  # none on an edge install
            sys.modules[name] = None
        import edge_runtime.agent, edge_runtime.transport, edge_runtime.wire, edge_runtime.chunking
        import edge_runtime.engines.ort_engine, sdk.edge_client
        from edge_runtime.engines.ort_engine import ort_available
        from edge_runtime.engines.ort_step_engine import plain_ort_available
        from sdk.cli import main
        assert ort_available() or plain_ort_available()  # the first on CPython 3.11, else the second
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
