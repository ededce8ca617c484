"""The ONNX graph under rewrite (:class:`_Graph`): its initializers, old and added, the tensor names
taken, new nodes and the ModelProto built at the end; and the look-ups every rewrite pass uses:
node attributes, producers and consumers of tensors, topological order, short tensor names.

One :class:`_Graph` serves a whole export. With ``requantize`` the activation pass runs twice (once
to calibrate, once for the file), and both runs draw names and initializers from the same graph, so
the second run sees what the first one took.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ExportError
from .common import MS_DOMAIN, OPSET


class _Graph:
    """The float graph of ``proto`` and what the rewrite adds to it (initializers, names)."""

    def __init__(self, proto):
        self.proto, self.g = proto, proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.new_inits: list = []
        self.opset = OPSET
        self.uses_ms = False  # set by a pass that writes a com.microsoft op
        names = {t.name for t in self.g.initializer}
        for n in self.g.node:
            names.update(n.input)
            names.update(n.output)
        self.names = names | {i.name for i in self.g.input}

    @property
    def outputs(self) -> set[str]:
        """Names of the graph's outputs."""
        return {o.name for o in self.g.output}

    def fresh(self, base: str) -> str:
        """A tensor name not taken yet (``base``, else ``base_1``, ``base_2`` …), now taken."""
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name``, or None if it is not one."""
        from onnx import numpy_helper

        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def add_init(self, base: str, arr: np.ndarray) -> str:
        """A new initializer holding ``arr``, named after ``base``; returns its name."""
        from onnx import numpy_helper

        name = self.fresh(base)
        t = numpy_helper.from_array(np.array(arr, copy=True, order="C"), name)  # keeps 0-d as 0-d
        self.new_inits.append(t)
        self.inits[name] = t
        return name

    @staticmethod
    def node(op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        domain = MS_DOMAIN if op == "MatMulNBits" else None  # None: the default, not written
        return helper.make_node(op, inputs, outputs, domain=domain, **attrs)

    def resolve(self, name: str, producers: Mapping[str, Any]) -> str | None:
        """The initializer behind ``name``, following Identity nodes."""
        seen = 0
        while name not in self.inits and seen < 8:
            p = producers.get(name)
            if p is None or p.op_type != "Identity":
                return None
            name, seen = p.input[0], seen + 1
        return name if name in self.inits else None

    def toposort(self, nodes: list) -> list:
        """``nodes`` in an order where every input is produced before it is read (stable
        otherwise)."""
        available = set(self.inits) | {i.name for i in self.g.input} | {""}
        pending, done = list(nodes), []
        while pending:
            rest = []
            for n in pending:
                if all(x in available for x in n.input):
                    done.append(n)
                    available.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ExportError(
                    f"the rewritten graph has a cycle or a dangling input near {rest[0].op_type} "
                    f"{rest[0].name!r}"
                )
            pending = rest
        return done

    def build(self, nodes: list, extra_outputs: list[str] = ()):
        """A ModelProto of ``nodes`` with the initializers they use, dead nodes dropped.
        ``extra_outputs`` are left untyped: a Concat of shape slices (``x.flatten(1, 2)``) reads
        int64 tensors, which ONNX Runtime refuses as float outputs (the caller skips them)."""
        from onnx import helper

        outputs = list(self.g.output) + [
            helper.make_empty_tensor_value_info(t) for t in extra_outputs
        ]
        out_names = {o.name for o in outputs}
        while True:  # drop nodes nobody reads (Identity nodes of replaced weights), repeatedly
            used = {x for n in nodes for x in n.input} | out_names
            keep = [n for n in nodes if any(o in used for o in n.output)]
            if len(keep) == len(nodes):
                break
            nodes = keep
        inits, seen = [], set()
        for t in list(self.g.initializer) + self.new_inits:
            if t.name in used and t.name not in seen:
                seen.add(t.name)
                inits.append(t)
        if not extra_outputs:
            _short_names(nodes, keep={*(i.name for i in self.g.input), *out_names, *seen})
        graph = helper.make_graph(
            nodes, self.g.name or "squeezer", list(self.g.input), outputs, initializer=inits
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        return helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="squeezer",
            ir_version=self.proto.ir_version,  # ONNX Runtime rejects the newest IR versions
        )


def _producers_consumers(nodes: list) -> tuple[dict[str, Any], dict[str, list]]:
    """{tensor: the node writing it} and {tensor: the nodes reading it}."""
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    return producers, consumers


def _single_consumer(t: str, consumers: Mapping[str, list], outputs: set[str]):
    """The one node reading ``t``, or None if there are several or ``t`` is a graph output."""
    users = consumers.get(t, [])
    return users[0] if len(users) == 1 and t not in outputs else None


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _short_names(nodes: list, keep: set[str]) -> None:
    """Rename intermediate tensors t0, t1, ... in place (node names keep the module scopes): on a
    small net the exporter's scoped tensor names are a few percent of the file."""
    names: dict[str, str] = {}
    for n in nodes:
        for j, x in enumerate(n.output):
            if x and x not in keep:
                names.setdefault(x, f"t{len(names)}")
                n.output[j] = names[x]
    for n in nodes:
        for j, x in enumerate(n.input):
            if x in names:
                n.input[j] = names[x]
