#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one run, on a machine with a CUDA GPU.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR    (expects an active venv with requirements-dev.txt)
set -uo pipefail
out="${1:-bench_results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt"
# Full-size training step (bf16, channels_last, fused Adam), with and without torch.compile; eval; simulation.
python benchmarks/bench_draem.py --preset full --compile --json "$out/bench_full.json" > "$out/bench_full.txt" 2>&1
# Batched simulation on the GPU against the per-sample CPU pipeline (demo data when shared/ is absent).
python benchmarks/bench_synthesis.py --device cuda --json "$out/synthesis_cuda.json" > "$out/synthesis_cuda.txt" 2>&1
# A category-sized run: 208 images at 256 px, full widths, timed end to end, then scored.
python - <<'PY' > "$out/category_data.txt" 2>&1
from pathlib import Path
from demo import make_demo_dataset
make_demo_dataset(Path("datasets/gpu_check"), train=208, test_good=40, per_defect=40, sources=200)
PY
/usr/bin/time -v python train_draem.py --obj_id weave --data_path datasets/gpu_check --anomaly_source_path \
    datasets/gpu_check/sources --epochs "${EPOCHS:-700}" --log_every 200 --checkpoint_path "$out/ckpt" \
    --log_path "$out/logs" > "$out/train_category.txt" 2>&1
/usr/bin/time -v python test_draem.py --checkpoint "$out/ckpt" --data_path datasets/gpu_check --out "$out/test" \
    > "$out/test_category.txt" 2>&1
# Streamed inference on a folder, full model on the GPU: images/s and peak host memory, 100 vs 1000 images.
python benchmarks/bench_inference.py --device cuda --base_width 128 --seg_base_width 64 --counts 100 1000 \
    --json "$out/inference_cuda.json" > "$out/inference_cuda.txt" 2>&1
# The test suite on the GPU machine.
python -m pytest -q > "$out/pytest.txt" 2>&1
tail -n 3 "$out"/*.txt
