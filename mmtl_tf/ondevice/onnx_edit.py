"""Baking tensors into an ONNX model by editing its protobuf wire format (no ``onnx`` package).

The device has no ``onnx`` package, so a personalised model is written by rewriting the bytes of
the exported predict graph: the graph inputs that become constants are dropped and a
TensorProto initializer is appended for each. Every other field is copied byte for byte.

Wire format used (https://protobuf.dev/programming-guides/encoding/): a message is a sequence
of ``tag = field_number << 3 | wire_type`` varints followed by a varint (type 0), 8 bytes
(type 1), a varint length and that many bytes (type 2) or 4 bytes (type 5).
Field numbers from onnx.proto: ModelProto 1 ir_version, 7 graph, 14 metadata_props;
GraphProto 5 initializer, 11 input; TensorProto 1 dims, 2 data_type, 8 name, 9 raw_data;
ValueInfoProto 1 name; StringStringEntryProto 1 key, 2 value.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

_MODEL_IR_VERSION, _MODEL_GRAPH, _MODEL_METADATA = 1, 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT = 5, 11
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_VALUE_INFO_NAME = 1
# TensorProto.DataType codes of the dtypes a model's parameters can have.
DATA_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int32): 6, np.dtype(np.int64): 7}


class Field(NamedTuple):
    """One field of a message: its number, wire type, the value's bytes (for type 2 the
    payload without its length) and the whole encoded field, tag included."""

    number: int
    wire_type: int
    value: bytes | int
    encoded: bytes


class WireFormatError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decodes the varint at ``pos``. Returns (value, position after it)."""
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise WireFormatError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireFormatError("varint longer than 10 bytes")


def varint(value: int) -> bytes:
    """Encodes a non-negative int as a varint."""
    if value < 0:
        raise ValueError(f"varint({value}): negative values are not used here")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def fields(data: bytes) -> Iterator[Field]:
    """The fields of one message, in the order they are stored."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire_type == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:  # groups (3, 4) are not used by onnx.proto
            raise WireFormatError(f"unsupported wire type {wire_type} for field {number}")
        if pos > len(data) or number == 0:
            raise WireFormatError(f"field {number} runs past the end of the message")
        yield Field(number, wire_type, value, data[start:pos])


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """A TensorProto holding ``array`` as little-endian raw_data."""
    array = np.asarray(array)
    if array.dtype not in DATA_TYPES:
        raise ValueError(f"{name}: dtype {array.dtype} is not one of {sorted(map(str, DATA_TYPES))}")
    out = b"".join(varint(_TENSOR_DIMS << 3) + varint(int(d)) for d in array.shape)
    out += varint(_TENSOR_DATA_TYPE << 3) + varint(DATA_TYPES[array.dtype])
    out += length_delimited(_TENSOR_NAME, name.encode())
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return out + length_delimited(_TENSOR_RAW_DATA, raw)


def _name_of(message: bytes, number: int) -> str | None:
    for f in fields(message):
        if f.number == number and f.wire_type == 2:
            return f.value.decode()
    return None


def bake_initializers(model: bytes, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> bytes:
    """A copy of the serialized ModelProto ``model`` where each graph input named in
    ``tensors`` is replaced by an initializer holding that array; ``metadata`` entries are
    added to the model's metadata_props. Every name in ``tensors`` must be a graph input."""
    model_fields = list(fields(model))
    graphs = [f for f in model_fields if f.number == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0].wire_type != 2:
        raise WireFormatError(f"expected one graph in the model, found {len(graphs)}")
    ir = [f.value for f in model_fields if f.number == _MODEL_IR_VERSION and f.wire_type == 0]
    if ir and ir[0] < 4:  # before IR 4 every initializer also had to be a graph input
        raise WireFormatError(f"IR version {ir[0]} is too old to bake initializers (needs >= 4)")
    graph = _bake_graph(graphs[0].value, tensors)
    metadata = metadata or {}
    out = bytearray()
    for f in model_fields:
        if f.number == _MODEL_GRAPH:
            out += length_delimited(_MODEL_GRAPH, graph)
        elif not (f.number == _MODEL_METADATA and _name_of(f.value, 1) in metadata):
            out += f.encoded  # an old entry with a key set below is dropped: keys are unique
    for key, value in metadata.items():
        entry = length_delimited(1, key.encode()) + length_delimited(2, value.encode())
        out += length_delimited(_MODEL_METADATA, entry)
    return bytes(out)


def _bake_graph(graph: bytes, tensors: dict[str, np.ndarray]) -> bytes:
    kept, removed = bytearray(), set()
    for f in fields(graph):
        if f.number == _GRAPH_INPUT and f.wire_type == 2:
            name = _name_of(f.value, _VALUE_INFO_NAME)
            if name in tensors:
                removed.add(name)
                continue
        if f.number == _GRAPH_INITIALIZER and f.wire_type == 2:
            if _name_of(f.value, _TENSOR_NAME) in tensors:
                continue  # replaced below; a name may hold only one initializer
        kept += f.encoded
    missing = sorted(set(tensors) - removed)
    if missing:
        raise WireFormatError(f"the graph has no inputs named {missing}")
    for name in tensors:
        kept += length_delimited(_GRAPH_INITIALIZER, tensor_proto(name, tensors[name]))
    return bytes(kept)


def graph_input_names(model: bytes) -> list[str]:
    """Names of the graph inputs of a serialized ModelProto, in order."""
    graph = next((f.value for f in fields(model) if f.number == _MODEL_GRAPH), b"")
    return [_name_of(f.value, _VALUE_INFO_NAME) for f in fields(graph)
            if f.number == _GRAPH_INPUT and f.wire_type == 2]
