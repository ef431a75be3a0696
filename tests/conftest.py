import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real data beside the checkout; tests using it are skipped where it is absent."""
    if not (SHARED_DATA / "mtd" / "train" / "good").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
