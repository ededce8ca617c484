"""A dynamic batch dimension for graphs whose trace froze it: :func:`_unfreeze_batch`.

The TorchScript exporter records ``x.shape[0]`` as a computation, but a Python ``int`` taken from a
tensor (``len(x)``, ``int(x.size(0))``) becomes a constant, and constant folding then bakes it into
folded tensors: ``cls.expand(len(x), -1, -1)`` (a vision transformer's class token) becomes a
``[2, 1, D]`` initializer that ONNX Runtime cannot concatenate with a batch of 64 ("Non concat axis
dimensions must match").

The model is traced twice, at batch sizes 2 and 3. The Python code path is the same, so the two
graphs have the same nodes and differ only in the tensors that depend on the batch size. Each such
tensor is rebuilt from the input's own batch size ``B`` (``Shape → Gather``): an integer shape or
scalar whose entries are ``k·2`` in one trace and ``k·3`` in the other becomes ``k·B``; a tensor
that is ``B`` equal slices stacked becomes ``Expand`` of one slice. Anything else depends on the
batch in a way no rewrite can express, and is a one-line ExportError.
"""

from __future__ import annotations

import numpy as np

from ..errors import ExportError

#: The two batch sizes of the differential trace.
BATCHES = (2, 3)


def _unfreeze_batch(small, large, batch_input: str):
    """``small`` (the ModelProto traced at batch 2) with every tensor that differs from ``large``'s
    (traced at batch 3) computed from the batch size of graph input ``batch_input``."""
    from onnx import helper, numpy_helper

    a_nodes, b_nodes = small.graph.node, large.graph.node
    if [n.op_type for n in a_nodes] != [n.op_type for n in b_nodes]:
        raise ExportError(
            "the model's graph changes with the batch size (traced at batch 2 and 3: different "
            "operations); export needs a forward whose operations do not depend on the batch size"
        )
    a_init = {t.name: t for t in small.graph.initializer}
    b_init = {t.name: t for t in large.graph.initializer}
    changed: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, t in a_init.items():
        other = b_init.get(name)
        if other is None:
            raise ExportError(
                f"the model's graph changes with the batch size (the constant {name!r} exists "
                "only at batch 2); export needs a forward whose operations do not depend on it"
            )
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(other)
        if x.shape != y.shape or not np.array_equal(x, y):
            changed.append((name, x, y))
    const_nodes = []
    for i, (m, n) in enumerate(zip(a_nodes, b_nodes, strict=True)):
        if m.op_type == "Constant" and m.attribute and m.attribute[0].name == "value":
            x = numpy_helper.to_array(m.attribute[0].t)
            y = numpy_helper.to_array(n.attribute[0].t)
            if x.shape != y.shape or not np.array_equal(x, y):
                changed.append((m.output[0], x, y))
                const_nodes.append(i)
    if not changed:
        return small

    g = small.graph
    made: list = []
    batch = f"{batch_input}_batch"  # [1] int64, the input's batch size
    shape = f"{batch_input}_shape"
    zero = helper.make_tensor(f"{batch}_index", 7, [1], [0])
    g.initializer.append(zero)
    made += [
        helper.make_node("Shape", [batch_input], [shape]),
        helper.make_node("Gather", [shape, zero.name], [batch], axis=0),
    ]
    for name, x, y in changed:
        made += _batch_tensor(g, name, x, y, batch)
    drop = {n for n, _, _ in changed}
    keep_init = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    nodes = [n for i, n in enumerate(g.node) if i not in set(const_nodes)]
    del g.node[:]
    g.node.extend(made + nodes)
    return small


def _batch_tensor(g, name: str, x: np.ndarray, y: np.ndarray, batch: str) -> list:
    """Nodes computing tensor ``name`` (``x`` at batch 2, ``y`` at batch 3) from ``batch``."""
    from onnx import helper, numpy_helper

    b0, b1 = BATCHES
    ints = np.issubdtype(x.dtype, np.integer) and x.shape == y.shape and x.ndim <= 1
    if ints:
        x64, y64 = x.astype(np.int64).reshape(-1), y.astype(np.int64).reshape(-1)
        moved = x64 != y64
        k = x64 // b0
        if np.all(x64[moved] * b1 == y64[moved] * b0) and np.all(x64[moved] % b0 == 0):
            base = np.where(moved, 0, x64)
            scale = np.where(moved, k, 0)
            parts = [f"{name}_base", f"{name}_scale"]
            g.initializer.extend(
                [numpy_helper.from_array(base, parts[0]), numpy_helper.from_array(scale, parts[1])]
            )
            prod, flat = f"{name}_batch_part", f"{name}_flat"
            out = flat if x.ndim == 0 or x.dtype != np.int64 else name
            nodes = [
                helper.make_node("Mul", [batch, parts[1]], [prod]),
                helper.make_node("Add", [prod, parts[0]], [out]),
            ]
            if out != name:
                cast = f"{name}_cast"
                nodes.append(helper.make_node("Cast", [flat], [cast], to=_onnx_dtype(x.dtype)))
                empty = f"{name}_scalar_shape"
                g.initializer.append(numpy_helper.from_array(np.array(x.shape, np.int64), empty))
                nodes.append(helper.make_node("Reshape", [cast, empty], [name]))
            return nodes
    stacked = (
        x.ndim >= 1 and y.ndim == x.ndim and x.shape[0] == b0 and y.shape[0] == b1
        and x.shape[1:] == y.shape[1:] and np.array_equal(y[:b0], x)
        and all(np.array_equal(y[i], y[0]) for i in range(b1))
    )  # fmt: skip
    if stacked:
        one, rest, full = f"{name}_slice", f"{name}_rest", f"{name}_shape"
        g.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(x[:1]), one),
                numpy_helper.from_array(np.array(x.shape[1:], np.int64), rest),
            ]
        )
        return [
            helper.make_node("Concat", [batch, rest], [full], axis=0),
            helper.make_node("Expand", [one, full], [name]),
        ]
    raise ExportError(
        f"the model's graph holds a tensor that depends on the batch size in a way export cannot "
        f"rebuild ({name!r}, shape {x.shape} at batch 2 and {y.shape} at batch 3); take batch "
        "sizes from x.shape[0] inside forward, not len(x) or int(...)"
    )


def _onnx_dtype(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
