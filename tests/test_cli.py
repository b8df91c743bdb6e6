"""The command line: help for every subcommand, one clear line and status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdk.cli import build_parser, main, probe_spec

SUBCOMMANDS = ("profile", "simulate", "serve", "edge", "centralized")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["simulate", "--data", "x", "--clients", "0"], "positive integer"),
        (["simulate", "--data", "x", "--samples-per-client", "most"], "positive integer or 'all'"),
        (["centralized", "--data", "x", "--samples-per-client", "0"], "positive integer or 'all'"),
        (["simulate", "--data", "x", "--head-scale", "0"], "positive number"),
        (["serve", "--data", "x", "--head-scale", "nan"], "positive number"),
        (["simulate", "--data", "x", "--bits", "3"], "invalid choice"),
        (["simulate", "--data", "x", "--micro-batch", "-1"], "non-negative integer"),
        (["serve", "--data", "x", "--micro-batch", "eight"], "non-negative integer"),
        (["simulate", "--data", "x", "--partition", "zipf:2"], "partition"),
        (["simulate", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["simulate", "--data", "x", "--broker", "http://h:1"], "mqtt://"),
        (["simulate", "--data", "x", "--profiles", "low=0.5,high=0.2"], "sum to 1"),
        (["simulate", "--data", "x", "--strategy", "krum"], "unknown strategy"),
        (["profile", "--probe", "bitfit:4"], "lora, adapter or prompt"),
        (["profile", "--probe", "lora:four"], "not a whole number"),
        (["profile", "--probe", "adapter:0"], "bottleneck must be a positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


@pytest.mark.parametrize(
    "argv, usage, error",
    [
        (
            ["simulate", "--data", "x", "--bits", "3"],
            "fedpeft simulate --data DATA [options]",
            "argument --bits: invalid choice: 3",
        ),
        (
            ["simulate", "--data", "x", "--bogus", "1"],
            "fedpeft simulate --data DATA [options]",
            "unrecognized arguments: --bogus 1",  # named by the subcommand, not by fedpeft
        ),
        (
            ["serve", "--data", "x"],
            "fedpeft serve --data DATA --broker BROKER --fleet FLEET --state STATE [options]",
            "required: --broker, --fleet, --state",
        ),
        (["edge", "--no-such-flag"], "fedpeft edge [options]", "unrecognized arguments: --no-such-flag"),
        (["bogus"], "fedpeft [options] COMMAND ...", "invalid choice: 'bogus'"),
    ],
)
def test_a_bad_flag_prints_a_short_usage_not_the_whole_block(
    argv: list[str], usage: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    prog = "fedpeft" if argv[0] == "bogus" else f"fedpeft {argv[0]}"
    lines = capsys.readouterr().err.splitlines()  # two lines, not the 30-line usage block
    assert lines[0] == f"usage: {usage} (try '{prog} --help')"
    assert lines[1].startswith(f"{prog}: error: ") and error in lines[1]
    assert len(lines) == 2


@pytest.mark.parametrize("command", ["simulate", "centralized"])
def test_samples_per_client_all_means_the_whole_split(command: str) -> None:
    def parsed(*flags: str) -> int | None:
        return build_parser().parse_args([command, "--data", "x", *flags]).samples_per_client

    assert parsed("--samples-per-client", "all") is None
    assert parsed("--samples-per-client", "ALL") is None
    assert parsed("--samples-per-client", "40") == 40
    assert parsed() == 150


def test_profile_prints_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "profile"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    profile = json.loads(out)
    assert profile["ram_mb"] > 100 and profile["cores"] >= 1 and profile["gflops"] > 0
    assert profile["extra"] == {}  # no probe unless asked


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lora:4", {"kind": "lora", "rank": 4, "alpha": 8.0}),
        ("adapter:16", {"kind": "adapter", "bottleneck": 16}),
        ("prompt:5", {"kind": "prompt", "length": 5}),
        ("prompt", {"kind": "prompt", "length": 16}),
    ],
)
def test_probe_specs_parse(text: str, expected: dict[str, object]) -> None:
    assert probe_spec(text).to_dict().items() >= expected.items()


@pytest.mark.slow
def test_profile_probes_a_training_step_of_the_module(tmp_path: Path) -> None:
    from tests.tiny_model import make_tiny_bert

    model = make_tiny_bert(tmp_path / "model", hidden=32, layers=2)
    argv = ["profile", "--probe", "lora:4", "--model", str(model), "--batch-size", "4", "--seq-len", "16"]
    done = subprocess.run(
        [sys.executable, "-m", "sdk.cli", *argv],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    extra = json.loads(done.stdout)["extra"]
    assert extra["step_s"] > 0
    assert extra["train_peak_rss_mb"] > 50  # a Python process that imported torch
    assert extra["train_trainable_params"] == 2 * 2 * (2 * 32 * 4) + 2 * 32 + 2  # LoRA on q, v + head
    assert extra["train_predicted_mb"] > 0
    assert "probing 3 training steps of lora:4" in done.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dp-noise", "1.0"], "DP needs --clip-norm"),
        (["--dp-noise", "1.0", "--clip-norm", "1", "--dp-sample-rate", "1.5"], "dp_sample_rate must be in"),
        (["--strategy", "krum"], "unknown strategy"),
        (["--clip-norm", "0"], "clip_norm must be positive"),
    ],
)
def test_serve_rejects_bad_aggregation_flags_before_connecting(
    flags: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import write_text_folder

    data = write_text_folder(tmp_path / "data", per_class_train=2)
    # port 1 has no broker: the error must come from the flags, before any connection is tried
    argv = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--state", str(tmp_path / "s")]
    code = main([*argv, "--data", str(data), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "cannot reach" not in err
    assert not (tmp_path / "s").exists()  # nothing written for a run that never started
