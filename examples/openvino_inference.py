"""Score one image with an OpenVINO file from export_draem.py, using only numpy, OpenCV and the OpenVINO runtime.

    python examples/openvino_inference.py bottle.xml photo.png      # bottle.bin beside bottle.xml

The file's metadata says the precision it was exported for; the CPU is told to compute in it (an fp32 or int8
file on a CPU with bf16 would otherwise run its float layers in bf16 by OpenVINO's default).
"""
import json
import sys

import cv2
import numpy as np
import openvino as ov

core = ov.Core()
model = core.read_model(sys.argv[1])
meta = json.loads(model.get_rt_info(["draem_metadata"]).astype(str))
hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}[meta.get("precision", "fp32")]  # int8 layers run int8 anyway
compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
height, width = map(int, meta["image_size"].split("x"))

image = cv2.imread(sys.argv[2], cv2.IMREAD_UNCHANGED)  # prepared as test_draem.py prepares it:
if image.dtype == np.uint16:  # 16-bit file of bit_depth-bit data: its top 8 bits
    image = np.minimum(image >> (int(meta.get("bit_depth", 16)) - 8), 255).astype(np.uint8)
if image.ndim == 2:
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # grayscale: three equal channels
elif image.shape[2] == 4:
    image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)  # drop alpha; OpenCV keeps BGR order
image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
batch = image.transpose(2, 0, 1)[None].astype(np.float32) / 255  # (1, 3, H, W), BGR in [0, 1]

result = compiled(batch)
anomaly_map, score = result[compiled.output("anomaly_map")], result[compiled.output("image_score")]
threshold = float(meta.get("image_threshold", "nan"))
verdict = "no threshold" if np.isnan(threshold) else "ANOMALY" if score[0] >= threshold else "OK"
print(f"score {score[0]:.9g} {verdict} (threshold {threshold:g}); map max {anomaly_map.max():.4f}")
