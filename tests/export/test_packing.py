"""Sub-8-bit codes stored as bit planes (``squeezer.export.packing``). Oracles: ONNX Runtime itself
(the unpacking subgraph must rebuild every code exactly, and its optimized graph must be the one
it builds for the unpacked file) and the file size (b bits a code plus a few hundred bytes of
nodes)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from squeezer.export.packing import _bit_planes, _unpack_planes, pack_onnx_codes, unfolded  # noqa: E402
from squeezer.export.runtime import ort_session  # noqa: E402


@pytest.mark.parametrize("bits", range(1, 8))
def test_bit_planes_hold_b_bits_a_code(bits):
    u = np.random.default_rng(bits).integers(0, 1 << bits, 8 * 37).astype(np.uint8)
    planes = _bit_planes(u, bits)
    assert planes.dtype == np.uint8 and planes.shape == (bits, 37, 1)
    assert np.array_equal(_unpack_planes(planes), u)


def _codes_graph(tensors: dict[str, np.ndarray]):
    """A model whose outputs are its integer initializers cast to float."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, name) for name, a in tensors.items()]
    nodes = [helper.make_node("Cast", [n], [f"{n}_out"], to=TensorProto.FLOAT) for n in tensors]
    outs = [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, a.shape)
            for n, a in tensors.items()]  # fmt: skip
    graph = helper.make_graph(nodes, "codes", [], outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_packed_codes_unpack_in_onnx_runtime_to_the_same_codes():
    rng = np.random.default_rng(0)
    tensors = {
        "w3": rng.integers(-4, 4, (64, 32, 3, 3)).astype(np.int8),  # 3-bit, one group with w3b
        "w3b": rng.integers(-4, 4, (37, 5)).astype(np.int8),  # its size pads the group
        "w2": rng.integers(-1, 2, (40, 30)).astype(np.int8),  # narrow 2-bit range, lo = -1
        "u4": rng.integers(0, 16, (10, 64)).astype(np.uint8),  # asymmetric 4-bit codes
        "w7": rng.integers(-64, 64, (300,)).astype(np.int8),
        "w8": rng.integers(-128, 128, (500,)).astype(np.int8),  # full 8 bits: stays
        "small": rng.integers(-2, 2, (16,)).astype(np.int8),  # too few codes to pay: stays
    }
    proto = _codes_graph(tensors)
    packed, widths = pack_onnx_codes(proto)
    assert widths == {"w3": 3, "w3b": 3, "w2": 2, "u4": 4, "w7": 7}
    plain, small = proto.SerializeToString(), packed.SerializeToString()
    saved = sum(tensors[n].size * (8 - b) / 8 for n, b in widths.items())
    groups = 4  # (3, int8), (2, int8), (4, uint8), (7, int8): ~450 bytes of nodes each
    assert len(plain) - saved < len(small) <= len(plain) - saved + 500 * groups
    for data in (plain, small):
        got = ort_session(data, threads=1).run(None, {})
        for (name, a), g in zip(tensors.items(), got, strict=True):
            assert g.shape == a.shape and np.array_equal(g, a.astype(np.float32)), name
    # the input is unchanged
    assert {t.name for t in proto.graph.initializer} == set(tensors)


def test_unfolded_compares_what_onnx_runtime_runs():
    rng = np.random.default_rng(1)
    w = {"w": rng.integers(-4, 4, (64, 64)).astype(np.int8)}
    proto = _codes_graph(w)
    packed, _ = pack_onnx_codes(proto)
    plain = proto.SerializeToString()
    assert unfolded(packed.SerializeToString(), plain) is None
    other = _codes_graph({"w": np.roll(w["w"], 1)}).SerializeToString()
    assert "constants" in unfolded(other, plain)


def test_nothing_to_pack_returns_the_model_itself():
    proto = _codes_graph({"w8": np.arange(-128, 128, dtype=np.int8)})
    packed, widths = pack_onnx_codes(proto)
    assert widths == {} and packed is proto
