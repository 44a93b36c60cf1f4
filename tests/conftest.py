import os
import signal

import pytest

# Tiny models on 2 cores: thread oversubscription makes small torch ops very slow.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt for the test, even when pytest was started with SIGINT ignored (a background
    job of a non-interactive shell, `nohup`): Python then keeps SIG_IGN, and a raised SIGINT does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# The file whose tests take longest, mostly waiting on Flower's heartbeats: first, so that one xdist worker runs it
# while the other runs everything else (pyproject addopts: `--dist loadfile --no-loadscope-reorder`).
FIRST = "test_deployment.py"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name != FIRST)  # stable: file order kept otherwise
