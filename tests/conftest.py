import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or recompile limits carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def lp_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="lp_fx")
    return caplog
