"""Model files for deployment: the ONNX graph, OpenVINO IR, int8 quantization, and loading any model file."""
