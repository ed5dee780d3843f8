"""A pytest plugin: each test's outcome appended to $NEAR_JAX_TEST_ROWS (JSONL) as it ends.

    python3 -m pytest -p pytest_rows ...   # with bench/accelerator on PYTHONPATH

A run killed at its time budget keeps the outcomes of the tests that finished, which a
report written at the end (--junitxml) would lose.
"""

from __future__ import annotations

import json
import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Appends one row per test: its call outcome, or its setup failure or skip."""
    path = os.environ.get("NEAR_JAX_TEST_ROWS")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    if report.when == "teardown" and report.outcome == "skipped":
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    row = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3)}
    if report.outcome == "failed":
        lines = str(report.longrepr).strip().splitlines()
        row["message"] = lines[-1][:300] if lines else ""
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        row["message"] = str(report.longrepr[2])[:300]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
