"""The decoder's external weights as onnxruntime values that read the decrypted bundle in place.

A bundle's graph keeps its weights outside (location ``weights.bin``, the bundle's weights section).
Given to onnxruntime as an in-memory file, every weight is copied into the session, so loading
needs the bundle and that copy at once. Given as ``OrtValue``s that view the section, registered
both as external initializers (they replace the graph's ``weights.bin`` entries) and as shared
initializers (the session uses them where they lie), nothing is copied: the session then reads
the bundle for as long as it lives, so the bundle must outlive it (``OnnxTextModel`` owns it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from enclave._daemon.errors import ModelRefusedError
from enclave.llm.bundle import WEIGHTS_FILE


@dataclass(frozen=True)
class InPlaceWeights:
    names: list[str]
    values: list[ort.OrtValue]
    # Tensors lying at an offset their type cannot be read from, copied (and wiped with the bundle).
    copies: list[np.ndarray]

    @property
    def copied(self) -> int:
        return sum(copy.nbytes for copy in self.copies)

    def wipe_copies(self) -> None:
        for copy in self.copies:
            copy.fill(0)


def weights_in_place(graph: onnx.ModelProto, weights: memoryview) -> InPlaceWeights:
    """One ``OrtValue`` per external initializer of ``graph``, viewing ``weights``; refuses bad bounds
    and external data anywhere else (onnxruntime would look for such a tensor in a file on disk)."""
    _refuse_external_outside_initializers(graph.graph)
    names: list[str] = []
    values: list[ort.OrtValue] = []
    copies: list[np.ndarray] = []
    for tensor in graph.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        array = _view(tensor, weights)
        if not array.flags.aligned:
            # onnx writes external data unaligned unless asked; such a tensor gets its own copy.
            array = array.copy()
            copies.append(array)
        try:
            value = ort.OrtValue.ortvalue_from_numpy(array)
        except Exception:  # onnxruntime's own error types: a numpy type it cannot hold
            raise ModelRefusedError(
                f"language model weight {tensor.name[:80]!r} has a type onnxruntime cannot hold"
            ) from None
        names.append(tensor.name)
        values.append(value)
    return InPlaceWeights(names, values, copies)


def _refuse_external_outside_initializers(top: onnx.GraphProto) -> None:
    """Sparse initializers, node attributes (``Constant``'s value) and subgraphs (``If``, ``Loop``)
    may not keep their data outside: only the top graph's initializers are given from memory."""
    graphs = [top]
    while graphs:
        graph = graphs.pop()
        tensors = [] if graph is top else list(graph.initializer)
        for sparse in graph.sparse_initializer:
            tensors += [sparse.values, sparse.indices]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                    tensors += [sparse.values, sparse.indices]
                graphs += [attribute.g, *attribute.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ModelRefusedError(
                    f"language model tensor {tensor.name[:80]!r} keeps its data outside the graph but"
                    " is not one of its initializers (a subgraph's, an attribute's or a sparse one):"
                    " not supported"
                )


def register(options: ort.SessionOptions, weights: InPlaceWeights) -> None:
    options.add_external_initializers(weights.names, weights.values)
    for name, value in zip(weights.names, weights.values, strict=True):
        options.add_initializer(name, value)


def _view(tensor: onnx.TensorProto, weights: memoryview) -> np.ndarray:
    where = f"language model weight {tensor.name[:80]!r}"
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if entries.get("location") != WEIGHTS_FILE:
        raise ModelRefusedError(f"{where} is not in the bundle's weights section")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        offset, length = int(entries.get("offset", "0")), int(entries["length"])
    except (KeyError, ValueError, TypeError):
        raise ModelRefusedError(f"{where} has a malformed external-data entry") from None
    count = math.prod(tensor.dims)
    if dtype.hasobject or any(d < 0 for d in tensor.dims) or count * dtype.itemsize != length:
        raise ModelRefusedError(f"{where}: its type and shape do not match its {length} bytes")
    if offset < 0 or offset + length > len(weights):
        raise ModelRefusedError(f"{where} lies outside the bundle's weights section")
    return np.frombuffer(weights, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))
