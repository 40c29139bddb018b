"""An editable index over one ONNX graph: producers, consumers, constants and safe rewrites.

Tensors are converted to numpy only when a fold touches them; one kept in an external file is read then,
through :mod:`bnfold.onnx.store.external`'s checks. Weights used by more than one node are cloned under a
fresh name, never changed in place; values a rewrite disconnects are removed at :meth:`GraphIndex.commit`
only if nothing else reads them.

A subgraph (``If`` branch, ``Loop``/``Scan`` body) gets its own index with ``outer`` set to the enclosing
one: outer values resolve as constants through it, and a node whose subgraph reads an outer value counts
as a reader of that value in the outer graph. A fold inside never edits an outer tensor: the new tensor
becomes an initializer of the subgraph itself, so the outer one stays intact for its other readers (and
the outer sweep drops it once :meth:`GraphIndex.refresh_reads` shows nothing reads it any more).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, MutableMapping

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto

from bnfold.core.affine import ChannelAffine
from bnfold.onnx.graph.constants import ConstantResolver
from bnfold.onnx.graph.types import ValueType
from bnfold.onnx.store.held import HeldValue
from bnfold.onnx.store.model_store import ModelStore


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def outer_names(graph: GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for subgraph in subgraphs(node):
            used.update(outer_names(subgraph))
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


class NameAllocator:
    """Fresh, deterministic names that collide with nothing in the model."""

    def __init__(self, graphs: Iterable[GraphProto]) -> None:
        self._taken: set[str] = set()
        # The next suffix to try per base: a weight shared by thousands of layers is cloned under one base,
        # and trying every taken suffix again for each clone made that quadratic.
        self._next_suffix: dict[str, int] = {}
        for graph in graphs:
            self._add_graph(graph)

    def _add_graph(self, graph: GraphProto) -> None:
        self._taken.update(t.name for t in graph.initializer)
        self._taken.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        for node in graph.node:
            self._taken.update(node.input)
            self._taken.update(node.output)
            self._taken.add(node.name)
            for subgraph in subgraphs(node):
                self._add_graph(subgraph)

    def fresh(self, base: str) -> str:
        """``base``, else ``base_1``, ``base_2``, … : the first not taken (names are never given back)."""
        name, suffix = base, self._next_suffix.get(base, 1)
        while name in self._taken:
            name = f"{base}_{suffix}"
            suffix += 1
        self._next_suffix[base] = suffix
        self._taken.add(name)
        return name


class GraphIndex:
    def __init__(
        self,
        graph: GraphProto,
        types: MutableMapping[str, ValueType],
        names: NameAllocator,
        *,
        opset: int,
        allow_overridable: bool = False,
        outer: GraphIndex | None = None,
        scope: str = "",
        store: ModelStore,
        main_graph: bool = False,
        listed_initializers: bool = False,
    ) -> None:
        self.graph = graph
        # Where every tensor's bytes are; only the main graph's written values may be held beside the proto.
        self.store = store
        self.main_graph = main_graph
        self.types = types
        self.names = names
        self.opset = opset
        self.allow_overridable = allow_overridable
        self.scope = scope
        self.initializers: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        # IR version 3 and older require every initializer to be listed as a graph input too; such a listing
        # is no sign that a caller may override the value (onnxruntime does not let one), so the graph's
        # inputs are the values it lists without an initializer. New initializers are listed in turn.
        self.listed_initializers = listed_initializers
        self.graph_inputs = {i.name for i in graph.input} - (self.initializers.keys() if listed_initializers else set())
        self.graph_outputs = {o.name for o in graph.output}
        self._nodes: list[NodeProto] = list(graph.node)
        # Nodes inserted right after a node (latest first), kept out of ``graph.node`` until commit: finding
        # the anchor's position for each insert made thousands of inserts quadratic.
        self._following: dict[int, list[NodeProto]] = {}
        self._inserted = False
        self.producers: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in self.nodes:
            self._register(node)
        self.constants: ConstantResolver = ConstantResolver(self, outer.constants if outer is not None else None)
        self._arrays: dict[str, np.ndarray] = {}
        self._removed: set[int] = set()
        self._maybe_dead: set[str] = set()
        self._vanished: set[str] = set()
        # Nodes a rewrite created or re-typed: the driver does not fold them again in the same pass.
        self.placed: set[int] = set()
        # Batch norms' maps while one anchor is planned (every pattern reads the same ones); see fold_node.
        self.batchnorm_affines: dict[int, ChannelAffine] = {}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[NodeProto]:
        """The graph's nodes in order, inserted ones included (removed ones too, until commit)."""
        if self._following:
            ordered: list[NodeProto] = []
            pending = list(reversed(self._nodes))
            while pending:
                node = pending.pop()
                ordered.append(node)
                pending.extend(reversed(self._following.pop(id(node), [])))
            self._nodes = ordered
        return self._nodes

    def _reads(self, node: NodeProto) -> list[str]:
        reads = [i for i in node.input if i]
        for subgraph in subgraphs(node):
            reads.extend(sorted(outer_names(subgraph)))
        return reads

    def _register(self, node: NodeProto) -> None:
        for name in node.output:
            if name:
                self.producers[name] = node
        for name in self._reads(node):
            self.consumers[name].append(node)

    def users(self, name: str) -> list[NodeProto]:
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def tensor_value(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self.tensor_array(self.initializers[name])
        return self._arrays[name]

    def forget_value(self, name: str) -> None:
        self._arrays.pop(name, None)
        self.constants.forget(name)

    def tensor_array(self, tensor: TensorProto) -> np.ndarray:
        """The value of any tensor of this graph, wherever the store has its bytes."""
        return self.store.array(tensor, main_graph=self.main_graph)

    def value_type(self, name: str) -> ValueType | None:
        return self.types.get(name)

    def is_removed(self, node: NodeProto) -> bool:
        return id(node) in self._removed

    def node_label(self, node: NodeProto) -> str:
        return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"

    # -- rewrites --------------------------------------------------------------------------------
    def set_input(self, node: NodeProto, slot: int, name: str) -> None:
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        if old:
            self.consumers[old].remove(node)
            self._maybe_dead.add(old)
        node.input[slot] = name
        self.consumers[name].append(node)

    def set_output(self, node: NodeProto, slot: int, name: str) -> None:
        old = node.output[slot]
        self.producers.pop(old, None)
        self._vanished.add(old)
        node.output[slot] = name
        self.producers[name] = node
        # The node computes what it did, under a new name: a fresh name must not lose the known type, or a
        # later fold in this run refuses what a second run (inferring types again) would fold.
        if old in self.types and name not in self.types:
            self.types[name] = self.types[old]

    def remove_node(self, node: NodeProto) -> None:
        self._removed.add(id(node))
        for name in node.output:
            if self.producers.get(name) is node:
                del self.producers[name]
                self._vanished.add(name)
        for name in self._reads(node):
            self.consumers[name].remove(node)
            self._maybe_dead.add(name)

    def write_tensor(self, node: NodeProto, slot: int, value: HeldValue, base: str) -> str:
        """Feed ``value`` to ``node.input[slot]``; reuse the initializer only if nothing else reads it."""
        old = node.input[slot] if slot < len(node.input) else ""
        if self._exclusive(old, node):
            self.store.replace(self.initializers[old], value, old, main_graph=self.main_graph)
            # The store has the value now; a second numpy copy of every folded weight would
            # double the memory a large model needs. A later read converts it again.
            self.forget_value(old)
            return old
        name = self.names.fresh(base)
        tensor = TensorProto()
        self.store.replace(tensor, value, name, main_graph=self.main_graph)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        self.set_input(node, slot, name)
        return name

    def _exclusive(self, name: str, node: NodeProto) -> bool:
        """``name`` is an initializer only ``node`` reads, once, and no caller can override."""
        return (
            name in self.initializers
            and name not in self.graph_inputs
            and self.users(name) == [node]
            and list(node.input).count(name) == 1
        )

    def turn_into(self, node: NodeProto, replacement: NodeProto) -> None:
        """Replace ``node`` by ``replacement`` at the same position (keeps topological order)."""
        for name in self._reads(node):
            self.consumers[name].remove(node)
            self._maybe_dead.add(name)
        for name in node.output:
            self.producers.pop(name, None)
            self._vanished.add(name)
        node.CopyFrom(replacement)
        self._register(node)
        self.placed.add(id(node))

    def insert_after(self, anchor: NodeProto, node: NodeProto) -> NodeProto:
        """Add ``node`` right after ``anchor`` (keeps topological order); it joins ``graph.node`` at commit."""
        self._following.setdefault(id(anchor), []).insert(0, node)
        self._inserted = True
        self._register(node)
        self.placed.add(id(node))
        return node

    def refresh_reads(self, node: NodeProto) -> None:
        """Re-register what ``node`` reads after a fold inside one of its subgraphs; outer values the
        subgraph stopped reading become candidates for the dead-value sweep."""
        before = {name for name, readers in self.consumers.items() if any(r is node for r in readers)}
        for name in before:
            self.consumers[name] = [r for r in self.consumers[name] if r is not node]
        reads = self._reads(node)
        for name in reads:
            self.consumers[name].append(node)
        self._maybe_dead.update(before - set(reads))

    # -- commit ----------------------------------------------------------------------------------
    def commit(self) -> None:
        """Drop what the rewrites left unread, then write nodes and initializers back to the graph."""
        self._sweep_dead_values()
        if self._inserted:
            self._rebuild_nodes()
        elif self._removed:
            for position in reversed(range(len(self._nodes))):
                if id(self._nodes[position]) in self._removed:
                    del self.graph.node[position]
            self._nodes = [n for n in self._nodes if id(n) not in self._removed]
            self._removed.clear()
        dead_initializers = [
            name for name in self.initializers
            if name in self._maybe_dead and not self.users(name) and name not in self.graph_inputs
            and name not in self.graph_outputs
        ]
        if dead_initializers:
            dead = set(dead_initializers)
            for position in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[position].name in dead:
                    del self.graph.initializer[position]
            for name in dead:
                del self.initializers[name]
        if self.listed_initializers:
            self._list_initializers()
        if self._vanished:
            stale = [v for v in self.graph.value_info if v.name in self._vanished and v.name not in self.producers]
            for info in stale:
                self.graph.value_info.remove(info)
            self._vanished.clear()
        self._maybe_dead.clear()
        # Every value is in the protos now; cached arrays would hold a copy of each tensor read.
        self._arrays.clear()
        self.constants.forget_all()

    def _rebuild_nodes(self) -> None:
        """Write the nodes back in one pass, inserted ones in place and removed ones dropped; the index then
        refers to the graph's own copies."""
        kept = [node for node in self.nodes if id(node) not in self._removed]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        self._nodes = list(self.graph.node)
        self._removed.clear()
        self._inserted = False
        self.placed.clear()
        self.producers.clear()
        self.consumers.clear()
        for node in self._nodes:
            self._register(node)

    def _list_initializers(self) -> None:
        """Keep an IR-3 graph valid: the main graph lists exactly its initializers (with their current type and
        shape) besides its inputs; a subgraph, whose inputs are its caller's to give, gets each new tensor as
        a ``Constant`` node instead, as a model-local function does."""
        listed = {info.name: info for info in self.graph.input}
        if not self.main_graph:
            new = [t for t in self.graph.initializer if t.name not in listed]
            if new:
                kept = [t for t in self.graph.initializer if t.name in listed]
                constants = [onnx.helper.make_node("Constant", [], [t.name], name=t.name, value=t) for t in new]
                del self.graph.initializer[:]
                self.graph.initializer.extend(kept)
                self.initializers = {t.name: t for t in self.graph.initializer}
                for position, constant in enumerate(constants):
                    self.graph.node.insert(position, constant)
                self._nodes[:0] = list(self.graph.node[:len(constants)])
            return
        wanted = [
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.graph.initializer
        ]
        by_name = {info.name: info for info in wanted}
        listing = [info if info.name in self.graph_inputs else by_name[info.name]
                   for info in self.graph.input if info.name in self.graph_inputs or info.name in by_name]
        listing += [info for info in wanted if info.name not in listed]
        if [i.SerializeToString() for i in listing] != [i.SerializeToString() for i in self.graph.input]:
            del self.graph.input[:]
            self.graph.input.extend(listing)

    def _sweep_dead_values(self) -> None:
        pending = sorted(self._maybe_dead)
        while pending:
            name = pending.pop()
            producer = self.producers.get(name)
            if producer is None or id(producer) in self._removed:
                continue
            if any(self.users(out) or self.is_graph_output(out) for out in producer.output if out):
                continue
            self.remove_node(producer)
            pending.extend(i for i in self._reads(producer))


def opset_version(model: onnx.ModelProto | onnx.FunctionProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return 0
