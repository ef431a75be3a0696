"""OpenVINO and int8 exports: equal to PyTorch (fp32) or within the gate's tolerance (bf16, int8), on
this project's, official and anomalib weights, on generated and real images; the gate fails a damaged model; the
Python API equals the command line on every format."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from scoring.accuracy_gate import MAP_TOLERANCE, compare, quantile_difference
from training.checkpoint import model_from_checkpoint, save_training
from training.cli import cpu_has_bf16
from training.config import TrainConfig
from conftest import SHARED_DATA
from data_loader import list_images, load_images, load_test_set
from deploy.export import export_model
from scoring.evaluate import predict
from helpers import ROOT, read_json, tiny_dataset
from deploy.model_files import load_model
from model_unet import DraemModel, init_weights
from scoring.metrics import METRICS

pytest.importorskip("openvino")
pytest.importorskip("nncf")
CPU = torch.device("cpu")
SIZE = (64, 64)


def informative_model(seed: int = 0) -> DraemModel:
    """Random weights with spread-out BatchNorm statistics and a steep last layer, so that the maps vary from
    pixel to pixel over much of [0, 1], as a trained model's do."""
    torch.manual_seed(seed)
    model = DraemModel(8, 8)
    init_weights(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.3, 3)
    last = model.discriminative_subnetwork.decoder_segment.fin_out[0]
    model.eval()
    with torch.no_grad():
        last.weight.mul_(400)
        logits = model.discriminative_subnetwork(torch.rand(4, 6, *SIZE, generator=torch.Generator().manual_seed(0)))
        last.bias[1] -= (logits[:, 1] - logits[:, 0]).mean()  # centred: maps on both sides of 0.5
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint (recording its data, so int8 finds train/good) and each export of it."""
    work = tmp_path_factory.mktemp("deploy")
    data = tiny_dataset(work / "data")
    ckpt = work / "weave.pt"
    config = TrainConfig(category="weave", data_path=str(data), image_size=SIZE, base_width=8, seg_base_width=8,
                         bit_depth=8)
    save_training(ckpt, informative_model(), config, "weave")
    files = {}
    for fmt, precision in (("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"), ("onnx", "int8")):
        if precision == "bf16" and not cpu_has_bf16():
            continue
        out = work / f"weave_{precision}{'.xml' if fmt == 'openvino' else '.onnx'}"
        export_model(ckpt, out, fmt, precision, calibration_count=12)
        files[(fmt, precision)] = out
    return work, data, ckpt, files


def images_to_check(data):
    images = [load_test_set(data, "weave", SIZE).images]
    if (SHARED_DATA / "mtd").is_dir():
        images.append(load_images(list_images(SHARED_DATA / "mtd" / "test" / "crack")[:6], SIZE))
    return torch.cat(images)


def test_openvino_fp32_equals_pytorch_for_ours_official_and_anomalib_weights(exported, tmp_path):
    work, data, ckpt, _ = exported
    model = informative_model(1)
    official = tmp_path / "DRAEM_test_0.0001_2_bs4_weave_.pckl"
    torch.save(model.reconstructive_subnetwork.state_dict(), official)
    torch.save(model.discriminative_subnetwork.state_dict(), tmp_path / "DRAEM_test_0.0001_2_bs4_weave__seg.pckl")
    anomalib = {f"model.{net}.{k}": v for net in ("reconstructive_subnetwork", "discriminative_subnetwork")
                for k, v in getattr(model, net).state_dict().items()}
    torch.save({"state_dict": anomalib}, tmp_path / "anomalib_weave.ckpt")
    images = images_to_check(data)
    for source, order in ((ckpt, "BGR"), (official, "BGR"), (tmp_path / "anomalib_weave.ckpt", "RGB")):
        out = tmp_path / f"{source.stem}.xml"
        export_model(source, out, "openvino", image_size=SIZE)
        reference_model, _ = model_from_checkpoint(source)
        reference = predict(reference_model, images, CPU, order)[0]  # BGR files; predict flips them for RGB weights
        ir, info = load_model(out, CPU)
        maps = predict(ir, images, CPU, batch_size=5)[0]  # batches of 5: the batch size is free
        torch.testing.assert_close(maps, reference, rtol=0, atol=1e-4)
        assert reference.std() > 0.05  # maps that vary: equality is not trivial
        assert info.source == "openvino" and info.config["precision"] == "fp32"


@pytest.mark.parametrize("key", [("openvino", "bf16"), ("openvino", "int8"), ("onnx", "int8")])
def test_bf16_and_int8_maps_stay_within_the_gate_tolerance(exported, key):
    work, data, ckpt, files = exported
    if key not in files:
        pytest.skip("this CPU has no bf16 instructions")
    images = images_to_check(data)
    reference = predict(model_from_checkpoint(ckpt)[0], images, CPU)[0]
    model, info = load_model(files[key], CPU)
    maps = predict(model, images, CPU)[0]
    assert (maps - reference).abs().max() > 0  # not the fp32 graph ...
    assert quantile_difference(maps, reference) <= MAP_TOLERANCE[key[1]]  # ... and close to it
    assert info.config["precision"] == key[1]


def test_pytorch_bf16_scoring_stays_within_the_gate_tolerance(exported):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    work, data, ckpt, _ = exported
    images = images_to_check(data)
    model, _ = model_from_checkpoint(ckpt)
    fp32, bf16 = predict(model, images, CPU)[0], predict(model, images, CPU, amp="bf16")[0]
    assert (fp32 - bf16).abs().max() > 0 and bf16.dtype == torch.float32
    assert quantile_difference(bf16, fp32) <= MAP_TOLERANCE["bf16"]


def test_quantile_difference_is_the_numpy_quantile():
    a, b = torch.rand(1000, 64), torch.rand(1000, 64)
    expected = np.quantile((a - b).abs().numpy(), 0.999, method="inverted_cdf")
    assert quantile_difference(a, b) == pytest.approx(float(expected), abs=0)


def test_metadata_round_trip(exported):
    work, data, ckpt, files = exported
    _, pt = model_from_checkpoint(ckpt)
    for (fmt, precision), path in files.items():
        _, info = load_model(path, CPU)
        assert (info.category, info.image_size, info.bit_depth, info.channel_order) == ("weave", SIZE, 8, "BGR")
        assert info.train_config == pt.train_config and info.config["precision"] == precision


def test_xml_scores_like_its_checkpoint_in_the_test_script(exported, tmp_path):
    import test_draem
    work, data, ckpt, files = exported
    for source, out in ((ckpt, "pt"), (files[("openvino", "fp32")], "xml")):
        test_draem.main(["--checkpoint", str(source), "--data_path", str(data), "--out", str(tmp_path / out),
                         "--device", "cpu", "--no-save_images"])
    pt = read_json(tmp_path / "pt" / "results.json")["runs"]["weave"]
    ir = read_json(tmp_path / "xml" / "results.json")["runs"]["weave_fp32"]
    for m in METRICS:
        assert ir[m] == pytest.approx(pt[m], abs=1e-4), m


def test_gate_passes_an_honest_export_and_fails_a_damaged_one(exported, tmp_path, capsys):
    import export_draem
    work, data, ckpt, files = exported
    export_draem.main(["--checkpoint", str(ckpt), "--check", str(data), "--compare", str(files[("openvino", "fp32")])])
    out = capsys.readouterr().out
    assert "PASSES the accuracy gate" in out and "PyTorch fp32 (reference)" in out
    damaged_model = informative_model()
    with torch.no_grad():
        for p in damaged_model.discriminative_subnetwork.parameters():
            p.mul_(1.05)  # every weight 5 % off: a broken export, as a scaling bug would make it
    damaged = tmp_path / "damaged.pt"
    save_training(damaged, damaged_model, TrainConfig(category="weave", image_size=SIZE, base_width=8,
                                                      seg_base_width=8), "weave")
    export_model(damaged, tmp_path / "damaged.xml", "openvino")
    with pytest.raises(SystemExit) as stopped:
        export_draem.main(["--checkpoint", str(ckpt), "--check", str(data), "--compare", str(tmp_path / "damaged.xml")])
    assert stopped.value.code == 1 and "FAILS the accuracy gate" in capsys.readouterr().out
    result = compare(ckpt, tmp_path / "damaged.xml", data, CPU)
    assert result["p999_map_difference"] > MAP_TOLERANCE["fp32"] and any("anomaly-map" in f for f in result["failures"])


def test_missing_openvino_is_one_line_naming_the_requirements_file(exported, tmp_path, capsys):
    work, data, ckpt, _ = exported
    args = ["--checkpoint", str(ckpt), "--format", "openvino", "--out", str(tmp_path / "x.xml")]
    code = (f"import sys, runpy; sys.modules['openvino'] = None; sys.argv = ['export_draem.py'] + {args!r}; "
            f"runpy.run_path({str(ROOT / 'export_draem.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "requirements-deploy.txt" in proc.stderr and "Traceback" not in proc.stderr
    import export_draem
    with pytest.raises(SystemExit) as stopped:
        export_draem.main(["--checkpoint", str(ckpt), "--format", "onnx", "--precision", "bf16", "--out",
                           str(tmp_path / "x.onnx")])
    assert stopped.value.code == 2 and "--precision bf16: onnx supports fp32, int8" in capsys.readouterr().err


def test_the_python_api_equals_the_command_line_on_pt_onnx_and_xml(exported, tmp_path, capsys):
    """scoring.detector.load(file).predict(...) gives test_draem.py --images' scores, verdicts and defect masks at
    the thresholds the file stores, for a checkpoint and both exports of it; an image array scores as its file."""
    import cv2
    import test_draem
    from scoring.detector import load
    work, data, ckpt, _ = exported
    calibrated = tmp_path / "weave.pt"
    calibrated.write_bytes(ckpt.read_bytes())
    test_draem.main(["--checkpoint", str(calibrated), "--calibrate", str(data / "weave" / "train" / "good"),
                     "--false_alarm_rate", "0.25", "--device", "cpu"])
    files = [calibrated]
    for out in (tmp_path / "weave.onnx", tmp_path / "weave.xml"):
        export_model(calibrated, out, "openvino" if out.suffix == ".xml" else "onnx", "fp32")
        files.append(out)
    photos = sorted((data / "weave" / "test").rglob("*.png"))
    for path in files:
        out = tmp_path / f"cli_{path.suffix[1:]}"
        test_draem.main(["--checkpoint", str(path), "--images", str(data / "weave" / "test"), "--out", str(out),
                         "--device", "cpu", "--no-save_images"])
        rows = {row["path"]: row for row in csv.DictReader(open(out / "scores.csv"))}
        detector = load(path)
        assert detector.image_threshold.value is not None and detector.pixel_threshold.value is not None
        results = detector.predict(photos)
        assert len(results) == len(photos) == len(rows)
        for photo, result in zip(photos, results):
            row = rows[str(photo)]
            assert abs(result.score - float(row["score"])) < 1e-6 and result.verdict == row["verdict"], photo
            np.testing.assert_array_equal(result.defect_mask, cv2.imread(row["mask"], cv2.IMREAD_GRAYSCALE))
        assert {r.verdict for r in results} == {"OK", "ANOMALY"}  # the stored threshold splits these images
        single = detector.predict(cv2.imread(str(photos[0]), cv2.IMREAD_UNCHANGED))
        assert single.score == results[0].score and single.anomaly_map.shape == results[0].anomaly_map.shape
    capsys.readouterr()
