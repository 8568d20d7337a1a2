import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized-data cache of test runs stays out of the user's ~/.cache.
os.environ.setdefault("LORAKIT_CACHE", tempfile.mkdtemp(prefix="lorakit-test-cache-"))
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """lorakit's CPU kernels, built (once per cache) in this process before any test starts others:
    a torchrun job or CLI subprocess that had to build them would spend its time limit on that,
    whichever test runs first (-k, --lf)."""
    from lorakit import cpu_kernels

    cpu_kernels.ops()
