"""Sub-8-bit weight codes stored at their own width in the ONNX file (:func:`pack_onnx_codes`), and the
check that ONNX Runtime turns the packed file back into the very graph it runs for the int8 one
(:func:`unfolded`).

ONNX has no 2-, 3-, 5-, 6- or 7-bit integer type, and ONNX Runtime's CPU provider ran INT4
DequantizeLinear before a Conv as a float op at every call (2.2× slower than FP32 when tried,
issue 18), not as QLinearConv. So the codes are stored as bit planes in uint8 initializers and
turned back into the int8 (uint8) code tensor by a small subgraph that reads only initializers:
ONNX Runtime's constant folding runs it once when the session loads, and its QDQ fusions, which
come after, see the same int8 constant as in the unpacked file. :func:`unfolded` proves it on
every export by comparing the two optimized graphs (op types and every initializer's bytes);
where they differ the export keeps one byte a code.

Layout: the code tensors of one group (same width b and integer type; codes in [0, 2^b) or, if
some are negative, in [−2^(b−1), 2^(b−1)); lo the range's lowest code) are concatenated as
u = code − lo, padded to a multiple of 8, and stored as b planes of bits, plane p holding bit p of
every code, 8 codes a byte, lowest bit first: a (b, n/8, 1) uint8 initializer, b·n/8 bytes.
Unpacking: BitShift left by 7 − k then right by 7 isolates bit k of each byte (uint8 shifts drop
the high bits), Cast to int32, Mul by 2^p, ReduceSum over the planes, Add lo, Cast back, Split into
the tensors and Reshape each: ops of opset 13, so ONNX Runtime folds them (once per load, at a
transient cost of 4 bytes a code per group). The nodes cost ~450 bytes a group.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable

import numpy as np

#: Tensors with fewer codes stay one byte a code: the nodes that unpack them would cost more.
MIN_CODES = 128
#: Codes per group at most: bounds the int32 tensor ONNX Runtime builds once while folding.
MAX_GROUP = 1 << 22


def _code_width(a: np.ndarray) -> tuple[int, int]:
    """(bits b, offset lo) of the narrowest b-bit range holding the codes: [0, 2^b) if none is
    negative, else [−2^(b−1), 2^(b−1)) (so that all tensors of one width share a group)."""
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0:
        return max(1, hi.bit_length()), 0
    bits = 1 + max((-lo - 1).bit_length(), max(hi, 0).bit_length())
    return bits, -(1 << (bits - 1))


def _bit_planes(u: np.ndarray, bits: int) -> np.ndarray:
    """The codes ``u`` ∈ [0, 2^bits) (1-D, length a multiple of 8) as (bits, len/8, 1) uint8."""
    planes = [np.packbits((u >> p) & 1, bitorder="little") for p in range(bits)]
    return np.stack(planes)[..., None]


def _unpack_planes(planes: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_bit_planes` in numpy (the oracle of the ONNX subgraph)."""
    bits = np.unpackbits(planes[..., 0], axis=1, bitorder="little").astype(np.int64)
    return (bits << np.arange(len(planes))[:, None]).sum(0)


def pack_onnx_codes(proto, *, min_codes: int = MIN_CODES):
    """A copy of ``proto`` with every int8/uint8 initializer of at least ``min_codes`` values
    whose codes span fewer than 8 bits stored as bit planes and unpacked by a constant subgraph.
    Returns (the new ModelProto, {initializer name: bits stored per code}); ({} when nothing
    narrower than 8 bits is found)."""
    from onnx import ModelProto, TensorProto, numpy_helper

    inputs = {i.name for i in proto.graph.input}
    groups: dict[tuple[int, int, int], list] = {}
    widths: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.data_type not in (TensorProto.INT8, TensorProto.UINT8) or t.name in inputs:
            continue
        a = numpy_helper.to_array(t)
        if a.size < min_codes:
            continue
        bits, lo = _code_width(a)
        if bits < 8:
            groups.setdefault((bits, t.data_type, lo), []).append((t.name, a))
            widths[t.name] = bits
    if not widths:
        return proto, {}
    out = ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    kept = [t for t in g.initializer if t.name not in widths]
    del g.initializer[:]
    g.initializer.extend(kept)
    builder = _Unpacker(g)
    for (bits, dtype, lo), members in groups.items():
        for chunk in _chunks(members):
            builder.add(chunk, bits, dtype, lo)
    nodes = builder.nodes + list(g.node)  # the unpacking reads only initializers: it goes first
    del g.node[:]
    g.node.extend(nodes)
    return out, widths


def _chunks(members: list) -> Iterable[list]:
    """``members`` in runs of at most :data:`MAX_GROUP` codes (one tensor alone may exceed it)."""
    run, n = [], 0
    for m in members:
        if run and n + m[1].size > MAX_GROUP:
            yield run
            run, n = [], 0
        run.append(m)
        n += m[1].size
    yield run


class _Unpacker:
    """The initializers and nodes that rebuild packed code tensors, with short fresh names and the
    small constants (shift tables, axes) shared across groups."""

    def __init__(self, g):
        self.g = g
        self.nodes: list = []
        self.taken = {t.name for t in g.initializer} | {i.name for i in g.input}
        for n in g.node:
            self.taken.update(n.input)
            self.taken.update(n.output)
        self.consts: dict[tuple, str] = {}
        self.count = 0

    def fresh(self) -> str:
        while f"pk{self.count}" in self.taken:
            self.count += 1
        name = f"pk{self.count}"
        self.taken.add(name)
        return name

    def init(self, arr: np.ndarray, shared: bool = False) -> str:
        from onnx import numpy_helper

        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if shared and key in self.consts:
            return self.consts[key]
        name = self.fresh()
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        if shared:
            self.consts[key] = name
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, outputs=None, **attrs) -> list[str]:
        from onnx import helper

        outputs = outputs or [self.fresh() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs

    def add(self, members: list, bits: int, dtype: int, lo: int) -> None:
        """Nodes writing each of ``members`` ([(initializer name, codes)]) from one plane tensor."""
        from onnx import TensorProto

        sizes = [a.size for _, a in members]
        n = sum(sizes)
        u = np.zeros(-(-n // 8) * 8, np.uint8)
        u[:n] = np.concatenate([(a.astype(np.int16) - lo).ravel() for _, a in members])
        planes = self.init(_bit_planes(u, bits))
        left = self.init(np.arange(7, -1, -1, dtype=np.uint8), shared=True)
        right = self.init(np.full(8, 7, np.uint8), shared=True)
        powers = self.init((1 << np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1), shared=True)
        (x,) = self.node("BitShift", [planes, left], direction="LEFT")
        (x,) = self.node("BitShift", [x, right], direction="RIGHT")  # (bits, n/8, 8) of 0/1
        (x,) = self.node("Cast", [x], to=TensorProto.INT32)
        (x,) = self.node("Mul", [x, powers])
        (x,) = self.node("ReduceSum", [x, self.init(np.array([0], np.int64), shared=True)])
        (x,) = self.node("Reshape", [x, self.init(np.array([-1], np.int64), shared=True)])
        if lo:
            (x,) = self.node("Add", [x, self.init(np.int32(lo), shared=True)])
        (x,) = self.node("Cast", [x], to=dtype)
        pad = len(u) - n
        if len(members) == 1 and not pad:
            parts = [x]
        else:
            split = self.init(np.array(sizes + ([pad] if pad else []), np.int64))
            parts = self.node("Split", [x, split], n_out=len(sizes) + bool(pad), axis=0)
        for (name, a), flat in zip(members, parts, strict=False):
            shape = self.init(np.array(a.shape, np.int64), shared=True)
            self.node("Reshape", [flat, shape], outputs=[name])


def _optimized(data: bytes, path: str, threads: int):
    """The graph ONNX Runtime runs for the model ``data`` (its optimized-model dump)."""
    import onnx

    from .runtime import ort_session

    ort_session(data, threads=threads, optimized_path=path)
    return onnx.load(path).graph


def unfolded(packed: bytes, plain: bytes, threads: int = 1) -> str | None:
    """None if ONNX Runtime runs the same graph for ``packed`` as for ``plain`` (the same ops and
    initializers of the same bytes: the unpacking folded at load), else what differs."""
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        runs = [_optimized(d, os.path.join(tmp, f"{k}.onnx"), threads)
                for k, d in (("packed", packed), ("plain", plain))]  # fmt: skip
    ops = [Counter((n.domain, n.op_type) for n in g.node) for g in runs]
    if ops[0] != ops[1]:
        extra = sorted(f"{op}×{k}" for (_, op), k in (ops[0] - ops[1]).items())
        return f"ONNX Runtime left {', '.join(extra) or 'other ops'} in the packed graph"
    inits = [
        Counter(
            (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in g.initializer
        )
        for g in runs
    ]
    if inits[0] != inits[1]:
        return "ONNX Runtime's constants for the packed graph differ from the int8 graph's"
    return None
