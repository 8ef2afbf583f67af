"""Session-wide test setup.

huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME/HF_HUB_CACHE, ... once, at its first
import (formats.md section 15).  So the loopback Hub must be running and the environment set *here*,
at conftest import time, before any test module imports huggingface_hub, transformers or peft.
"""

import os
import shutil
import sys
import tempfile

import pytest

from hub_server import HubServer  # tests/ is on sys.path (pytest "prepend" import mode, no __init__.py)

if "huggingface_hub" in sys.modules:  # too late: it already read the real endpoint and cache paths
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py; the loopback Hub cannot apply")

HUB = HubServer().start()  # one loopback Hub (127.0.0.1 only) for the whole session
_HF_HOME = tempfile.mkdtemp(prefix="lora-ckpt-hf-home-")  # fresh cache: never the user's

os.environ.update(
    HF_ENDPOINT=HUB.url,
    HF_HUB_DISABLE_XET="1",  # with hf_xet installed, uploads would otherwise go through Xet
    HF_TOKEN="hf_loopback_dummy_token",
    HF_HOME=_HF_HOME,
    HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    NO_PROXY="127.0.0.1,localhost",
)
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
    os.environ.pop(_name, None)


def pytest_sessionfinish(session, exitstatus):
    """Stop the Hub (closing kept-alive sockets) and drop the temporary HF_HOME."""
    HUB.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture
def hub() -> HubServer:
    """The session's loopback Hub, with its request log cleared and no pending global fault.
    It is shared by the whole session: use a unique repo id per test."""
    HUB.clear_log()
    HUB.reset_faults()
    return HUB


def pytest_configure(config):
    """Tiny tensors: one intra-op thread is faster than two fighting over a loaded 2-core machine
    (measured: ~12 µs vs ~3.5 ms per small matmul), and results do not depend on it."""
    import torch

    torch.set_num_threads(1)
