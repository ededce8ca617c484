"""The graph object the rewrite passes share (``squeezer.export.onnx_graph``), on a hand-built
ModelProto: fresh names, initializers behind Identity nodes, topological order, and the model
built at the end (dead nodes and unused initializers dropped, intermediate tensors renamed), which
the ONNX checker must accept."""

from __future__ import annotations

import numpy as np
import pytest

from squeezer.errors import ExportError

onnx = pytest.importorskip("onnx")
from squeezer.export.onnx_graph import _Graph, _producers_consumers  # noqa: E402


def _proto():
    """y = x · Identity(W), and a Relu of x that nobody reads."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")
    nodes = [
        helper.make_node("Identity", ["W"], ["W_copy"]),
        helper.make_node("MatMul", ["x", "W_copy"], ["scoped/matmul_out"]),
        helper.make_node("Relu", ["scoped/matmul_out"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fresh_names_never_repeat_a_taken_one():
    g = _Graph(_proto())
    assert g.fresh("y") == "y_1" and g.fresh("y") == "y_2"
    assert g.fresh("new") == "new" and g.fresh("new") == "new_1"
    assert g.add_init("W", np.zeros(2, np.float32)) == "W_1"
    assert g.array("W_1").tolist() == [0.0, 0.0] and g.array("x") is None


def test_resolve_follows_identity_to_the_initializer():
    g = _Graph(_proto())
    producers, consumers = _producers_consumers(list(g.g.node))
    assert g.resolve("W_copy", producers) == "W"
    assert g.resolve("scoped/matmul_out", producers) is None
    assert [n.op_type for n in consumers["x"]] == ["MatMul", "Relu"]


def test_toposort_orders_reversed_nodes_and_names_a_dangling_input():
    g = _Graph(_proto())
    nodes = list(g.g.node)
    order = [n.output[0] for n in g.toposort(nodes[::-1])]
    assert order == ["dead", "W_copy", "scoped/matmul_out", "y"]  # ready ones first, stably
    with pytest.raises(ExportError, match="dangling input near MatMul"):
        g.toposort(nodes[1:])


def test_build_drops_dead_nodes_and_unused_initializers_and_shortens_names():
    g = _Graph(_proto())
    g.add_init("unused", np.ones(4, np.float32))
    model = g.build(list(g.g.node))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Identity", "MatMul", "Relu"]
    assert [t.name for t in model.graph.initializer] == ["W"]
    assert [n.output[0] for n in model.graph.node] == ["t0", "t1", "y"]  # graph outputs keep names
    assert model.ir_version == 8 and [o.domain for o in model.opset_import] == [""]
    g.uses_ms = True
    assert "com.microsoft" in [o.domain for o in g.build(list(g.g.node)).opset_import]
