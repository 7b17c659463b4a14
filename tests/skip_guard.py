"""pytest plugin: a skipped test fails the run unless its reason is on ALLOWED_SKIPS.

A test that skips where it should run hides what it was meant to check; a skip that is
acceptable (say, a test that needs a GPU) is listed here with the reason it is acceptable.
The run's summary names every skip, listed or not."""

import re

import pytest

# {regular expression matched against the skip reason: why such a skip is acceptable}. Empty:
# every test runs on a CPU-only machine (kernels in interpret mode, GPU lowering through an
# abstract device), so no skip is acceptable today.
ALLOWED_SKIPS: dict[str, str] = {}

_skips: list[tuple[str, str]] = []


def _reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _reason(report)))


def _unlisted() -> list[tuple[str, str]]:
    return [(node, reason) for node, reason in _skips if not any(re.search(p, reason) for p in ALLOWED_SKIPS)]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    if _unlisted() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    unlisted = _unlisted()
    for node, reason in _skips:
        mark = "NOT ALLOWED" if (node, reason) in unlisted else "allowed"
        terminalreporter.write_line(f"skipped ({mark}): {node}: {reason}")
    if unlisted:
        terminalreporter.write_line(f"{len(unlisted)} skip(s) not on tests/skip_guard.py's ALLOWED_SKIPS: "
                                    "the run fails", red=True)
