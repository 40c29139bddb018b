"""Which folded sites the verification runs executed.

A folded site inside an ``If`` branch or a ``Loop`` body that no input reaches is not compared by any output,
so a pass would say nothing about it. The candidate is run with probes: every ``If`` branch and ``Loop`` body
(nested ones included) gets an extra int64 scalar output, 1 where it ran, passed up through its enclosing
If and Loop nodes to the main graph's outputs (a Loop's per-iteration values reduced by ``ReduceMax``). Only
the copy given to the engine is instrumented; the written model is not.

A site in a model-local function ran if a call of the function ran; a ``Scan`` body runs when its Scan does
(it is not probed). Sites in subgraphs inside functions, and sites of a model the engine cannot be given an
instrumented copy of (one staged to disk), cannot be tracked: they are reported as never run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper

from bnfold.onnx.graph.functions import function_scope

Site = tuple[str, str]  # (scope, label) as the fold's records give them
_PROBED = {"If": ("then_branch", "else_branch"), "Loop": ("body",)}


class Coverage:
    """The folded sites of a candidate, the probes that tell which of their scopes ran, and what the runs
    showed (:meth:`record`)."""

    def __init__(self, candidate: ModelProto, sites: Collection[Site]) -> None:
        self.sites = list(sites)
        self.needed = any(scope for scope, _ in self.sites)
        self.probe_names: list[str] = []
        self._probe_scopes: list[str] = []
        self._instrumented = False
        self.ran: set[str] = {""}
        self._callers: dict[str, set[str]] = {}
        self._scan_bodies: dict[str, str] = {}
        if self.needed:
            _walk_calls(candidate, self._callers, self._scan_bodies)

    def instrument(self, proto: ModelProto) -> None:
        """Add the probes to ``proto``, a copy made for the engine (edited in place)."""
        if not self.needed:
            return
        taken = set(_value_names(proto.graph))
        counter = itertools.count()

        def fresh() -> str:
            while (name := f"bnfold_ran_{next(counter)}") in taken:
                pass
            taken.add(name)
            return name

        probes = _instrument(proto.graph, "", fresh)
        for _, value in probes:
            proto.graph.output.append(helper.make_tensor_value_info(value, TensorProto.INT64, []))
        self.probe_names = [value for _, value in probes]
        self._probe_scopes = [scope for scope, _ in probes]
        self._instrumented = True

    def record(self, values: Sequence[object]) -> None:
        """Note the scopes that ran, from the probe outputs of one run (in ``probe_names`` order)."""
        for scope, value in zip(self._probe_scopes, values, strict=True):
            if np.any(np.asarray(value) > 0):
                self.ran.add(scope)

    def unexercised(self) -> list[str]:
        """The sites no run reached (or that could not be tracked), as ``scope/label``."""
        if not self.needed:
            return []
        return ["/".join(part for part in (scope, label) if part) for scope, label in self.sites
                if not self._reached(scope, set())]

    def untracked_note(self) -> str | None:
        """Why some sites listed as not run may have run, for the report's notes; None if all were tracked."""
        if not self.needed:
            return None
        if not self._instrumented and any(scope and scope not in self._callers for scope, _ in self.sites):
            return ("the folded model runs from a staged copy, which carries no probes: sites in subgraphs are "
                    "listed as not run")
        if any(scope.startswith("function:") and "/" in scope for scope, _ in self.sites):
            return "sites in subgraphs of functions are not probed: they are listed as not run"
        return None

    def _reached(self, scope: str, seen: set[str]) -> bool:
        if scope in self.ran:
            return True
        if scope in seen:
            return False
        seen.add(scope)
        if scope in self._scan_bodies:
            return self._reached(self._scan_bodies[scope], seen)
        if scope in self._callers:
            return any(self._reached(caller, seen) for caller in self._callers[scope])
        return False


def changed_subgraphs(original: ModelProto, candidate: ModelProto) -> list[Site]:
    """Where the caller names no folded site (``bnfold verify`` of two files): every If branch, Loop or Scan
    body and function of ``candidate`` that is not, byte for byte, the original's at the same scope, as a
    site with an empty label. A branch changed inside makes its enclosing ones differ too: each is listed,
    and each must run."""
    before = dict(_scoped_graphs(original))
    return [(scope, "") for scope, graph in _scoped_graphs(candidate)
            if scope and before.get(scope) != graph]


def _scoped_graphs(model: ModelProto) -> Iterator[tuple[str, bytes]]:
    def visit(graph: GraphProto, scope: str) -> Iterator[tuple[str, bytes]]:
        yield scope, graph.SerializeToString(deterministic=True)
        prefix = f"{scope}/" if scope else ""
        for node in graph.node:
            for attribute, subgraph in _named_subgraphs(node):
                yield from visit(subgraph, f"{prefix}{_label(node)}/{attribute}")

    yield from visit(model.graph, "")
    for function in model.functions:
        body = GraphProto()
        body.node.extend(function.node)
        yield from visit(body, function_scope(function))


def _label(node: object) -> str:
    name, op_type, outputs = node.name, node.op_type, node.output  # type: ignore[attr-defined]
    return name or f"{op_type}({outputs[0] if outputs else ''})"


def _named_subgraphs(node: object) -> Iterator[tuple[str, GraphProto]]:
    for attribute in node.attribute:  # type: ignore[attr-defined]
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{position}]", graph


def _instrument(graph: GraphProto, scope: str, fresh: Callable[[], str]) -> list[tuple[str, str]]:
    """Probe ``graph``'s If branches and Loop bodies, recursively: ``(scope, value)`` pairs, each value an
    int64 scalar of ``graph``, 1 where that scope ran."""
    probes: list[tuple[str, str]] = []
    prefix = f"{scope}/" if scope else ""
    for node in list(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _PROBED:
            continue
        bodies = dict(_named_subgraphs(node))
        inner = {}
        for attribute in _PROBED[node.op_type]:
            if attribute not in bodies:
                break
            inner_scope = f"{prefix}{_label(node)}/{attribute}"
            body = bodies[attribute]
            inner[attribute] = [(inner_scope, _constant(body, 1, fresh)), *_instrument(body, inner_scope, fresh)]
        else:
            if node.op_type == "If":
                probes.extend(_through_if(node, bodies, inner, fresh))
            else:
                probes.extend(_through_loop(graph, node, bodies["body"], inner["body"], fresh))
    return probes


def _through_if(node: object, bodies: dict[str, GraphProto], inner: dict[str, list[tuple[str, str]]],
                fresh: Callable[[], str]) -> list[tuple[str, str]]:
    """Each branch returns every probe of both: its own, and 0 for the other's."""
    every = inner["then_branch"] + inner["else_branch"]
    for attribute in ("then_branch", "else_branch"):
        branch, own = bodies[attribute], dict(inner[attribute])
        for probe_scope, _ in every:
            value = own.get(probe_scope) or _constant(branch, 0, fresh)
            branch.output.append(helper.make_tensor_value_info(value, TensorProto.INT64, []))
    outputs = []
    for probe_scope, _ in every:
        outputs.append((probe_scope, fresh()))
        node.output.append(outputs[-1][1])  # type: ignore[attr-defined]
    return outputs


def _through_loop(graph: GraphProto, node: object, body: GraphProto, inner: list[tuple[str, str]],
                  fresh: Callable[[], str]) -> list[tuple[str, str]]:
    """Each probe becomes a scan output of the Loop (one value per iteration, none without one), reduced to
    a scalar in ``graph``: the largest of its values and 0."""
    zero, flat = _constant(graph, 0, fresh, shape=[1]), _constant(graph, -1, fresh, shape=[1])
    outputs = []
    for probe_scope, value in inner:
        body.output.append(helper.make_tensor_value_info(value, TensorProto.INT64, []))
        per_iteration, flattened, joined, reduced = fresh(), fresh(), fresh(), fresh()
        node.output.append(per_iteration)  # type: ignore[attr-defined]
        # Flattened first: onnx.reference stacks scalar scan outputs as [iterations, 1], onnxruntime as
        # [iterations].
        graph.node.append(helper.make_node("Reshape", [per_iteration, flat], [flattened]))
        graph.node.append(helper.make_node("Concat", [flattened, zero], [joined], axis=0))
        graph.node.append(helper.make_node("ReduceMax", [joined], [reduced], keepdims=0))
        outputs.append((probe_scope, reduced))
    return outputs


def _constant(graph: GraphProto, value: int, fresh: Callable[[], str], shape: list[int] | None = None) -> str:
    name = fresh()
    tensor = helper.make_tensor(f"{name}_value", TensorProto.INT64, shape or [], [value])
    graph.node.append(helper.make_node("Constant", [], [name], value=tensor))
    return name


def _value_names(graph: GraphProto) -> Iterator[str]:
    yield from (value.name for value in (*graph.input, *graph.output, *graph.value_info))
    yield from (tensor.name for tensor in graph.initializer)
    for node in graph.node:
        yield from node.output
        for _, subgraph in _named_subgraphs(node):
            yield from _value_names(subgraph)


def _walk_calls(model: ModelProto, callers: dict[str, set[str]], scan_bodies: dict[str, str]) -> None:
    """Which scopes call each model-local function, and the scope holding each Scan body."""
    functions = {(function.domain, function.name, getattr(function, "overload", "")): function_scope(function)
                 for function in model.functions}

    def visit(graph: GraphProto, scope: str) -> None:
        prefix = f"{scope}/" if scope else ""
        for node in graph.node:
            called = functions.get((node.domain, node.op_type, getattr(node, "overload", "")))
            if called is not None:
                callers.setdefault(called, set()).add(scope)
            for attribute, subgraph in _named_subgraphs(node):
                inner = f"{prefix}{_label(node)}/{attribute}"
                if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
                    scan_bodies[inner] = scope
                visit(subgraph, inner)

    visit(model.graph, "")
    for function in model.functions:
        body = GraphProto()
        body.node.extend(function.node)
        visit(body, function_scope(function))
