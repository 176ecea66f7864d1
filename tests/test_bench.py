"""`netplug bench --quick`: the report's shape, not its numbers (targets live in the bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

QUICK_SCENARIOS = {"codec", "dispatch", "socket", "endpoints", "network", "memory"}


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netplug", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def test_quick_report_schema_and_compare(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    out = bench("--quick", "--json", str(report_path)).stdout
    assert "[1/6] codec" in out  # progress while it runs
    report = json.loads(report_path.read_text())
    assert report["quick"] is True
    assert report["seconds"] < 60
    assert {"cpu", "cores", "kernel", "python", "memory_gb", "load"} <= set(report["machine"])
    assert set(report["scenarios"]) == QUICK_SCENARIOS
    targets = 0
    for scenario, metrics in report["scenarios"].items():
        assert metrics, scenario
        for metric, entry in metrics.items():
            assert isinstance(entry["value"], int | float), (scenario, metric)
            assert isinstance(entry["unit"], str)
            if "target" in entry:
                targets += 1
                assert isinstance(entry["ok"], bool)
                assert entry["target"].split()[0] in {"<=", ">="}
    assert targets >= 6
    # every baseline named in bench/README.md is measured in the same run
    assert "baseline" in report["scenarios"]["socket"]["GetCapabilities 1 conn p50 us"]
    assert "ip exec create+up p50 ms (baseline)" in report["scenarios"]["endpoints"]
    # the table, and ratios against an earlier report
    compared = bench("--only", "codec", "--quick", "--compare", str(report_path)).stdout
    assert "vs previous" in compared
    row = next(
        line
        for line in compared.splitlines()
        if line.startswith("codec") and "GetCapabilities decode+encode us" in line
    )
    assert row.split()[-1].startswith("x")  # the ratio to the earlier report


def test_unknown_scenario_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netplug", "bench", "--only", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown scenario" in result.stderr
