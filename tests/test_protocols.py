"""Each benchmark's own metrics (scoring/protocols.py) against references written here from the benchmarks'
definitions, or scikit-learn; the map files (scoring/map_files.py) read back by tifffile."""
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from sklearn.metrics import auc, average_precision_score, f1_score, precision_recall_curve, roc_auc_score

import archives
from data_loader import load_test_set
from helpers import ROOT
from scoring.map_files import write_tiff
from scoring.protocols import (au_spro, loco_defects, loco_metrics, protocol_for, saturation_area,
                               seg_f1, segmentation_threshold, trapezoidal_ap)


def area_to_limit(fprs: list[float], ys: list[float], max_fpr: float) -> float:
    """A curve's area from FPR 0 to max_fpr, normalised: the trapezoid rule written out, the last segment cut by
    linear interpolation."""
    order = np.argsort(fprs, kind="stable")
    f, y = np.array(fprs)[order], np.array(ys)[order]
    area = 0.0
    for i in range(1, len(f)):
        if f[i] <= max_fpr:
            area += (f[i] - f[i - 1]) * (y[i] + y[i - 1]) / 2
        else:
            if f[i - 1] < max_fpr:
                y_end = y[i - 1] + (y[i] - y[i - 1]) * (max_fpr - f[i - 1]) / (f[i] - f[i - 1])
                area += (max_fpr - f[i - 1]) * (y[i - 1] + y_end) / 2
            break
    return area / max_fpr


def brute_force_au_spro(maps: np.ndarray, defects: list[tuple[int, np.ndarray, float]], max_fpr: float) -> float:
    """sPRO by its definition at every distinct threshold: the mean over defects of min(flagged / saturation, 1);
    FPR over the pixels outside every defect."""
    normal = np.ones(maps.shape, bool)
    for image, region, _ in defects:
        normal[image] &= ~region
    fprs, spros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append((flagged & normal).sum() / normal.sum())
        spros.append(np.mean([min(flagged[image][region].sum() / saturation, 1.0)
                              for image, region, saturation in defects]))
    return area_to_limit(fprs, spros, max_fpr)


def box(shape, y0, y1, x0, x1):
    region = np.zeros(shape, bool)
    region[y0:y1, x0:x1] = True
    return region


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trapezoidal_ap_equals_scikit_learns_auc_of_the_pr_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.5 * labels, 1)  # ties
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = auc(recall, precision)
    assert trapezoidal_ap(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-12)
    assert abs(expected - average_precision_score(labels, scores)) > 1e-4  # a different number from the step-wise AP


def test_saturation_follows_locos_rules():
    assert saturation_area(200, 0.5, relative=True) == 100  # int(threshold x area)
    assert saturation_area(201, 0.5, relative=True) == 100
    assert saturation_area(200, 50, relative=False) == 50  # min(threshold, area)
    assert saturation_area(30, 50, relative=False) == 30
    assert saturation_area(3, 0.1, relative=True) == 1  # never zero pixels


def test_spro_of_a_defect_whose_saturation_is_reached_by_hand():
    """One 4-pixel defect saturating at 2 pixels: once its two best pixels are flagged it is fully found, however
    many of its other pixels are missed."""
    maps = np.zeros((1, 4, 4))
    region = box((4, 4), 0, 2, 0, 2)
    maps[0][region] = [0.9, 0.8, 0.1, 0.1]
    maps[0, 3, 3] = 0.85  # the one normal pixel above 0.1
    defects = [(0, torch.from_numpy(region), 2.0)]
    # thresholds 0.9, 0.85, 0.8: sPRO 0.5, 0.5, 1.0 at FPR 0, 1/12, 1/12; the curve is 1 from FPR 1/12 on
    expected_at_1 = (1 / 12) * 0.5 + (1 - 1 / 12) * 1.0
    assert au_spro(torch.from_numpy(maps), defects, max_fpr=1.0) == pytest.approx(expected_at_1, abs=1e-12)
    pro_like = [(0, torch.from_numpy(region), 4.0)]  # saturation at the whole area: plain overlap
    assert au_spro(torch.from_numpy(maps), pro_like, 1.0) < expected_at_1


@pytest.mark.parametrize("decimals,seed", [(1, 0), (2, 1), (3, 2)])
def test_au_spro_equals_its_definition(decimals, seed):
    """Relative and absolute saturation, two overlapping defects in one image, one reached and one not, ties."""
    rng = np.random.default_rng(seed)
    shape = (3, 14, 14)
    a, b, c = box(shape[1:], 2, 8, 2, 8), box(shape[1:], 5, 11, 5, 12), box(shape[1:], 1, 4, 9, 13)
    d = box(shape[1:], 6, 13, 1, 4)
    defects = [(0, a, float(saturation_area(int(a.sum()), 0.5, True))),  # relative
               (0, b, float(saturation_area(int(b.sum()), 20, False))),  # absolute, overlapping a
               (1, c, float(saturation_area(int(c.sum()), 1.0, True))),  # the whole area
               (1, d, float(saturation_area(int(d.sum()), 500, False)))]  # absolute beyond the area: its area
    truth = np.zeros(shape, bool)
    for image, region, _ in defects:
        truth[image] |= region
    maps = np.round(rng.random(shape) * 0.7 + 0.3 * truth, decimals)
    ours = [(i, torch.from_numpy(r), s) for i, r, s in defects]
    for max_fpr in (0.05, 0.3, 1.0):
        expected = brute_force_au_spro(maps, defects, max_fpr)
        assert au_spro(torch.from_numpy(maps), ours, max_fpr) == pytest.approx(expected, abs=1e-9), max_fpr


def test_mvtec_ad2_segmentation_threshold_and_seg_f1():
    rng = np.random.default_rng(3)
    validation = rng.random((4, 10, 12)).astype(np.float32)
    threshold = segmentation_threshold(torch.from_numpy(validation))
    assert threshold == pytest.approx(validation.astype(np.float64).mean() + 3 * validation.astype(np.float64).std())
    maps, masks = rng.random((5, 10, 12)), rng.random((5, 10, 12)) < 0.2
    expected = f1_score(masks.ravel(), (maps >= 0.7).ravel())
    assert seg_f1(torch.from_numpy(maps), torch.from_numpy(masks), 0.7) == pytest.approx(expected, abs=1e-12)


def test_protocol_follows_the_data_set_unless_chosen():
    assert protocol_for("loco") == "loco" and protocol_for("visa") == "visa" and protocol_for("ksdd2") == "ksdd2"
    assert protocol_for("mvtec") == "mvtec_ad" and protocol_for("my_parts") == "mvtec_ad"
    assert protocol_for("mtd", "ksdd2") == "ksdd2"


def test_loco_defects_read_from_a_prepared_miniature(tmp_path):
    """Each mask channel is a defect with its own saturation (defects_config.json by pixel value), scaled to the
    scoring size; the logical and structural images are scored apart, each with all good images."""
    source = archives.loco(tmp_path)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "loco", str(source), "--out",
                    str(tmp_path / "datasets")], check=True, capture_output=True)
    test_set = load_test_set(tmp_path / "datasets" / "loco", "breakfast_box", (24, 40))  # the images' own size
    defects = loco_defects(test_set)
    by_image = {}
    for d in defects:
        by_image.setdefault(test_set.paths[d[0]].parent.name + "/" + test_set.paths[d[0]].stem, []).append(d)
    config = {e["pixel_value"]: e for e in archives.LOCO_DEFECTS}
    assert {k: len(v) for k, v in by_image.items()} == {"logical_anomalies/000": 2, "logical_anomalies/001": 2,
                                                         "structural_anomalies/000": 1}
    first = by_image["logical_anomalies/000"]
    assert [region.sum().item() for _, region, _ in first] == [20, 100]
    assert [saturation for _, _, saturation in first] == [10, 100]  # absolute min(10, 20); relative 1.0 x 100
    assert by_image["structural_anomalies/000"][0][2] == 50  # relative 0.5 x 100
    assert config[243]["saturation_threshold"] == 10
    half = loco_defects(load_test_set(tmp_path / "datasets" / "loco", "breakfast_box", (12, 20)))
    assert [saturation for _, _, saturation in half][:2] == [2.5, 25.0]  # a quarter of the pixels: a quarter of the saturation

    maps = torch.rand(len(test_set.paths), 24, 40, generator=torch.Generator().manual_seed(0))
    result = loco_metrics(maps, test_set, defects)
    for kind, prefix in (("structural", "structural_anomalies"), ("logical", "logical_anomalies")):
        keep = [i for i, t in enumerate(test_set.defect_types) if t in ("good", prefix)]
        subset = [(keep.index(image), region.numpy(), saturation) for image, region, saturation in defects if image in keep]
        assert result[f"au_spro_{kind}"] == pytest.approx(brute_force_au_spro(maps[keep].numpy(), subset, 0.05), abs=1e-9)
        labels = [test_set.defect_types[i] != "good" for i in keep]
        assert result[f"image_auroc_{kind}"] == pytest.approx(roc_auc_score(labels, maps[keep].flatten(1).amax(1)))
    assert result["au_spro_mean"] == pytest.approx((result["au_spro_structural"] + result["au_spro_logical"]) / 2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_tiff_maps_read_back_exactly_as_single_channel_floats(tmp_path, dtype):
    image = np.random.default_rng(0).random((7, 13)).astype(dtype)  # odd sizes: padding before the directory
    write_tiff(tmp_path / "map.tiff", image)
    with tifffile.TiffFile(tmp_path / "map.tiff") as tif:
        page = tif.pages[0]
        assert page.dtype == dtype and page.shape == (7, 13) and page.samplesperpixel == 1
        np.testing.assert_array_equal(page.asarray(), image)
    with pytest.raises(ValueError):
        write_tiff(tmp_path / "bad.tiff", image.astype(np.float64))
