"""Tiled inference: a large image scored as overlapping tiles, the tiles' maps blended into one full map.

Tiles of --tile HxW start every (tile - overlap) pixels, the last one in each direction flush with the
image's edge, so every pixel is covered and no tile leaves the image. Tiles run through the model in
batches of --batch_size, so peak memory follows the tile batch, not the image size.

Overlaps are blended by the mean: where tiles overlap, each pixel's value is the average of the tiles'
values for it. A pixel near a tile's edge sees less context (the network's zero padding); the mean lets
the tile that sees it from further inside correct it, where the max would keep the worst edge value of
every tile and raise the scores of good images along each seam. The image score is then taken on the
stitched map by the usual protocol (max of its 21x21 mean filter), as for a whole image.
"""
import argparse

import torch
from torch import Tensor

from data_loader import DataError
from scoring.evaluate import MapOutput


def parse_overlap(text: str) -> float:
    """argparse type for --tile_overlap: pixels (a whole number) or a fraction of the tile in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value >= 0 and (value < 1 or value.is_integer()):
        return value
    raise argparse.ArgumentTypeError(f"expected pixels (0, 32, ...) or a fraction of the tile such as 0.125, not {text!r}")


def overlap_pixels(overlap: float, tile: int) -> int:
    return round(overlap * tile) if overlap < 1 else int(overlap)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start: every tile - overlap pixels, the last flush with the end."""
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def check_tiling(height: int, width: int, tile: tuple[int, int], overlap: float, what: str) -> None:
    """One-line errors for a tile larger than the image or an overlap that leaves no stride."""
    if tile[0] > height or tile[1] > width:
        raise DataError(f"--tile {tile[0]}x{tile[1]} is larger than {what} ({height}x{width}): use a smaller "
                         f"--tile, or score the whole image without one")
    if max(overlap_pixels(overlap, tile[0]), overlap_pixels(overlap, tile[1])) >= min(tile):
        raise DataError(f"--tile_overlap {overlap:g} is not smaller than the --tile {tile[0]}x{tile[1]}")


class TiledModel:
    """Wraps a model (a DraemModel or an exported one) so that it is called on tiles and returns stitched maps."""

    def __init__(self, model, tile: tuple[int, int], overlap: float = 0, tile_batch: int = 16):
        self.model, self.tile, self.overlap, self.tile_batch = model, tuple(tile), overlap, tile_batch


    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        (th, tw), (oh, ow) = self.tile, (overlap_pixels(self.overlap, s) for s in self.tile)
        return [(y, x) for y in tile_starts(height, th, oh) for x in tile_starts(width, tw, ow)]

    def __call__(self, images: Tensor) -> MapOutput:
        """(N, 3, H, W) float images -> mean-blended (N, H, W) maps and (N, 3, H, W) reconstructions."""
        n, _, height, width = images.shape
        check_tiling(height, width, self.tile, self.overlap, "the image")
        th, tw = self.tile
        maps = images.new_zeros(n, height, width)
        recs = images.new_zeros(n, 3, height, width)
        counts = images.new_zeros(height, width)
        positions = self.positions(height, width)
        for y, x in positions:
            counts[y:y + th, x:x + tw] += 1
        for i in range(n):
            for start in range(0, len(positions), self.tile_batch):
                chunk = positions[start:start + self.tile_batch]
                tiles = torch.stack([images[i, :, y:y + th, x:x + tw] for y, x in chunk])
                out = self.model(tiles.contiguous(memory_format=torch.channels_last))
                for (y, x), tile_map, tile_rec in zip(chunk, out.anomaly_map.float(), out.reconstruction.float()):
                    maps[i, y:y + th, x:x + tw] += tile_map
                    recs[i, :, y:y + th, x:x + tw] += tile_rec
        return MapOutput(maps / counts, recs / counts)
