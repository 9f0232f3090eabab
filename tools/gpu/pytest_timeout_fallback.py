"""A per-test timeout for pytest when the pytest-timeout plugin is missing (tools/gpu/run.sh loads this
with ``-p pytest_timeout_fallback`` only then). Each test's setup, call and teardown together get
``--fallback-timeout`` seconds (SIGALRM in the main thread); past that the test fails with
``TestTimeout`` and the run goes on with the next test. A kernel stuck on the GPU cannot be interrupted
this way (the signal is handled only when Python regains control); the stage's outer ``timeout`` in
run.sh covers that case."""
from __future__ import annotations

import signal

import pytest


class TestTimeout(Exception):
    __test__ = False  # not a test class


def pytest_addoption(parser):
    parser.addoption("--fallback-timeout", type=float, default=0.0, help="seconds per test (0: none)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = item.config.getoption("--fallback-timeout")
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} exceeded the per-test timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
