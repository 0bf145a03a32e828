"""Just enough of the ONNX format to hand a small feed-forward network to OpenCV's DNN module.

Why by hand: the CPU detector runs MTCNN's three nets in `cv2.dnn`, which reads ONNX; building the
graph with the `onnx` package or `torch.onnx.export` would add a dependency, or the 1.8 s
`import torch` the CPU crop path exists to avoid. An ONNX model is a protocol-buffer message, and
the handful of fields a graph of Conv/PRelu/MaxPool/Gemm/Softmax nodes needs is written here
(field numbers from onnx.proto). The result is checked against torch's own forward pass in
tests/test_detector.py.
"""
from __future__ import annotations

import struct

import numpy as np

IR_VERSION, OPSET = 7, 13
_FLOAT = 1  # TensorProto.DataType / TypeProto elem_type
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields: two's complement, ten bytes
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _len(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return _key(field, 2) + _varint(len(payload)) + payload


def attribute(name: str, value: int | float | list[int]) -> bytes:
    """An AttributeProto: an int, a float or a list of ints."""
    if isinstance(value, list):
        return _len(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
    if isinstance(value, float):
        return _len(1, name) + _key(2, 5) + struct.pack("<f", value) + _int(20, _ATTR_FLOAT)
    return _len(1, name) + _int(3, value) + _int(20, _ATTR_INT)


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> bytes:
    """A NodeProto."""
    body = b"".join(_len(1, i) for i in inputs) + b"".join(_len(2, o) for o in outputs)
    body += _len(3, outputs[0]) + _len(4, op)
    return body + b"".join(_len(5, attribute(k, v)) for k, v in attrs.items())


def tensor(name: str, array: np.ndarray) -> bytes:
    """A float32 TensorProto (an initializer) with raw little-endian data."""
    a = np.ascontiguousarray(array, dtype="<f4")
    return b"".join(_int(1, d) for d in a.shape) + _int(2, _FLOAT) + _len(8, name) + _len(9, a.tobytes())


def value_info(name: str, shape: list[int | str]) -> bytes:
    """A float ValueInfoProto; `shape` entries are sizes or symbolic names."""
    dims = b"".join(_len(1, _int(1, d) if isinstance(d, int) else _len(2, d)) for d in shape)
    tensor_type = _int(1, _FLOAT) + _len(2, dims)
    return _len(1, name) + _len(2, _len(1, tensor_type))


def model(name: str, nodes: list[bytes], initializers: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """A serialised ModelProto holding one graph."""
    graph = b"".join(_len(1, n) for n in nodes) + _len(2, name)
    graph += b"".join(_len(5, t) for t in initializers)
    graph += b"".join(_len(11, i) for i in inputs) + b"".join(_len(12, o) for o in outputs)
    opset = _len(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _len(2, "maskcls") + _len(7, graph) + _len(8, opset)
