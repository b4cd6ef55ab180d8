"""``credit-router run``'s command line: the new flags reach the settings; bad ones are one line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from credit_router.__main__ import build_parser, main
from loadgen.commands import _settings


def test_time_scaling_arrivals_verdict_and_output_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(
        [
            "run", "--rate", "50", "--arrival", "gamma", "--burstiness", "0.5",
            "--speedup", "4", "--think-scale", "0.5", "--output", "out",
            "--max-error-rate", "0.1", "--slo", "ttft_ms=100,e2e_ms=900,attainment=0.9",
            "--lateness-threshold-ms", "20", "--model", "m",
        ]
    )  # fmt: skip
    settings = _settings(args)
    replay = settings.replay
    assert (replay.mode, replay.rate, replay.arrival, replay.burstiness) == (
        "rate", 50.0, "gamma", 0.5
    )  # fmt: skip
    assert (replay.speedup, replay.think_scale, replay.model) == (4.0, 0.5, "m")
    assert settings.output == Path("out")
    assert settings.max_error_rate == 0.1
    assert settings.slo is not None
    assert (settings.slo.ttft_s, settings.slo.e2e_s, settings.slo.attainment) == (0.1, 0.9, 0.9)
    assert settings.lateness_threshold_s == pytest.approx(0.02)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``run`` configures the root logger (as the CLI does): give pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slo", "ttft=5"], "--slo 'ttft=5': expected KEY=VALUE"),
        (["--curve-key", "k.key_secret"], "--curve-server-key and --curve-key go together"),
        (
            ["--curve-server-key", "r.key", "--curve-key", "k.key_secret"],
            "--curve-server-key is for --router",
        ),
    ],
)
def test_bad_run_options_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
