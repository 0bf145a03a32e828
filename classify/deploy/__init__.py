"""Deployment: `export` (one ONNX graph) and `serve` (HTTP with a page)."""
