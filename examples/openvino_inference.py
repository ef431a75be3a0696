"""Score one image with an OpenVINO file from export_draem.py, using only numpy, OpenCV and the OpenVINO runtime.

    python examples/openvino_inference.py bottle.xml photo.png            # bottle.bin beside bottle.xml
    python examples/openvino_inference.py bottle.xml photo.png heatmaps/  # also photo_overlay.png, photo_mask.png

The file's metadata says the precision it was exported for; the CPU is told to compute in it (an fp32 or int8
file on a CPU with bf16 would otherwise run its float layers in bf16 by OpenVINO's default). inspection.py
(beside this file) prepares the image and writes what an inspection screen shows.
"""
import json
import sys

import openvino as ov

from inspection import prepare, report

core = ov.Core()
model = core.read_model(sys.argv[1])
meta = json.loads(model.get_rt_info(["draem_metadata"]).astype(str))
hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}[meta.get("precision", "fp32")]  # int8 layers run int8 anyway
compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
image, batch = prepare(sys.argv[2], meta)
result = compiled(batch)
anomaly_map, score = result[compiled.output("anomaly_map")], result[compiled.output("image_score")]
report(sys.argv[2], meta, image, anomaly_map[0], float(score[0]), sys.argv[3] if len(sys.argv) > 3 else None)
