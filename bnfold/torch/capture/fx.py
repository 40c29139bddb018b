"""Dataflow from a torch.fx symbolic trace, with BN and linear layers kept as leaf calls."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.torch.capture.dataflow import Call, Dataflow
from bnfold.torch.fold.layers import is_batchnorm, is_layer
from bnfold.torch.modules import ModuleIndex

_RANK_KEEPING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Identity, nn.Softplus, nn.Mish,
)
_RANK_KEEPING_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.hardswish, F.dropout, torch.nn.functional.softplus,
}
_RANK_KEEPING_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "float", "to", "clone"}
_BROADCASTING = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}


class _LeafTracer(fx.Tracer):
    """Keeps every BN, BN-like module and conv/linear (including subclasses defined outside torch.nn) as one
    call."""

    def __init__(self, index: ModuleIndex | None) -> None:
        super().__init__()
        self.index = index

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        norm = self.index.is_norm(module) if self.index is not None else is_batchnorm(module)
        return norm or is_layer(module) or super().is_leaf_module(module, qualified_name)


def trace(module: nn.Module, index: ModuleIndex | None = None) -> fx.Graph:
    return _LeafTracer(index).trace(module)


def fx_dataflow(
    graph: fx.Graph,
    root: nn.Module,
    prefix: str,
    index: ModuleIndex,
    observed_ranks: dict[str, list[tuple[int | None, int | None]]],
) -> Dataflow:
    """Calls of ``graph`` (traced from ``root``, which sits at ``prefix`` in the model)."""
    call_ids: dict[fx.Node, int] = {}
    names: dict[fx.Node, str] = {}
    kinds: dict[fx.Node, str] = {}
    referenced: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            name = index.name_of(module)
            if index.is_norm(module) or is_layer(module):
                call_ids[node] = index.next_call_id()
                names[node] = name
                kinds[node] = "bn" if index.is_norm(module) else "layer"
            else:
                for inner in module.modules():
                    if inner is not module and (index.is_norm(inner) or is_layer(inner)):
                        referenced[index.name_of(inner)] = f"it is called inside {name}, outside the graph"
        elif node.op == "get_attr":
            owner = _owning_module(root, str(node.target))
            if owner is not None and (index.is_norm(owner) or is_layer(owner)):
                referenced[index.name_of(owner)] = f"forward() reads {_join(prefix, str(node.target))} directly"
    ranks: dict[fx.Node, int | None] = {}
    observed: dict[fx.Node, tuple[int | None, int | None]] = {}
    for node in call_ids:
        seen = observed_ranks.get(names[node], [])
        input_rank, output_rank = seen[0] if len(seen) == 1 else (None, None)
        if input_rank is None:
            input_rank = _static_rank(_input_of(node), root, ranks)
        if output_rank is None:
            output_rank = _static_rank(node, root, ranks)
        observed[node] = (input_rank, output_rank)
    # A BN reading a layer's output with its leading axes merged (and nothing else reading that flatten).
    flattened = {
        node: node.args[0] for node in call_ids
        if kinds[node] == "bn" and _merges_leading_axes(_input_of(node), call_ids, observed)
        and len(node.args[0].users) == 1  # type: ignore[union-attr]  # a flatten node, checked above
    }
    calls = []
    for node, call_id in call_ids.items():
        source = flattened[node].args[0] if node in flattened else _input_of(node)  # type: ignore[union-attr]
        calls.append(Call(
            id=call_id,
            module=names[node],
            kind=kinds[node],  # type: ignore[arg-type]
            source=call_ids.get(source) if isinstance(source, fx.Node) else None,
            consumers=[
                _consumer(user, node, call_ids, flattened) for user in node.users if not _reads_shape_only(user, node)
            ],
            input_rank=observed[node][0],
            output_rank=observed[node][1],
            flattened=node in flattened,
        ))
    return Dataflow(calls, referenced)


def _consumer(user: fx.Node, value: fx.Node, call_ids: dict[fx.Node, int], flattened: dict) -> int | None:
    """The call reading ``value`` as its data input, directly or as a BN through a flatten of its own."""
    if user in call_ids:
        return call_ids[user] if _only_as_input(user, value) else None
    reader = next(iter(user.users), None)
    if reader is not None and flattened.get(reader) is user:
        return call_ids[reader]
    return None


def _merges_leading_axes(
    value: object, call_ids: dict[fx.Node, int], observed: dict[fx.Node, tuple[int | None, int | None]]
) -> bool:
    """``value`` is ``layer_output.flatten(0, rank - 2)``: every axis but the last merged into one."""
    if not isinstance(value, fx.Node) or not _is_flatten(value) or value.args[0] not in call_ids:
        return False
    layer = value.args[0]
    start, end = _flatten_bounds(value)
    rank = observed[layer][1]  # type: ignore[index]  # in call_ids, so observed
    return start == 0 and (end == -2 or (rank is not None and rank >= 2 and end == rank - 2))


def _is_flatten(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "flatten") or (
        node.op == "call_function" and node.target is torch.flatten
    )


def _flatten_bounds(node: fx.Node) -> tuple[object, object]:
    args = node.args[1:]
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start, end


def _reads_shape_only(user: fx.Node, value: fx.Node) -> bool:
    """``user`` reads only ``value``'s shape, which a fold keeps (``y.reshape_as(value)``, ``value.size()``)."""
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return user.args[0] is not value and value not in user.args[2:] and value not in user.kwargs.values()
    if user.op == "call_method" and user.target in ("size", "dim"):
        return True
    return user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "ndim")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _owning_module(root: nn.Module, target: str) -> nn.Module | None:
    path = target.rpartition(".")[0]
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _input_of(node: fx.Node) -> object:
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _only_as_input(user: fx.Node, value: fx.Node) -> bool:
    """``user`` reads ``value`` only as its data input (not also as e.g. ``output_size``)."""
    others = list(user.args[1:]) + [v for k, v in user.kwargs.items() if k != "input"]
    return _input_of(user) is value and value not in others


def _static_rank(value: object, root: nn.Module, memo: dict[fx.Node, int | None]) -> int | None:
    """The rank of ``value`` where the graph alone proves it (flatten, view, rank-keeping ops)."""
    if not isinstance(value, fx.Node):
        return None
    if value not in memo:
        memo[value] = None
        memo[value] = _rank_rule(value, root, memo)
    return memo[value]


def _rank_rule(node: fx.Node, root: nn.Module, memo: dict[fx.Node, int | None]) -> int | None:
    def rank_of(arg: object) -> int | None:
        return _static_rank(arg, root, memo)

    if node.op == "call_module":
        module = root.get_submodule(node.target)  # type: ignore[arg-type]  # a call_module target is a name
        if is_batchnorm(module) or is_layer(module) or isinstance(module, _RANK_KEEPING_MODULES):
            return rank_of(_input_of(node))
        if isinstance(module, nn.Flatten) and module.end_dim == -1 and module.start_dim >= 0:
            return module.start_dim + 1
        return None
    if node.op == "call_function":
        if node.target in (torch.flatten,):
            return _flatten_rank(node)
        if node.target in _RANK_KEEPING_FUNCTIONS:
            return rank_of(node.args[0])
        if node.target in _BROADCASTING:
            return _broadcast_rank([rank_of(a) if isinstance(a, fx.Node) else 0 for a in node.args[:2]])
        return None
    if node.op == "call_method":
        if node.target == "flatten":
            return _flatten_rank(node)
        if node.target in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                return len(sizes[0])
            return len(sizes) if sizes and all(not isinstance(s, (tuple, list)) for s in sizes) else None
        if node.target in _RANK_KEEPING_METHODS:
            return rank_of(node.args[0])
    return None


def _flatten_rank(node: fx.Node) -> int | None:
    start, end = _flatten_bounds(node)
    if isinstance(start, int) and start >= 0 and end == -1:
        return start + 1
    return None


def _broadcast_rank(ranks: list[int | None]) -> int | None:
    return None if any(r is None for r in ranks) else max(ranks)  # type: ignore[type-var]
