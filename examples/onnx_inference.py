"""Score one image with a file from export_draem.py, using only numpy, OpenCV and ONNX Runtime.

    python examples/onnx_inference.py bottle.onnx photo.png
"""
import sys

import cv2
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
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

anomaly_map, score, _ = session.run(None, {"images": batch})
threshold = float(meta.get("image_threshold", "nan"))
verdict = "no threshold" if np.isnan(threshold) else "ANOMALY" if score[0] >= threshold else "OK"
print(f"score {score[0]:.9g} {verdict} (threshold {threshold:g}); map max {anomaly_map.max():.4f}")
