"""Shared test plumbing: privilege gates, and no silent skips under CI=true."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip the calling test when `condition` is false; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true requires this test to run: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, packet capture)")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"needs {name} on PATH")
    assert path is not None
    return path


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A skip can hide a whole feature going untested; CI must see every test run.
    if IN_CI and _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nCI=true: {len(_skipped)} test(s) skipped, which CI does not allow:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
