import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))  # helpers.py, for the tests in integration/ too
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Everything under tests/integration/ starts the scripts in subprocesses: marked slow, so that
    `python -m pytest -m "not slow"` runs the unit tests alone."""
    for item in items:
        if (TESTS / "integration") in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shared_data() -> Path:
    """The real data beside the checkout; tests using it are skipped where it is absent."""
    if not (SHARED_DATA / "mtd" / "train" / "good").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
