"""Deployment and measurement: export to ExecuTorch/ONNX, on-device latency, parameter and MAC counts."""
