#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one run, on a machine with a CUDA GPU.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR    (expects an active venv with requirements-dev.txt)
# GPU_CHECK_TINY=1 runs the same steps on the CPU at tiny sizes (2 epochs, widths 8, a few images): the test
# suite does, so that this script cannot rot between the rare runs on a GPU.
# Stops at the first failing step, naming it and its log. Writes in OUT_DIR: gpu.txt, bench_full.json,
# synthesis.json, ckpt/*.pt, train_category.txt, test/results.json, test_category.txt, inference.json
# (and pytest.txt on a GPU), each step's console output beside its results.
set -euo pipefail
out=$(realpath -m "${1:-bench_results/gpu}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
tiny="${GPU_CHECK_TINY:-0}"
if [ "$tiny" = 1 ]; then
    device=cpu; preset=tiny; compile=(); epochs=2; widths=(--base_width 8 --seg_base_width 8 --image_size 32)
    data=(train=6 test_good=2 per_defect=1 sources=3); synthesis=(--size 32 --bs 2 --repeats 1)
    inference=(--counts 4 8 --image_size 32 --base_width 8 --seg_base_width 8)
else
    device=cuda; preset=full; compile=(--compile); epochs="${EPOCHS:-700}"; widths=()
    data=(train=208 test_good=40 per_defect=40 sources=200); synthesis=()
    inference=(--counts 100 1000 --base_width 128 --seg_base_width 64)
fi
timed=(); [ -x /usr/bin/time ] && timed=(/usr/bin/time -v)

# step NAME LOG COMMAND...: run COMMAND with its output in OUT/LOG; on failure name the step and stop.
step() {
    local name=$1 log=$out/$2
    shift 2
    echo "gpu_check: $name"
    if ! "$@" > "$log" 2>&1; then
        echo "gpu_check: step '$name' failed; the last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
}

if [ "$tiny" = 1 ]; then
    python -c "import torch; print(torch.__version__, 'cpu (GPU_CHECK_TINY)')" > "$out/gpu.txt"
else
    step "GPU and driver" gpu.txt nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt"
fi
# Full-size training step (bf16, channels_last, fused Adam), with and without torch.compile; eval; simulation.
step "training step benchmark" bench_full.txt \
    python benchmarks/bench_draem.py --preset "$preset" --device "$device" "${compile[@]}" --json "$out/bench_full.json"
# A category-sized dataset: 208 images at 256 px, full widths, timed end to end, then scored.
step "category-sized dataset" category_data.txt python - "$out/data" "${data[@]}" <<'PY'
import sys
from pathlib import Path
from training.demo import make_demo_dataset
make_demo_dataset(Path(sys.argv[1]), **{k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])})
PY
# Batched simulation on the device against the per-sample CPU pipeline.
step "anomaly simulation benchmark" synthesis.txt python benchmarks/bench_synthesis.py --device "$device" \
    --data_path "$out/data" --category weave --anomaly_source_path "$out/data/sources" "${synthesis[@]}" \
    --json "$out/synthesis.json"
step "training a category" train_category.txt "${timed[@]}" python train_draem.py --obj_id weave \
    --data_path "$out/data" --anomaly_source_path "$out/data/sources" --epochs "$epochs" "${widths[@]}" \
    --log_every 200 --device "$device" --checkpoint_path "$out/ckpt" --log_path "$out/logs"
step "scoring the category" test_category.txt "${timed[@]}" python test_draem.py --checkpoint "$out/ckpt" \
    --data_path "$out/data" --out "$out/test" --device "$device"
# Streamed inference on a folder, full model on the device: images/s and peak host memory.
step "streamed inference benchmark" inference.txt python benchmarks/bench_inference.py --device "$device" \
    "${inference[@]}" --json "$out/inference.json"
# The test suite on the GPU machine (not in the tiny run: the suite is what runs it).
if [ "$tiny" != 1 ]; then
    step "test suite" pytest.txt python -m pytest -q
fi
echo "gpu_check: every step passed; results in $out"
