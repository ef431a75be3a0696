"""OpenVINO and int8 exports: equal to PyTorch (fp32) or within the gate's tolerance (bf16, int8), on
this project's, official and anomalib weights, on generated and real images; the gate fails a damaged model; the
Python API equals the command line on every format."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.accuracy_gate import MAP_TOLERANCE, compare, quantile_difference
from training.checkpoint import model_from_checkpoint, save_training
from training.cli import cpu_has_bf16
from training.settings import differences
from conftest import SHARED_DATA
from data_loader import list_images, load_images, load_test_set
from deploy.export import export_model
from scoring.evaluate import predict
from helpers import ROOT, export_args, read_json, run_settings, tiny_dataset
from model_unet import DraemModel, init_weights
from scoring.metrics import METRICS
from scoring.model_files import load_model

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
    config = run_settings(category="weave", data_path=str(data), image_size=SIZE, base_width=8, seg_base_width=8,
                         bit_depth=8)
    save_training(ckpt, informative_model(), config)
    files = {("onnx", "fp32"): work / "weave_fp32.onnx"}
    graph = files[("onnx", "fp32")]
    export_model(export_args(ckpt, graph), graph, "fp32")  # the graph each other export starts from: exported once
    for fmt, precision in (("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"), ("onnx", "int8")):
        if precision == "bf16" and not cpu_has_bf16():
            continue
        out = work / f"weave_{precision}{'.xml' if fmt == 'openvino' else '.onnx'}"
        export_model(export_args(ckpt, out, "--calibration_count", 12), out, precision, graph)
        files[(fmt, precision)] = out
    return work, data, ckpt, files


@pytest.fixture(scope="module")
def calibrated(exported, tmp_path_factory):
    """The checkpoint with thresholds for a 25 % false-alarm budget on its training images, and its fp32 ONNX and
    OpenVINO files (the IR converted from that ONNX graph: torch.onnx takes ~10 s a graph here)."""
    import test_draem
    work, data, ckpt, _ = exported
    folder = tmp_path_factory.mktemp("calibrated")
    pt, onnx_file, xml = folder / "weave.pt", folder / "weave.onnx", folder / "weave.xml"
    shutil.copyfile(ckpt, pt)
    test_draem.main(test_draem.parse_args(["--checkpoint", str(pt), "--calibrate", str(data / "weave" / "train" / "good"),
                                           "--false_alarm_rate", "0.25", "--device", "cpu"]))
    export_model(export_args(pt, onnx_file), onnx_file, "fp32")
    export_model(export_args(pt, xml), xml, "fp32", onnx_file)
    return pt, onnx_file, xml


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The fixture's model with every discriminator weight 5 % off, exported to OpenVINO fp32: a broken export, as a
    scaling bug would make it."""
    model = informative_model()
    with torch.no_grad():
        for p in model.discriminative_subnetwork.parameters():
            p.mul_(1.05)
    folder = tmp_path_factory.mktemp("damaged")
    save_training(folder / "damaged.pt", model, run_settings(category="weave", image_size=SIZE, base_width=8,
                                                             seg_base_width=8))
    export_model(export_args(folder / "damaged.pt", folder / "damaged.xml"), folder / "damaged.xml", "fp32")
    return folder / "damaged.xml"


def images_to_check(data):
    images = [load_test_set(data, "weave", SIZE).images]
    if (SHARED_DATA / "mtd").is_dir():
        images.append(load_images(list_images(SHARED_DATA / "mtd" / "test" / "crack")[:6], SIZE))
    return torch.cat(images)


def test_openvino_fp32_equals_pytorch_for_ours_official_and_anomalib_weights(exported, tmp_path):
    work, data, ckpt, files = exported
    model = informative_model(1)
    official = tmp_path / "DRAEM_test_0.0001_2_bs4_weave_.pckl"
    torch.save(model.reconstructive_subnetwork.state_dict(), official)
    torch.save(model.discriminative_subnetwork.state_dict(), tmp_path / "DRAEM_test_0.0001_2_bs4_weave__seg.pckl")
    anomalib = {f"model.{net}.{k}": v for net in ("reconstructive_subnetwork", "discriminative_subnetwork")
                for k, v in getattr(model, net).state_dict().items()}
    torch.save({"state_dict": anomalib}, tmp_path / "anomalib_weave.ckpt")
    images = images_to_check(data)
    for source, order in ((ckpt, "BGR"), (official, "BGR"), (tmp_path / "anomalib_weave.ckpt", "RGB")):
        out = files[("openvino", "fp32")] if source == ckpt else tmp_path / f"{source.stem}.xml"  # ours: exported once
        if source != ckpt:
            export_model(export_args(source, out, "--image_size", f"{SIZE[0]}x{SIZE[1]}"), out, "fp32")
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
        assert differences(pt.config, info.config, ignore=("precision",)) == [] and info.config["precision"] == precision


def test_xml_scores_like_its_checkpoint_in_the_test_script(exported, tmp_path):
    import test_draem
    work, data, ckpt, files = exported
    for source, out in ((ckpt, "pt"), (files[("openvino", "fp32")], "xml")):
        test_draem.main(test_draem.parse_args(["--checkpoint", str(source), "--data_path", str(data), "--out", str(tmp_path / out),
                         "--device", "cpu", "--no-save_images"]))
    pt = read_json(tmp_path / "pt" / "results.json")["runs"]["weave"]
    ir = read_json(tmp_path / "xml" / "results.json")["runs"]["weave_fp32"]
    for m in METRICS:
        assert ir[m] == pytest.approx(pt[m], abs=1e-4), m


def test_gate_passes_an_honest_export_and_fails_a_damaged_one(exported, damaged, capsys):
    import export_draem
    work, data, ckpt, files = exported
    export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--check", str(data), "--compare", str(files[("openvino", "fp32")])]))
    out = capsys.readouterr().out
    assert "PASSES the accuracy gate" in out and "PyTorch fp32 (reference)" in out
    with pytest.raises(SystemExit) as stopped:
        export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--check", str(data), "--compare", str(damaged)]))
    assert stopped.value.code == 1 and "FAILS the accuracy gate" in capsys.readouterr().out
    result = compare(ckpt, damaged, data, CPU)
    assert any(f.startswith("labelled: map difference p99.9") for f in result["failures"])
    assert result["labelled"]["p999_map_difference"] > MAP_TOLERANCE["fp32"]


def test_missing_openvino_is_one_line_naming_the_requirements_file(exported, tmp_path, capsys):
    work, data, ckpt, _ = exported
    args = ["--checkpoint", str(ckpt), "--format", "openvino", "--out", str(tmp_path / "x.xml")]
    code = (f"import sys, runpy; sys.modules['openvino'] = None; sys.argv = ['export_draem.py'] + {args!r}; "
            f"runpy.run_path({str(ROOT / 'export_draem.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "requirements-deploy.txt" in proc.stderr and "Traceback" not in proc.stderr
    import export_draem
    with pytest.raises(SystemExit) as stopped:
        export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--format", "onnx", "--precision", "bf16", "--out",
                           str(tmp_path / "x.onnx")]))
    assert stopped.value.code == 2 and "--precision bf16: onnx supports fp32, int8" in capsys.readouterr().err


def test_the_python_api_equals_the_command_line_on_pt_onnx_and_xml(exported, calibrated, tmp_path, capsys):
    """scoring.detector.load(file).predict(...) gives test_draem.py --images' scores, verdicts and defect masks at
    the thresholds the file stores, for a checkpoint and both exports of it; an image array scores as its file."""
    import cv2
    import test_draem
    from scoring.detector import load
    work, data, ckpt, _ = exported
    files = list(calibrated)
    photos = sorted((data / "weave" / "test").rglob("*.png"))
    for path in files:
        out = tmp_path / f"cli_{path.suffix[1:]}"
        test_draem.main(test_draem.parse_args(["--checkpoint", str(path), "--images", str(data / "weave" / "test"), "--out", str(out),
                         "--device", "cpu", "--no-save_images"]))
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


# ---- int8 that covers anomalies, the gate on good images, --precision auto, the OpenVINO example ----------------

def conv_weights(path):
    """{ONNX weight initializer or OpenVINO weight constant name: is it stored in float?} for every convolution."""
    if path.suffix == ".onnx":
        import onnx
        graph = onnx.load(path).graph
        floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
        return {node.input[1]: node.input[1] in floats for node in graph.node if node.op_type == "Conv"}
    import openvino as ov
    found = {}
    for op in ov.Core().read_model(str(path)).get_ordered_ops():
        if op.get_type_name() == "Convolution":
            source = op.input(1).get_source_output().get_node()
            found[source.get_friendly_name()] = source.get_type_name() == "Constant" and \
                source.get_element_type() == ov.Type.f32
    return found


@pytest.mark.parametrize("key", [("onnx", "int8"), ("openvino", "int8")])
def test_int8_metadata_names_its_calibration_and_float_layers_and_the_graph_keeps_them_in_float(exported, key):
    work, data, ckpt, files = exported
    _, info = load_model(files[key], CPU)
    meta = info_metadata(files[key])
    assert (meta["calibration_good"], meta["calibration_simulated"]) == ("6", "6")  # 12 images, half simulated
    assert meta["calibration_sources"] == "Perlin noise"  # the checkpoint records no anomaly sources
    float_layers = meta["float_layers"].split(",")
    assert 1 <= len(float_layers) and 0 < float(meta["float_share_percent"]) <= 10
    weights = conv_weights(files[key])
    assert len(weights) == 51 and sum(weights.values()) == len(float_layers)  # the rest are int8 in the file
    for name in float_layers:
        assert weights[f"model.{name}.weight"], name


def info_metadata(path):
    if path.suffix == ".onnx":
        import onnx
        return {p.key: p.value for p in onnx.load(path).metadata_props}
    from scoring.model_files import read_ir
    return read_ir(path)[1]


def test_float_layers_fill_the_budget_from_the_most_sensitive_down():
    from deploy.int8 import choose_float_layers
    sensitivity = {"a": 1.0, "b": 0.9, "c": 0.5, "d": 0.3, "e": 0.01, "f": 0.2}
    macs = {"a": 50, "b": 5, "c": 4, "d": 30, "e": 1, "f": 10}  # 100 multiply-adds in all
    assert choose_float_layers(sensitivity, macs, 0.10) == ["b", "c"]  # a does not fit; e too small
    assert choose_float_layers(sensitivity, macs, 0.60) == ["a", "b", "c"]
    assert choose_float_layers(sensitivity, macs, 0.0) == []


def test_multiply_adds_are_the_direct_formula():
    from deploy.int8 import multiply_adds
    from deploy.export import ScoringGraph
    model = DraemModel(8, 8).eval()
    macs = multiply_adds(ScoringGraph(model, False), np.zeros((3, 32, 64), np.float32))
    convs = dict(model.named_modules())
    expected = {}
    for name, m in convs.items():
        if isinstance(m, torch.nn.Conv2d):
            expected[name] = None
    assert set(macs) == set(expected) and len(macs) == 51
    first = convs["reconstructive_subnetwork.encoder.block1.0"]
    assert macs["reconstructive_subnetwork.encoder.block1.0"] == 32 * 64 * first.out_channels * 3 * 3 * 3
    last = convs["discriminative_subnetwork.decoder_segment.fin_out.0"]
    assert macs["discriminative_subnetwork.decoder_segment.fin_out.0"] == 32 * 64 * 2 * last.in_channels * 3 * 3


def crush_quantizer_scales(source, out):
    """Every activation quantizer's scale divided by a million: each quantized activation saturates."""
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(source)
    inits = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1e-6, scale.name))
    onnx.save(proto, out)


def good_only_copy(data, root):
    """The category with its good images alone: train/good and test/good."""
    for part in ("train/good", "test/good"):
        shutil.copytree(data / "weave" / part, root / "weave" / part)
    return root


def gate(args, capsys):
    import export_draem
    try:
        export_draem.main(export_draem.parse_args(args))
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    return code, capsys.readouterr().out




def test_a_collapsed_int8_export_fails_the_labelled_and_the_good_only_gate(exported, calibrated, tmp_path, capsys):
    work, data, ckpt, files = exported
    crushed = tmp_path / "crushed.onnx"
    crush_quantizer_scales(files[("onnx", "int8")], crushed)
    maps = predict(load_model(crushed, CPU)[0], images_to_check(data), CPU)[0]
    assert maps.std() < 1e-3  # collapsed: one value everywhere
    for checked in (data, good_only_copy(data, tmp_path / "good_only")):
        result = compare(calibrated[0], crushed, checked, CPU)
        failed = {f.split(":")[0] for f in result["failures"]}
        assert "simulated-anomaly AUROC" in failed and "good + simulated" in failed
        assert ("labelled" in failed) == (checked == data)  # labelled checks run on labelled data only
    capsys.readouterr()


def test_the_good_only_gate_passes_an_honest_export_fails_a_damaged_one_and_names_what_did_not_run(
        exported, damaged, tmp_path, capsys):
    work, data, ckpt, files = exported
    good_only = good_only_copy(data, tmp_path / "good_only")
    code, out = gate(["--checkpoint", str(ckpt), "--check", str(good_only), "--out", str(tmp_path / "fp32.xml"),
                      "--format", "openvino"], capsys)
    assert code == 0
    assert "PASSES the accuracy gate: the" in out and "(not run: image AUROC, pixel AP" in out
    assert "pass    image AUROC" not in out and "not run image AUROC" in out
    assert "4 simulated anomalies (Perlin noise)" in out and "pass    simulated-anomaly AUROC" in out
    code, out = gate(["--checkpoint", str(ckpt), "--check", str(good_only), "--compare", str(damaged)], capsys)
    assert code == 1 and "FAILS the accuracy gate" in out and "PASSES" not in out


def test_precision_auto_tries_the_cheap_int8_first_fine_tunes_within_its_budget_and_keeps_fp32_when_all_fail(
        exported, tmp_path, capsys, monkeypatch):
    """int8 calibrated on black images (every range collapsed) fails the gate, and so do the graph with
    convolutions returned to float (capped at 5 % of the multiply-adds) and its fine-tuned graph; auto then writes
    fp32 and exits 1, although int8 is reported fastest. Accuracy control comes before fine-tuning: where it
    passes, nothing is fine-tuned; a fine-tuned int8 that passes where both fail is kept; fine-tuning over
    --finetune_budget is skipped with the command that runs it; when post-training int8 passes, nothing else
    int8 is tried."""
    from deploy import accuracy_control, int8, precision_choice
    work, data, ckpt, _ = exported
    real = int8.calibration_set

    def black(*args, **kwargs):
        images, recorded = real(*args, **kwargs)
        images[:] = 0
        return images, recorded
    monkeypatch.setattr(int8, "calibration_set", black)
    # this graph's int8 at collapsed ranges gives constant maps, which the three checks this tiny set allows can
    # pass (image AUROC 50 -> 50): here no int8 file passes, and accuracy control stops at its first round, the
    # budget's layers (tests/integration/test_qat.py tests the loop itself)
    real_passes = precision_choice.passes
    monkeypatch.setattr(precision_choice, "passes", lambda result: result["precision"] != "int8" and real_passes(result))
    monkeypatch.setattr(accuracy_control, "passes", lambda result: False)
    monkeypatch.setattr(accuracy_control, "MAX_FLOAT_SHARE", 5.0)
    speeds = {"pytorch fp32": 1.0, "fp32": 1.5, "int8": 9.0, "int8 fine-tuned": 8.0, "int8 more float": 7.0}
    monkeypatch.setattr(precision_choice, "images_per_second", lambda runs: {k: speeds[k] for k in runs})
    out = tmp_path / "auto.onnx"
    args = ["--checkpoint", str(ckpt), "--check", str(data), "--precision", "auto", "--out", str(out),
            "--finetune", "2", "--finetune_budget", "60"]
    graph = tmp_path / "graph.onnx"  # the checkpoint's fp32 graph: exported by the first run, copied in the others

    def export_once(checkpoint, out, image_size=None):
        if not graph.exists():
            real_export(checkpoint, graph, image_size)
        shutil.copyfile(graph, out)
    real_export = precision_choice.export_onnx
    monkeypatch.setattr(precision_choice, "export_onnx", export_once)
    code, printed = gate(args, capsys)  # every int8 file calibrated on black images: all fail
    assert code == 1 and info_metadata(out)["precision"] == "fp32", printed[-3000:]
    assert "AVX2" in printed and "onnx int8 fine-tuned" in printed and "fails:" in printed and "kept fp32" in printed
    assert "onnx int8 more float" in printed and "accuracy control: still failing" in printed
    assert printed.index("--- int8 more float") < printed.index("--- int8 fine-tuned")  # the cheap one first
    assert "int8 fine-tuning: 2 steps of" in printed and "within --finetune_budget 60 min" in printed
    judged = []  # post-training int8 fails, the accuracy-controlled one passes: nothing is fine-tuned
    monkeypatch.setattr(precision_choice, "passes", lambda result: bool(judged.append(result)) or len(judged) > 1)
    code, printed = gate(args, capsys)
    assert code == 0 and "kept int8 more float" in printed and "--- int8 fine-tuned" not in printed
    assert info_metadata(out)["float_layers_by"].startswith("accuracy control, round")
    judged = []  # post-training int8 and accuracy control fail, the fine-tuned one and fp32 pass
    monkeypatch.setattr(precision_choice, "passes", lambda result: bool(judged.append(result)) or len(judged) > 2)
    code, printed = gate(args, capsys)
    assert code == 0 and "kept int8 fine-tuned" in printed
    assert info_metadata(out)["precision"] == "int8" and info_metadata(out)["finetune_steps"] == "2"
    judged = []  # the same, with no time for fine-tuning: skipped, and the command that runs it is printed
    code, printed = gate(args[:-1] + ["0"], capsys)
    assert "over --finetune_budget 0 min" in printed and "--- int8 fine-tuned" not in printed
    [skipped] = [line for line in printed.splitlines() if line.startswith("skipped int8 fine-tuning")]
    assert f"--checkpoint {ckpt} --format onnx --precision int8 --finetune 2" in skipped, skipped
    monkeypatch.setattr(precision_choice, "passes", lambda result: True)
    code, printed = gate(args, capsys)  # post-training int8 passes: nothing else int8 is tried
    assert code == 0 and info_metadata(out)["precision"] == "int8" and "kept int8:" in printed
    assert "finetune_steps" not in info_metadata(out) and "--- int8 fine-tuned" not in printed
    assert "--- int8 more float" not in printed


def test_int8_flags_give_one_line_errors(exported, tmp_path, capsys):
    work, data, ckpt, _ = exported
    import export_draem
    with pytest.raises(SystemExit) as stopped:
        export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--precision", "int8", "--out", str(tmp_path / "x.onnx"),
                           "--float_layers", "encoder.nowhere"]))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--float_layers: no convolution named encoder.nowhere" in err
    assert "Traceback" not in err and not (tmp_path / "x.onnx").exists()
    for args, message in ((["--calibration_anomalies", "1"], "--calibration_anomalies must be"),
                          (["--precision", "auto"], "--precision auto needs --check")):
        with pytest.raises(SystemExit):
            export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx"), *args]))
        assert message in capsys.readouterr().err


def test_export_settings_are_the_flags_defaults_and_refuse_a_misspelt_setting(tmp_path):
    """The benchmarks export through deploy.export.export_settings, not export_draem.py's command line: what they
    get by default must be what a user's export gets, and a misspelt setting must not pass silently."""
    from deploy.export import export_settings
    import export_draem
    ckpt = tmp_path / "c.pt"
    built = vars(export_settings(ckpt))
    parsed = vars(export_draem.parse_args(["--checkpoint", str(ckpt), "--out", str(tmp_path / "c.onnx")]))
    assert built == {name: parsed[name] for name in built}
    given = vars(export_settings(ckpt, format="openvino", float_layers=[], finetune=0))
    parsed = vars(export_draem.parse_args(["--checkpoint", str(ckpt), "--out", str(tmp_path / "c.xml"), "--format",
                                           "openvino", "--precision", "int8", "--float_layers", "none",
                                           "--finetune", "0"]))
    assert given == {name: parsed[name] for name in given}
    with pytest.raises(TypeError, match="no setting float_layer$"):
        export_settings(ckpt, float_layer=[])


def test_the_standalone_openvino_example_scores_as_test_draem_does(exported, calibrated, tmp_path):
    """examples/openvino_inference.py (numpy, OpenCV, OpenVINO only) on colour, 16-bit grayscale, grayscale and
    RGBA files of other sizes: test_draem.py's score within 1e-5 and its verdict at the file's threshold."""
    import cv2
    import test_draem
    work, data, ckpt, files = exported
    for part in (".xml", ".bin"):  # calibrated again below: a copy
        shutil.copyfile(calibrated[2].with_suffix(part), (tmp_path / "weave").with_suffix(part))
    folder = tmp_path / "photos"
    folder.mkdir()
    colour = cv2.imread(str(sorted((data / "weave" / "test").rglob("*.png"))[0]))
    cv2.imwrite(str(folder / "colour.png"), cv2.resize(colour, (90, 70)))
    cv2.imwrite(str(folder / "gray16.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(cv2.resize(colour, (70, 120)), cv2.COLOR_BGR2BGRA))
    for model in (tmp_path / "weave.xml", files[("openvino", "int8")]):
        out = tmp_path / f"out_{model.stem}"
        test_draem.main(test_draem.parse_args(["--checkpoint", str(model), "--images", str(folder), "--out", str(out), "--device", "cpu",
                         "--no-save_images", "--batch_size", "1"]))  # int8 kernels round differently per batch size
        rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "scores.csv"))}
        assert len(rows) == 4
        for name, row in rows.items():
            printed = subprocess.run([sys.executable, str(ROOT / "examples" / "openvino_inference.py"), str(model),
                                      str(folder / name)], capture_output=True, text=True, check=True).stdout.split()
            assert printed[0] == "score" and abs(float(printed[1]) - float(row["score"])) <= 1e-5, (name, printed, row)
            assert printed[2] == (row["verdict"] or "no"), (name, printed, row)
    from test_export import assert_example_shows_what_test_draem_wrote
    xml = tmp_path / "weave.xml"  # calibrated on these photos: thresholds that split them and draw defect pixels
    test_draem.main(test_draem.parse_args(["--checkpoint", str(xml), "--calibrate", str(folder), "--false_alarm_rate", "0.5", "--device", "cpu"]))
    test_draem.main(test_draem.parse_args(["--checkpoint", str(xml), "--images", str(folder), "--out", str(tmp_path / "cal"), "--device", "cpu",
                     "--no-save_images", "--batch_size", "1"]))
    assert_example_shows_what_test_draem_wrote("openvino_inference.py", xml, folder, tmp_path / "cal",
                                               tmp_path / "example")


def test_a_check_that_cannot_be_computed_never_passes():
    """An undefined AUROC (one class only) is a failure, not a drop of 'nan' points that is never too large; a
    gate where no check could run does not pass."""
    from deploy.accuracy_gate import check, drop_check, gate_lines, passes
    undefined = drop_check("image AUROC", float("nan"), 0.9, 0.005)
    assert undefined["passed"] is False
    result = {"category": "c", "labelled": None, "checks": [check("image AUROC", "-", None, "no defect images")],
              "failures": [], "ran": 0, "good_only": {"good": 0, "simulated": 0, "good_from": "-", "anomalies_from": "-",
                                                     "map_difference_percentiles": {50: 0, 99: 0, 99.9: 0}}}
    assert not passes(result) and not any("PASSES" in line for line in gate_lines(result, "x.onnx"))


def test_an_fp32_export_passes_the_gate_at_the_test_sets_own_thresholds(exported, tmp_path, capsys):
    """Thresholds chosen on the test set sat on a test image's score, so rounding alone changed verdicts and an
    fp32 export failed the verdict check; between two scores, the check measures the export."""
    from scoring.evaluate import evaluate
    work, data, ckpt, files = exported
    model, _ = model_from_checkpoint(ckpt)
    out = evaluate(model, load_test_set(data, "weave", SIZE), CPU)
    tested = tmp_path / "weave.pt"
    save_training(tested, model, run_settings(category="weave", data_path=str(data), image_size=SIZE, base_width=8,
                                             seg_base_width=8, bit_depth=8),
                  {"metrics": {**out["metrics"], "operating_points": out["operating_points"]}})
    threshold = out["operating_points"]["image"]["threshold"]
    fp32_file = files[("openvino", "fp32")]
    exported_scores = predict(load_model(fp32_file, CPU)[0], load_test_set(data, "weave", SIZE).images, CPU)[0]
    from model_unet import image_scores
    gap = (image_scores(exported_scores) - out["scores"]).abs().max().item()
    assert 0 < gap < (out["scores"] - threshold).abs().min().item()  # rounding moves scores less than the margin
    code, printed = gate(["--checkpoint", str(tested), "--check", str(data), "--compare", str(fp32_file)], capsys)
    assert code == 0 and "PASSES the accuracy gate" in printed, printed
    assert "verdicts changed" in printed and f"0 of {len(out['scores'])} at {threshold:.4g}" in printed
