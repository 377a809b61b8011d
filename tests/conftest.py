"""pytest's settings for this suite: one thread per worker, the longest files first, and the
shared fixtures. The shared helpers are in ``model_helpers.py`` (see its docstring for why).
"""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning, module="timm")

if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: one process per core, one thread each
    import torch

    torch.set_num_threads(1)

# The test files that take longest (seconds on a 2-core machine, from ``--durations``), run
# first: scripts/test.sh hands whole files to its two processes in collection order
# (``--dist loadfile --no-loadscope-reorder``), so long files first and short ones last lets
# both finish together (xdist's own order, most tests first, left the long one-test files
# for the end, one process idle for a minute). The figures set an order, never a result.
LONGEST_FIRST = {
    "test_zoo.py": 60, "test_export.py": 58, "test_gpu_check.py": 42, "test_compile.py": 34,
    "test_field.py": 28, "test_api_doc.py": 28, "test_learning.py": 25, "test_runner.py": 21,
    "test_engine.py": 20, "test_wheel.py": 19, "test_cli.py": 14, "test_readme.py": 11,
    "test_swaps.py": 9, "test_adapter_io.py": 9, "test_baselines.py": 8, "test_ablation.py": 6,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))  # stable: file order kept otherwise


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def backbone():
    from model_helpers import make_backbone

    return make_backbone("vit")
