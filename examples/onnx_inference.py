"""Score one image with a file from export_draem.py, using only numpy, OpenCV and ONNX Runtime.

    python examples/onnx_inference.py bottle.onnx photo.png            # score and verdict
    python examples/onnx_inference.py bottle.onnx photo.png heatmaps/  # also photo_overlay.png, photo_mask.png

inspection.py (beside this file) prepares the image and writes what an inspection screen shows.
"""
import sys

import onnxruntime as ort

from inspection import prepare, report

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
image, batch = prepare(sys.argv[2], meta)
anomaly_map, score, _ = session.run(None, {"images": batch})
report(sys.argv[2], meta, image, anomaly_map[0], float(score[0]), sys.argv[3] if len(sys.argv) > 3 else None)
