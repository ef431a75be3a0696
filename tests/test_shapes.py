"""Parts that are not squares: HxW sizes, rigid rotation, random crops, non-square and crop runs end to end,
old integer configs, bad sizes, and evaluation that adapts its batch size to the memory it has."""
import argparse
import csv

import cv2
import numpy as np
import pytest
import torch

from data_loader import load_test_set, parse_size
from helpers import TINY, read_json, run_script, tiny_dataset
from perlin import anomaly_masks, random_crops, rotate, simulate_anomalies
from test_draem import METRICS, predict

SMALL = [a for a in TINY if a not in ("--image_size", "32")]  # TINY without its size


@pytest.mark.parametrize("text,expected", [("256", (256, 256)), ("256x640", (256, 640)), ("64X32", (64, 32))])
def test_sizes_parse_as_height_by_width(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["100x128", "0", "abc", "256x", "x256", "32x32x32", "-32", "16"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="multiple of 32"):
        parse_size(text)


def test_rotation_is_rigid_when_height_and_width_differ():
    image = torch.zeros(1, 1, 32, 96)
    image[0, 0, 4:8, 50:54] = 1.0  # a 4 x 4 square centred 10 rows above and 4 columns right of the centre
    turned = rotate(image, torch.tensor([90.0]), mode="nearest")[0, 0]
    rows, cols = (turned > 0.5).nonzero(as_tuple=True)
    assert len(rows) == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3  # still a 4 x 4 square
    # Output pixel p samples the input at R(90) p, in pixels from the centre (15.5, 47.5): the square's centre
    # (-10, +4) (rows, columns) moves to (-4, -10), i.e. (11.5, 37.5). Rotating in [-1, 1] units instead would
    # stretch it by 96/32 and put it elsewhere.
    assert (rows.float().mean().item(), cols.float().mean().item()) == (11.5, 37.5)
    square = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(rotate(square, torch.zeros(2)), square, atol=1e-5, rtol=0)


def test_random_crops_are_windows_of_their_images_and_repeat_with_the_seed():
    images = torch.arange(4 * 3 * 40 * 70, dtype=torch.float32).view(4, 3, 40, 70)
    crops = random_crops(images, (32, 64), torch.Generator().manual_seed(1))
    assert crops.shape == (4, 3, 32, 64)
    for image, crop in zip(images, crops):
        top, left = divmod(int(crop[0, 0, 0].item() - image[0, 0, 0].item()), 70)
        assert torch.equal(crop, image[:, top:top + 32, left:left + 64])
    assert torch.equal(crops, random_crops(images, (32, 64), torch.Generator().manual_seed(1)))
    offsets = {int(c[0, 0, 0] - i[0, 0, 0]) for _ in range(20) for i, c in
               zip(images, random_crops(images, (32, 64), torch.Generator().manual_seed(_)))}
    assert len(offsets) > 10  # the windows move


def test_simulation_keeps_its_invariants_when_height_and_width_differ():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 96), dtype=torch.uint8, generator=g)
    sources = torch.randint(0, 256, (7, 3, 32, 96), dtype=torch.uint8, generator=g)
    batch = simulate_anomalies(images, sources, "official", g)
    assert batch.augmented.shape == batch.image.shape == (400, 3, 32, 96) and batch.mask.shape == (400, 1, 32, 96)
    assert batch.augmented.min() >= 0 and batch.augmented.max() <= 1 and set(batch.mask.unique().tolist()) <= {0, 1}
    assert torch.equal(batch.label, (batch.mask.flatten(1).sum(1) > 0).float())
    free = (batch.augmented == batch.image).flatten(1).all(1) & (batch.mask.flatten(1).sum(1) == 0)
    assert abs(free.float().mean().item() - 0.5) < 0.1
    masks, noise = anomaly_masks(64, 32, 96, torch.Generator().manual_seed(1), "cpu")
    assert masks.shape == (64, 1, 32, 96) and torch.equal(masks, (noise > 0.5).float())
    assert 0.01 < masks.mean() < 0.5  # Perlin blobs, not empty and not everywhere


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("shapes") / "data")


def train(work, data, *extra):
    run_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
               "--epochs", "2", *SMALL, *extra, cwd=work)
    return next((work / "checkpoints").glob("*.pt"))


def test_non_square_run_end_to_end(data, tmp_path):
    ckpt = train(tmp_path, data, "--image_size", "32x64")
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["image_size"] == [32, 64] and state["config"]["train_crop"] is None
    run_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "res", "--device", "cpu",
               cwd=tmp_path)
    scored = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert all(scored[m] == pytest.approx(state["metrics"][m], abs=1e-9) for m in METRICS)  # same size both times
    folder = tmp_path / "mine"
    folder.mkdir()
    cv2.imwrite(str(folder / "wide.png"), cv2.resize(cv2.imread(str(data / "weave" / "test" / "hole" / "000.png")),
                                                     (150, 70)))
    run_script("test_draem.py", "--checkpoint", ckpt, "--images", folder, "--out", tmp_path / "out", "--device", "cpu",
               cwd=tmp_path)
    row = next(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE).shape == (70, 150)  # the original size, not 32x64
    picture = cv2.imread(row["panel"])
    assert np.array_equal(picture[-70:, :150], cv2.imread(str(folder / "wide.png")))  # input tile at 150x70
    # An old checkpoint recorded one integer side; it still loads and scores the same.
    state["config"]["image_size"] = 32
    del state["config"]["train_crop"]
    torch.save(state, tmp_path / "old.pt")
    run_script("test_draem.py", "--checkpoint", tmp_path / "old.pt", "--data_path", data, "--out", tmp_path / "old",
               "--image_size", "32x64", "--device", "cpu", cwd=tmp_path)
    old = read_json(tmp_path / "old" / "results.json")["runs"]["old"]
    assert all(old[m] == pytest.approx(scored[m], abs=1e-9) for m in METRICS)


def test_crop_run_end_to_end(data, tmp_path):
    ckpt = train(tmp_path, data, "--image_size", "64x96", "--train_crop", "32")
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["image_size"] == [64, 96] and state["config"]["train_crop"] == [32, 32]
    assert state["step"] == 6
    # The end-of-training evaluation ran on whole 64x96 images: scoring at that size gives the same numbers.
    run_script("test_draem.py", "--checkpoint", ckpt, "--data_path", data, "--out", tmp_path / "res", "--device", "cpu",
               cwd=tmp_path)
    scored = read_json(tmp_path / "res" / "results.json")["runs"][ckpt.stem]
    assert all(scored[m] == pytest.approx(state["metrics"][m], abs=1e-9) for m in METRICS)
    panel = cv2.imread(str(next((tmp_path / "res" / "images").rglob("*.png"))))
    assert panel.shape[1] > 3 * 160  # panels at the test images' own 160 px, not the training size


@pytest.mark.parametrize("args,flag", [(["--image_size", "100x128"], "--image_size"), (["--image_size", "0"], "--image_size"),
                                       (["--image_size", "abc"], "--image_size"), (["--image_size", "256x"], "--image_size"),
                                       (["--image_size", "64", "--train_crop", "96x32"], "--train_crop")])
def test_bad_sizes_exit_with_one_line(data, tmp_path, args, flag):
    proc = run_script("train_draem.py", "--obj_id", "weave", "--data_path", data, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and flag in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    proc = run_script("test_draem.py", "--checkpoint", tmp_path, "--images", data, "--image_size", "100x128",
                      cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--image_size" in proc.stderr.splitlines()[-1]


class RunsOutOfMemory(torch.nn.Module):
    """Wraps a model; any batch larger than `fits` fails as a GPU out of memory would."""

    def __init__(self, model, fits):
        super().__init__()
        self.model, self.fits = model, fits

    def forward(self, x):
        if len(x) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_evaluation_halves_the_batch_until_it_fits(data, capsys):
    from model_unet import DraemModel
    from data_loader import DataError
    torch.manual_seed(0)
    model = DraemModel(4, 4).eval()
    images = load_test_set(data, "weave", 32).images
    reference, _ = predict(model, images, torch.device("cpu"), batch_size=1)
    maps, _ = predict(RunsOutOfMemory(model, 3), images, torch.device("cpu"), batch_size=16)
    torch.testing.assert_close(maps, reference)
    assert "retrying with --batch_size 2" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not fit .* even at batch size 1"):
        predict(RunsOutOfMemory(model, 0), images, torch.device("cpu"), batch_size=4)
