"""A valid ONNX model of a chosen size (``build.py``), for the provisioning benchmark."""
