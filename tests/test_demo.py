import cv2
import numpy as np
import pytest

from data_loader import load_images, load_test_set, train_image_paths
from training.demo import DEMO_CATEGORY, DEFECTS, draw_defect, make_demo_dataset, texture


@pytest.mark.parametrize("kind", DEFECTS)
def test_mask_matches_the_drawn_defect(kind):
    rng = np.random.default_rng(1)
    for _ in range(5):
        clean = texture(rng)
        image = clean.copy()
        mask = draw_defect(image, kind, rng)
        changed = (image != clean).any(2)
        assert mask.any()
        assert not (changed & (mask == 0)).any()  # nothing drawn outside the mask
        assert changed[mask > 0].mean() > 0.8  # and the mask covers what was drawn


def test_demo_dataset_layout(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", train=5, test_good=2, per_defect=2, sources=3)
    assert load_images(train_image_paths(root, DEMO_CATEGORY), 64).shape == (5, 3, 64, 64)
    test = load_test_set(root, DEMO_CATEGORY, 64)
    assert test.labels.tolist() == [0] * 2 + [1] * 6
    assert sorted(set(test.defect_types)) == sorted(("good",) + DEFECTS)
    for kind in DEFECTS:
        for mask_path in (root / DEMO_CATEGORY / "ground_truth" / kind).iterdir():
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            assert set(np.unique(mask)) == {0, 255}
    assert len(list((root / "sources").iterdir())) == 3
    before = (root / DEMO_CATEGORY / "train" / "good" / "000.png").stat().st_mtime_ns
    make_demo_dataset(tmp_path / "demo", train=5, test_good=2, per_defect=2, sources=3)  # built once
    assert (root / DEMO_CATEGORY / "train" / "good" / "000.png").stat().st_mtime_ns == before
