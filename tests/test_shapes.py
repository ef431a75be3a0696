"""Sizes that are not squares: HxW parsing, and evaluation that adapts its batch size to the memory it has."""
import argparse

import pytest
import torch

from data_loader import DataError, load_test_set, parse_size
from scoring.evaluate import predict
from helpers import tiny_dataset
from model_unet import DraemModel


@pytest.mark.parametrize("text,expected", [("256", (256, 256)), ("256x640", (256, 640)), ("64X32", (64, 32))])
def test_sizes_parse_as_height_by_width(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["100x128", "0", "abc", "256x", "x256", "32x32x32", "-32", "16"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="multiple of 32"):
        parse_size(text)


class RunsOutOfMemory(torch.nn.Module):
    """Wraps a model; any batch larger than `fits` fails as a GPU out of memory would."""

    def __init__(self, model, fits):
        super().__init__()
        self.model, self.fits = model, fits

    def forward(self, x):
        if len(x) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_evaluation_halves_the_batch_until_it_fits(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    torch.manual_seed(0)
    model = DraemModel(4, 4).eval()
    images = load_test_set(data, "weave", 32).images
    reference, _ = predict(model, images, torch.device("cpu"), batch_size=1)
    maps, _ = predict(RunsOutOfMemory(model, 3), images, torch.device("cpu"), batch_size=16)
    torch.testing.assert_close(maps, reference)
    assert "retrying with --batch_size 2" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not fit .* even at batch size 1"):
        predict(RunsOutOfMemory(model, 0), images, torch.device("cpu"), batch_size=4)
