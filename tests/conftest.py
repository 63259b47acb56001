"""Fixtures shared by the test modules."""

import signal

import pytest


@pytest.fixture
def hears_ctrl_c():
    """Children started in the test get SIGINT with its default action, as a
    terminal's foreground job does.

    A shell that runs the tests as a background job (``cmd &`` without job
    control, as CI scripts may) starts them with SIGINT ignored; exec keeps
    an ignored signal ignored and Python then never installs its handler, so
    a test sending SIGINT would wait for a child that cannot hear it. A
    handler in this process is reset to the default in every child it
    execs."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
