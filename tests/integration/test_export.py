"""ONNX export with the scoring inside, verified against PyTorch on real and generated images."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_loader import list_images, load_images, load_test_set
from scoring.evaluate import predict
from training.checkpoint import model_from_checkpoint, save_training
from helpers import ROOT, TINY, call_script, read_json, run_settings, tiny_dataset
from model_unet import DraemModel, image_scores, init_weights
from scoring.metrics import METRICS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    data = tiny_dataset(work / "data")
    call_script("train_draem.py", "--obj_id", "weave", "--data_path", data, "--anomaly_source_path", data / "sources",
               "--epochs", "2", *[a for a in TINY if a not in ("--image_size", "32")], "--image_size", "32x64",
               cwd=work)
    ckpt = next((work / "checkpoints").glob("*.pt"))
    export(ckpt, work / "weave.onnx", cwd=work)  # its ONNX file, exported once (torch.onnx takes ~10 s a graph here)
    return work, data, ckpt


def official_pair(model, folder):
    name = "DRAEM_test_0.0001_2_bs4_weave_"
    torch.save(model.reconstructive_subnetwork.state_dict(), folder / f"{name}.pckl")
    torch.save(model.discriminative_subnetwork.state_dict(), folder / f"{name}_seg.pckl")
    return folder / f"{name}.pckl"


def export(checkpoint, out, *extra, cwd):
    return call_script("export_draem.py", "--checkpoint", checkpoint, "--out", out, *extra, cwd=cwd)


def images_to_check(data, shared, size):
    """Generated test images, and real magnetic-tile JPEGs when ../shared/data is beside the checkout."""
    images = [load_test_set(data, "weave", size).images]
    if (shared / "mtd").is_dir():
        images.append(load_images(list_images(shared / "mtd" / "test" / "crack")[:6], size))
    return torch.cat(images)


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    anomaly_map, score, reconstruction = session.run(None, {"images": (images.float() / 255).numpy()})
    return torch.from_numpy(anomaly_map), torch.from_numpy(score), session.get_modelmeta().custom_metadata_map


def test_exported_graphs_equal_pytorch_on_real_and_generated_images(trained, tmp_path):
    from conftest import SHARED_DATA
    work, data, ckpt = trained
    model, _ = model_from_checkpoint(ckpt)
    cases = [(ckpt, "BGR", []), (official_pair(model, tmp_path), "BGR", ["--image_size", "64x32"])]
    anomalib = {f"model.reconstructive_subnetwork.{k}": v for k, v in model.reconstructive_subnetwork.state_dict().items()}
    anomalib |= {f"model.discriminative_subnetwork.{k}": v for k, v in model.discriminative_subnetwork.state_dict().items()}
    torch.save({"state_dict": anomalib}, tmp_path / "anomalib_weave.ckpt")
    cases.append((tmp_path / "anomalib_weave.ckpt", "RGB", ["--image_size", "32x64"]))
    for source, order, extra in cases:
        out = work / "weave.onnx" if source == ckpt else tmp_path / f"{source.stem}.onnx"
        if source != ckpt:
            export(source, out, *extra, cwd=work)
        onnx.checker.check_model(onnx.load(out))
        loaded, state = model_from_checkpoint(source)
        size = (64, 32) if extra[1:] == ["64x32"] else (32, 64)
        images = images_to_check(data, SHARED_DATA, size)
        expected = predict(loaded, images, torch.device("cpu"), order)[0]  # BGR images, flipped for RGB weights
        for batch in (images[:1], images):  # the batch size is free
            maps, scores, meta = run_onnx(out, batch)
            reference = expected[:len(batch)]
            torch.testing.assert_close(maps, reference, atol=1e-4, rtol=0)
            torch.testing.assert_close(scores, image_scores(reference), atol=1e-4, rtol=0)
        assert meta["format"] == "draem-onnx-v1" and meta["image_size"] == f"{size[0]}x{size[1]}"
        assert meta["channel_order"] == "BGR" and meta["trained_channel_order"] == order
        assert meta["category"] == (state.category or "")  # anomalib file names carry no category here
        assert ("image_threshold" in meta) == (source == ckpt)  # only this project's checkpoint holds thresholds
    stored = torch.load(ckpt, weights_only=True)["metrics"]["operating_points"]
    meta = run_onnx(work / "weave.onnx", images[:1])[2]
    assert float(meta["image_threshold"]) == stored["image"]["threshold"]
    assert float(meta["pixel_threshold"]) == stored["pixel"]["threshold"]


def test_test_script_scores_an_onnx_file_like_its_checkpoint(trained, tmp_path):
    work, data, ckpt = trained
    shutil.copyfile(work / "weave.onnx", tmp_path / "weave.onnx")
    for source, out in ((ckpt, "pt"), (tmp_path / "weave.onnx", "onnx")):
        call_script("test_draem.py", "--checkpoint", source, "--data_path", data, "--out", tmp_path / out, "--device",
                   "cpu", cwd=work)
    pt = read_json(tmp_path / "pt" / "results.json")["runs"][ckpt.stem]
    exported = read_json(tmp_path / "onnx" / "results.json")["runs"]["weave"]
    assert exported["category"] == "weave"
    for m in METRICS:
        assert exported[m] == pytest.approx(pt[m], abs=1e-4), m
    assert (tmp_path / "onnx" / "report.html").is_file() and list((tmp_path / "onnx" / "images").rglob("*.png"))
    # Own images: thresholds come from the file's metadata (auto), masks and panels at the original size.
    proc = call_script("test_draem.py", "--checkpoint", tmp_path / "weave.onnx", "--images", data / "weave" / "test" / "hole",
                      "--out", tmp_path / "mine", "--threshold", "auto", "--pixel_threshold", "auto", "--device", "cpu",
                      cwd=work)
    points = torch.load(ckpt, weights_only=True)["metrics"]["operating_points"]
    assert f"image threshold: {points['image']['threshold']}" in proc.stdout
    assert f"pixel threshold: {points['pixel']['threshold']}" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "mine" / "scores.csv")))
    assert len(rows) == 2
    for row in rows:  # each verdict at the checkpoint's threshold, each mask at its pixel threshold
        assert row["verdict"] == ("ANOMALY" if np.float32(row["score"]) >= np.float32(points["image"]["threshold"])
                                  else "OK")
        assert cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE).shape == cv2.imread(row["path"]).shape[:2]


def test_bad_inputs_get_one_line(trained, tmp_path):
    work, data, ckpt = trained

    def fails(script, *args, expect):
        proc = call_script(script, *args, cwd=work, check=False)
        assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    (tmp_path / "junk.pt").write_bytes(b"junk")
    fails("export_draem.py", "--checkpoint", tmp_path / "junk.pt", "--out", tmp_path / "a.onnx", expect="not a checkpoint")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    fails("export_draem.py", "--checkpoint", tmp_path / "other.pt", "--out", tmp_path / "a.onnx",
          expect="not a DRAEM checkpoint")
    fails("export_draem.py", "--checkpoint", ckpt, "--out", tmp_path / "a.onnx", "--image_size", "100",
          expect="--image_size")
    # An ONNX file that is not one of our exports: a valid graph without the metadata.
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["out"])], "plain",
                                   [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    fails("test_draem.py", "--checkpoint", tmp_path / "plain.onnx", "--data_path", data, "--out", tmp_path / "r",
          expect="not an export of this project")
    (tmp_path / "broken.onnx").write_bytes(b"not protobuf")
    fails("test_draem.py", "--checkpoint", tmp_path / "broken.onnx", "--data_path", data, "--out", tmp_path / "r",
          expect="not a readable ONNX file")
    fails("test_draem.py", "--checkpoint", work / "weave.onnx", "--data_path", data, "--out", tmp_path / "r",
          "--image_size", "64", expect="exported for 32x64 images")
    # Without the optional packages: a one-line pointer to requirements-export.txt.
    for module, script, args in (("onnx", "export_draem.py", ["--checkpoint", ckpt, "--out", tmp_path / "b.onnx"]),
                                 ("onnxruntime", "test_draem.py", ["--checkpoint", work / "weave.onnx",
                                                                  "--data_path", data, "--out", tmp_path / "r"])):
        code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = [{script!r}] + {list(map(str, args))!r}; "
                f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "requirements-export.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_training_and_scoring_do_not_import_onnx():
    code = ("import sys; import train_draem, test_draem; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_standalone_onnx_example_scores_as_test_draem_does(trained, tmp_path):
    """examples/onnx_inference.py (numpy, OpenCV, ONNX Runtime only) on colour, 16-bit grayscale, RGBA and JPEG
    files of other sizes than the graph's: the same score as test_draem.py within 1e-5, the same verdict."""
    work, data, _ = trained
    # A randomly initialised model whose last layer is scaled up, so that its softmax is far from flat and its
    # scores move with every detail of the input's preparation (the trained tiny model's barely do).
    torch.manual_seed(0)
    model = DraemModel(16, 16)
    init_weights(model)
    with torch.no_grad():
        model.discriminative_subnetwork.decoder_segment.fin_out[0].weight.mul_(300)
    ckpt = tmp_path / "random.pt"
    save_training(ckpt, model, run_settings(category="weave", image_size=(32, 64), base_width=16, seg_base_width=16))
    export(ckpt, tmp_path / "weave.onnx", cwd=work)
    folder = tmp_path / "photos"
    folder.mkdir()
    colour = cv2.imread(str(data / "weave" / "test" / "hole" / "000.png"))
    cv2.imwrite(str(folder / "colour.png"), colour)
    cv2.imwrite(str(folder / "photo.jpg"), cv2.resize(colour, (150, 90)))
    gray16 = (cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "gray16.png"), gray16)
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(cv2.resize(colour, (70, 120)), cv2.COLOR_BGR2BGRA))
    call_script("test_draem.py", "--checkpoint", tmp_path / "weave.onnx", "--images", folder, "--out", tmp_path / "out",
               "--device", "cpu", "--no-save_images", cwd=work)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    assert len(rows) == 4
    for name, row in rows.items():
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_inference.py"), str(tmp_path / "weave.onnx"),
                              str(folder / name)], capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "score" and abs(float(out[1]) - float(row["score"])) <= 1e-5, (name, out, row["score"])
        assert row["verdict"] == "" and out[2:4] == ["no", "threshold"], name  # this file holds no thresholds
    # calibrated, the file carries thresholds: the example's verdicts, defect masks and overlays (what an inspection
    # screen shows) equal test_draem.py's on the same file, at each image's own size
    call_script("test_draem.py", "--checkpoint", tmp_path / "weave.onnx", "--calibrate", folder, "--false_alarm_rate",
               "0.5", "--device", "cpu", cwd=work)
    call_script("test_draem.py", "--checkpoint", tmp_path / "weave.onnx", "--images", folder, "--out", tmp_path / "cal",
               "--device", "cpu", "--no-save_images", cwd=work)
    assert_example_shows_what_test_draem_wrote("onnx_inference.py", tmp_path / "weave.onnx", folder, tmp_path / "cal",
                                               tmp_path / "example")


def assert_example_shows_what_test_draem_wrote(example, model, folder, written, out):
    """The example run on each image of folder, with an output folder: its verdict, its defect mask (bit for bit)
    and an overlay at the image's size, against what test_draem.py --images wrote to written."""
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(written / "scores.csv"))}
    assert {r["verdict"] for r in rows.values()} == {"OK", "ANOMALY"}  # the threshold splits these images
    masks = 0
    for name, row in rows.items():
        printed = subprocess.run([sys.executable, str(ROOT / "examples" / example), str(model), str(folder / name),
                                  str(out)], capture_output=True, text=True, check=True).stdout.split()
        assert printed[2] == row["verdict"], (name, printed, row)
        stem = Path(name).stem
        size = cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED).shape[:2]
        assert cv2.imread(str(out / f"{stem}_overlay.png")).shape[:2] == size
        expected = cv2.imread(row["mask"], cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == size and np.array_equal(mask, expected), name
        masks += int(mask.any())
    assert masks > 0  # some defect pixels: equal masks are not two empty ones
