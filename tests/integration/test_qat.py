"""This project's own int8 graph (deploy/qat.py): ONNX Runtime and OpenVINO compute what its PyTorch simulation
computes, quantization-aware fine-tuning shrinks the gap to the fp32 model on images it did not train on, and a
fine-tuned file holds exactly the network that was fine-tuned."""
import pytest
import torch

from data_loader import list_images, load_images, load_test_set
from deploy import int8, qat
from deploy.export import export_model
from deploy.export import ScoringGraph
from scoring.model_files import load_model
from helpers import export_args, run_settings, tiny_dataset
from scoring.evaluate import predict
from training.checkpoint import save_training

pytest.importorskip("openvino")
from test_deploy import SIZE, info_metadata, informative_model  # noqa: E402

CPU = torch.device("cpu")
FILE_TOLERANCE = 1e-3  # the runtimes' int8 kernels against the simulation: rounding at a level's edge at most


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    work = tmp_path_factory.mktemp("qat")
    data = tiny_dataset(work / "data")
    ckpt = work / "weave.pt"
    save_training(ckpt, informative_model(), run_settings(category="weave", data_path=str(data), image_size=SIZE,
                                                         base_width=8, seg_base_width=8, bit_depth=8))
    teacher = ScoringGraph(informative_model().eval(), False).eval()
    good = load_images(list_images(data / "weave" / "train" / "good"), SIZE)
    held_out = load_test_set(data, "weave", SIZE).images.float() / 255  # never trained on
    return work, data, ckpt, teacher, good, held_out


def maps(model, images):
    with torch.no_grad():
        return model(images)[0]


def test_both_runtimes_compute_what_the_simulation_computes(setting, tmp_path):
    """ONNX Runtime's own quantizer moved a model's maps far beyond what the simulation predicted; this graph is
    the simulation, written as QDQ pairs with int8 weights, so both runtimes must agree with it."""
    work, data, ckpt, teacher, good, held_out = setting
    ranges, _ = int8.input_ranges(teacher, good.float() / 255)
    student = qat.int8_graph(teacher, ranges, ["discriminative_subnetwork.decoder_segment.fin_out.0"])
    simulated = maps(student, held_out)
    assert (simulated - maps(teacher, held_out)).abs().max() > 1e-3  # quantized: not the fp32 graph
    path = tmp_path / "int8.onnx"
    qat.export_onnx(student, SIZE, path)
    import onnx
    import onnxruntime as ort
    import openvino as ov
    proto = onnx.load(path)
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == 50  # 51 convolutions, one kept in float
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    by_ort = torch.from_numpy(session.run(["anomaly_map"], {"images": held_out.numpy()})[0])
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    by_openvino = torch.from_numpy(compiled(held_out.numpy())[compiled.output("anomaly_map")])
    assert simulated.std() > 0.05  # maps that vary: agreement is not trivial
    for runtime in (by_ort, by_openvino):
        assert (runtime - simulated).abs().max() <= FILE_TOLERANCE


def test_finetuning_shrinks_the_gap_to_fp32_on_images_it_did_not_train_on(setting, monkeypatch):
    work, data, ckpt, teacher, good, held_out = setting
    ranges, _ = int8.input_ranges(teacher, good.float() / 255)
    coarse = {name: (low, 0.4 * high) for name, (low, high) in ranges.items()}  # clipped ranges: a poor start
    kept = "discriminative_subnetwork.encoder_segment.block1.0"  # in float, its BatchNorm after it
    student = qat.int8_graph(teacher, coarse, [kept])
    batchnorm = student.model.discriminative_subnetwork.encoder_segment.block1[1]
    statistics = [t.clone() for t in (batchnorm.running_mean, batchnorm.running_var, batchnorm.weight)]
    before = (maps(student, held_out) - maps(teacher, held_out)).abs().mean().item()
    monkeypatch.setattr(qat, "LEARNING_RATE", 1e-3)  # 60 steps at the trained model's 1e-6 would move too little
    record = qat.finetune(student, teacher, good, None, "official", 60, CPU)
    after = (maps(student, held_out) - maps(teacher, held_out)).abs().mean().item()
    assert isinstance(batchnorm, torch.nn.BatchNorm2d)  # frozen: batches of 8 must not rewrite its statistics
    assert all(torch.equal(a, b) for a, b in zip(statistics, (batchnorm.running_mean, batchnorm.running_var,
                                                              batchnorm.weight)))
    assert record["finetune_steps"] == "60" and float(record["finetune_loss_after"]) < float(record["finetune_loss_before"])
    assert after < 0.6 * before, (before, after)  # measured: 0.085 -> 0.035


def test_a_finetuned_file_is_the_network_that_was_finetuned_and_says_so(setting, tmp_path, monkeypatch):
    work, data, ckpt, teacher, good, held_out = setting
    students = []
    real_export = qat.export_onnx
    monkeypatch.setattr(qat, "export_onnx", lambda student, *a: (students.append(student), real_export(student, *a)))
    for out in (tmp_path / "weave_int8.onnx", tmp_path / "weave_int8.xml"):
        props = export_model(export_args(ckpt, out, "--precision", "int8", "--calibration_count", 12, "--finetune", 3),
                             out, "int8")
        assert props["finetune_steps"] == "3" and props["finetune_teacher"] == "weave.pt"
        assert props["quantizer"] == "draem-qdq" and props["precision"] == "int8"
        model, info = load_model(out, CPU)
        assert info.config["precision"] == "int8"
        by_file = predict(model, (held_out * 255).round().to(torch.uint8), CPU)[0]
        trained = maps(students[-1], held_out)
        assert not torch.equal(trained, maps(qat.int8_graph(teacher, int8.input_ranges(teacher, held_out)[0],
                                                              []), held_out))  # it moved
        assert (by_file - trained).abs().max() <= FILE_TOLERANCE


def test_accuracy_control_returns_the_most_sensitive_convolutions_to_float_until_the_cap(setting, tmp_path,
                                                                                          monkeypatch, capsys):
    """A gate no int8 file can pass (image AUROC must rise by 100 points): each round writes and judges a file
    with one more convolution in float, the most sensitive of the rest first, and the loop stops before the next
    one would put more than MAX_FLOAT_SHARE of the multiply-adds in float, saying that the gate still fails."""
    from deploy import accuracy_control, accuracy_gate
    work, data, ckpt, teacher, good, held_out = setting
    ref = accuracy_gate.reference(ckpt, data, CPU)
    monkeypatch.setattr(accuracy_gate, "IMAGE_AUROC_DROP", -1.0)
    monkeypatch.setattr(accuracy_control, "MAX_FLOAT_SHARE", 10.0)
    out = tmp_path / "weave_int8.onnx"
    args = export_args(ckpt, out, "--calibration_count", 12, "--float_budget", 0)
    capsys.readouterr()
    props, result = accuracy_control.until_pass(args, out, ref, CPU)
    said = capsys.readouterr().out.splitlines()
    kept = [name for name in props["float_layers"].split(",") if name]
    rounds = [line for line in said if line.startswith("accuracy control, round")]
    assert len(rounds) == len(kept) + 1 and all("fails: image AUROC" in line for line in rounds)
    assert result["failures"] and "still failing" in said[-1]
    assert info_metadata(out)["float_layers"] == props["float_layers"]  # the last round's file is the one written
    assert props["float_layers_by"] == f"accuracy control, round {len(rounds)}" and props["quantizer"] == "draem-qdq"
    assert props["finetune_steps"] == "0" and "finetune_loss_before" not in props  # 0 steps: no images, no probe
    calibration, recorded = accuracy_control.int8_calibration(args, SIZE, 8, "official")
    sensitivity, macs = int8.measure_layers(teacher, calibration, int(recorded["calibration_good"]))
    ranked = sorted(sensitivity, key=lambda name: -sensitivity[name])
    assert kept == ranked[:len(kept)]  # budget 0: all of them added, in this order
    share = accuracy_control.float_share
    assert share(macs, kept) <= 10.0 < share(macs, kept + [ranked[len(kept)]])


def test_float_layers_until_pass_writes_the_file_it_judged_last(setting, tmp_path, capsys):
    """export_draem.py --float_layers until_pass: the exit status is the last round's verdict, and the file's
    float layers and metadata are that round's."""
    import export_draem
    work, data, ckpt, teacher, good, held_out = setting
    out = tmp_path / "weave_int8.xml"
    try:
        export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--check", str(data), "--precision", "int8", "--out", str(out),
                           "--format", "openvino", "--float_layers", "until_pass", "--float_budget", "0",
                           "--calibration_count", "12"]))
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    printed = capsys.readouterr().out
    rounds = [line for line in printed.splitlines() if line.startswith("accuracy control, round")]
    assert rounds and code == (0 if rounds[-1].endswith("passes") else 1)
    assert ("PASSES the accuracy gate" in printed) == (code == 0)
    props = info_metadata(out)
    assert props["quantizer"] == "draem-qdq" and props["float_layers_by"] == f"accuracy control, round {len(rounds)}"
    assert len([n for n in props["float_layers"].split(",") if n]) == len(rounds) - 1
    with pytest.raises(SystemExit):
        export_draem.main(export_draem.parse_args(["--checkpoint", str(ckpt), "--precision", "int8", "--out", str(out),
                           "--float_layers", "until_pass"]))
    assert "--float_layers until_pass needs --precision int8 and --check DATA" in capsys.readouterr().err
