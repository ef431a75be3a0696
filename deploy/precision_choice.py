"""export_draem.py --precision auto: the cheap candidates first, post-training int8, then int8 with more
convolutions in float (accuracy control) where that fails the gate; quantization-aware fine-tuning only where both
fail and its time, measured on this machine before it starts, fits --finetune_budget (else the command that runs it
is printed); bf16 (where the CPU has bf16) and fp32. Each is gated; the fastest that passes is kept.

Speed is measured here, on this CPU: batch-1 passes of every candidate and of PyTorch fp32, in interleaved
rounds in this one process, the median per model. The CPU's instructions decide what is worth trying and are
printed: int8 runs on any CPU with AVX2 and faster with VNNI (AVX512_VNNI, AVX_VNNI) or AMX; bf16 needs
AVX512_BF16 or AMX.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deploy import int8
from deploy.accuracy_control import until_pass
from deploy.accuracy_gate import gate_lines, judge, passes, precision_of
from deploy.export import SUFFIX, device_for_finetuning, export_model, export_onnx, scoring_graph
from deploy.qat import BATCH, FINETUNE_STEPS, seconds_per_step
from scoring.evaluate import predict
from scoring.model_files import load_model, move_model_file
from training.checkpoint import model_from_checkpoint
from training.cli import cpu_capabilities

SPEED_ROUNDS = 7
STEP_PASSES = 6  # a fine-tuning step of BATCH images costs about this many fp32 image passes (docs/int8.md)


def describe_cpu(has: dict[str, bool | None]) -> str:
    listed = ", ".join(f"{name} {'unknown' if present is None else 'yes' if present else 'no'}"
                       for name, present in has.items())
    int8_path = ("int8 runs on AMX tiles" if has["AMX"] else "int8 uses VNNI" if has["VNNI"]
                 else "int8 without VNNI or AMX (AVX2 only: smaller gains)" if has["AVX2"] else "int8 has no fast path")
    bf16 = "bf16 is native" if has["bf16"] else "no bf16: not tried"
    return f"this CPU: {listed}; {int8_path}; {bf16}"


CONTROLLED = "int8 more float"  # accuracy control (deploy/accuracy_control.py), when post-training int8 fails
FINETUNED = "int8 fine-tuned"  # when accuracy control fails too, within --finetune_budget


def fp32_seconds_per_image(checkpoint: Path, size: tuple[int, int]) -> float:
    """One fp32 PyTorch pass of the scoring graph, per image, timed now on a batch of 8 (after a warm-up)."""
    graph, images = scoring_graph(checkpoint), torch.rand(8, 3, *size)
    with torch.no_grad():
        graph(images)
        started = time.perf_counter()
        graph(images)
    return (time.perf_counter() - started) / len(images)


def estimates(args: argparse.Namespace, ref: dict, size: tuple[int, int], steps: int) -> tuple[float, float]:
    """Before any candidate runs: the seconds post-training int8 and fine-tuning will take here, said on the
    console. Rough: counted in fp32 image passes at the speed timed now (int8: each convolution's sensitivity on
    SENSITIVITY_IMAGES, the calibration images, the gate's images; fine-tuning: STEP_PASSES per step and image),
    not the quantizers' own work; fine-tuning is timed again before it starts."""
    per_image = fp32_seconds_per_image(args.checkpoint, size)
    gated = len(ref["images"]) + (len(ref["test_set"].paths) if ref["test_set"] is not None else 0)
    int8_passes = len(int8.convolutions(scoring_graph(args.checkpoint))) * int8.SENSITIVITY_IMAGES \
        + args.calibration_count + gated
    int8_seconds, step_seconds = int8_passes * per_image, STEP_PASSES * BATCH * per_image
    print(f"estimated here before starting, from an fp32 pass of {1000 * per_image:.0f} ms an image: post-training "
          f"int8 about {int8_seconds / 60:.1f} min ({int8_passes} image passes); accuracy control about as long a "
          f"round; {steps} fine-tuning steps about {steps * step_seconds / 60:.1f} min; bf16 and fp32 one gate each")
    return int8_seconds, step_seconds


def candidates(format: str, has: dict[str, bool]) -> list[str]:
    return ["int8", CONTROLLED, FINETUNED, *(["bf16"] if format == "openvino" and has["bf16"] else []), "fp32"]


def finetune_fits(args: argparse.Namespace, steps: int, int8_seconds: float, size: tuple[int, int]) -> bool:
    """Whether fine-tuning fits --finetune_budget: its steps timed on this machine now, plus what post-training
    int8 took (the export and the gate it is followed by). Said either way; when it does not fit, with the
    command that runs it alone."""
    step = seconds_per_step(scoring_graph(args.checkpoint), size, args.float_layers or [], device_for_finetuning())
    minutes = (steps * step + int8_seconds) / 60
    fits = minutes <= args.finetune_budget
    print(f"int8 fine-tuning: {steps} steps of {step:.2f} s (timed here) plus about {int8_seconds:.0f} s of export "
          f"and gate: about {minutes:.1f} min, {'within' if fits else 'over'} --finetune_budget "
          f"{args.finetune_budget:g} min")
    if not fits:
        print(f"skipped int8 fine-tuning; to run it alone: python export_draem.py --checkpoint {args.checkpoint} "
              f"--format {args.format} --precision int8 --finetune {steps} --check DATA --out FILE (or raise "
              f"--finetune_budget)")
    return fits


def images_per_second(runs: dict[str, callable], rounds: int = SPEED_ROUNDS) -> dict[str, float]:
    """Batch-1 images/s of each run, interleaved rounds, the median; one pass each first to warm up."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: 1 / statistics.median(found) for name, found in times.items()}


def scorer(model, image: torch.Tensor, channel_order: str):
    return lambda: predict(model, image, torch.device("cpu"), channel_order, batch_size=1)


def choose(args: argparse.Namespace, ref: dict, device: torch.device) -> bool:
    """Write args.out at the fastest precision that passes the gate against ref (fp32 when none does); True when
    that is faster than fp32."""
    checkpoint, out, format, image_size = args.checkpoint, args.out, args.format, args.image_size
    has = cpu_capabilities()
    print(describe_cpu(has))
    steps = args.finetune if args.finetune is not None else FINETUNE_STEPS
    size = image_size or model_from_checkpoint(checkpoint)[1].image_size
    print(f"--precision auto: post-training int8 first; where it fails the gate, convolutions back to float "
          f"(accuracy control); where that fails too, {steps} steps of int8 fine-tuning if they fit "
          f"--finetune_budget {args.finetune_budget:g} min")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        rows, fp32 = {}, Path(tmp) / "graph.onnx"
        export_onnx(checkpoint, fp32, image_size)  # every candidate starts from this graph
        int8_seconds, _ = estimates(args, ref, size, steps)  # replaced by what post-training int8 takes
        for precision in candidates(format, has):
            if precision in (FINETUNED, CONTROLLED) and any(r["passes"] for r in rows.values()):
                continue  # an int8 file passes already
            if precision == FINETUNED and not finetune_fits(args, steps, int8_seconds, size):
                continue
            path = Path(tmp) / f"{precision.replace(' ', '_')}{SUFFIX[format]}"
            print(f"--- {precision}" + {
                CONTROLLED: f": post-training int8 failed the gate; convolutions back to float until it passes (each "
                            f"round about {int8_seconds:.0f} s, as post-training int8 took)",
                FINETUNED: ": accuracy control failed too; quantization-aware fine-tuning"
            }.get(precision, ""))
            started = time.perf_counter()
            if precision == CONTROLLED:
                result = until_pass(argparse.Namespace(**vars(args) | {"finetune": 0}), path, ref, device)[1]
            else:
                finetune = steps if precision == FINETUNED else None
                props = export_model(argparse.Namespace(**vars(args) | {"finetune": finetune}), path,
                                     precision.split()[0], fp32)
                if precision == "int8":  # the float layers it measured are the later candidates' too
                    args = argparse.Namespace(**vars(args) | {"float_layers_by": props["float_layers_by"],
                                              "float_layers": [n for n in props["float_layers"].split(",") if n]})
                model, info = load_model(path, device)
                result = judge(ref, model, precision_of(info), device, args.batch_size)
            if precision == "int8":
                took = time.perf_counter() - started
                print(f"post-training int8 took {took:.0f} s (estimated {int8_seconds:.0f} s)")
                int8_seconds = took
            for line in gate_lines(result, path.name):
                print(line)
            rows[precision] = {"path": path, "passes": passes(result), "failures": result["failures"]}
        pytorch, info = model_from_checkpoint(checkpoint)
        image = torch.randint(0, 256, (1, 3, *(image_size or info.image_size)), dtype=torch.uint8)
        runs = {"pytorch fp32": scorer(pytorch, image, info.channel_order)}
        runs |= {p: scorer(load_model(r["path"], torch.device("cpu"))[0], image, "BGR") for p, r in rows.items()}
        speed = images_per_second(runs)
        passing = [p for p, r in rows.items() if r["passes"]]
        chosen = max(passing, key=speed.get) if passing else "fp32"
        width = max(len(f"{format} {p}") for p in rows) + 2
        print(f"{'precision':<{width}}{'images/s (batch 1)':>20}{'vs PyTorch fp32':>17}  gate")
        print(f"{'pytorch fp32':<{width}}{speed['pytorch fp32']:>20.2f}{1:>16.2f}x  reference")
        for p, r in rows.items():
            gate = "passes" if r["passes"] else "fails: " + "; ".join(r["failures"])[:120]
            print(f"{format + ' ' + p:<{width}}{speed[p]:>20.2f}{speed[p] / speed['pytorch fp32']:>16.2f}x  {gate}")
        move_model_file(rows[chosen]["path"], out)
    faster = chosen != "fp32" and speed[chosen] > speed["fp32"]
    print(f"kept {chosen}: {out}" + ("" if faster else " (no faster precision passes the accuracy gate)"))
    return faster
