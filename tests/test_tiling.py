"""Tiled inference: the grid, equality with scoring tiles one by one, and the mean blend against a reference."""
import argparse

import numpy as np
import pytest
import torch

from data_loader import DataError
from model_unet import DraemModel
from scoring.tiling import TiledModel, check_tiling, parse_overlap, tile_starts


def tiny_model() -> DraemModel:
    torch.manual_seed(0)
    model = DraemModel(4, 4).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so that the maps are not flat
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2)
    return model


def test_tile_grid_covers_the_image_and_ends_flush():
    assert tile_starts(256, 64, 0) == [0, 64, 128, 192]
    assert tile_starts(250, 64, 16) == [0, 48, 96, 144, 186]  # the last one moved back to end at 250
    assert tile_starts(64, 64, 32) == [0]
    for length, tile, overlap in ((2048, 256, 32), (1000, 96, 10), (97, 64, 0)):
        starts = tile_starts(length, tile, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[-1] + tile == length and np.diff(starts).max() <= tile - overlap


def test_overlap_flag_takes_pixels_or_a_fraction():
    assert parse_overlap("32") == 32 and parse_overlap("0.125") == 0.125 and parse_overlap("0") == 0
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_overlap(bad)
    with pytest.raises(DataError, match="larger than the image"):
        check_tiling(100, 300, (128, 128), 0, "the image")
    with pytest.raises(DataError, match="not smaller"):
        check_tiling(512, 512, (64, 64), 64, "the image")


@torch.inference_mode()
def test_whole_number_of_tiles_without_overlap_equals_scoring_each_tile():
    model = tiny_model()
    images = torch.rand(2, 3, 64, 96)
    out = TiledModel(model, (32, 32), 0, tile_batch=4)(images)
    for y in (0, 32):
        for x in (0, 32, 64):
            alone = model(images[:, :, y:y + 32, x:x + 32])
            torch.testing.assert_close(out.anomaly_map[:, y:y + 32, x:x + 32], alone.anomaly_map, rtol=0, atol=1e-6)
            torch.testing.assert_close(out.reconstruction[:, :, y:y + 32, x:x + 32], alone.reconstruction,
                                       rtol=0, atol=1e-6)


@torch.inference_mode()
@pytest.mark.parametrize("overlap", [16, 0.25])
def test_overlapping_tiles_are_blended_by_their_mean(overlap):
    model = tiny_model()
    image = torch.rand(1, 3, 80, 112)
    out = TiledModel(model, (32, 64), overlap, tile_batch=3)(image)
    # Reference: every tile's map placed on a NaN canvas of its own; the blend is the NaN-ignoring mean.
    canvases = []
    oy, ox = (16, 16) if overlap == 16 else (8, 16)
    for y in tile_starts(80, 32, oy):
        for x in tile_starts(112, 64, ox):
            canvas = np.full((80, 112), np.nan)
            canvas[y:y + 32, x:x + 64] = model(image[:, :, y:y + 32, x:x + 64]).anomaly_map[0].numpy()
            canvases.append(canvas)
    expected = np.nanmean(np.stack(canvases), axis=0)
    np.testing.assert_allclose(out.anomaly_map[0].numpy(), expected, rtol=0, atol=1e-6)
    assert len(canvases) >= 6 and (~np.isnan(np.stack(canvases))).sum(0).max() == 4  # overlaps both ways
