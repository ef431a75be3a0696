import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 runs two test processes on two cores: one thread each (and in the scripts they start), or their
    # OpenMP pools would oversubscribe the cores and slow both several times over
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The README's commands on a tiny dataset, once per test run, for every test that reads a trained run: train
    (with --visualize: TensorBoard images too) and score (results without panels in res/). (work, data, checkpoint)."""
    from helpers import TINY, call_script, tiny_dataset
    work = tmp_path_factory.mktemp("tiny_run")
    data = tiny_dataset(work / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
                "--epochs", "2", "--visualize", *TINY, cwd=work)
    [ckpt] = (work / "checkpoints").glob("*.pt")
    call_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", work / "res", "--device", "cpu",
                "--no-save_images", cwd=work)
    return work, data, ckpt
