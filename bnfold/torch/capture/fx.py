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
    """Keeps every BN and conv/linear (including subclasses defined outside torch.nn) as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_batchnorm(module) or is_layer(module) or super().is_leaf_module(module, qualified_name)


def trace(module: nn.Module) -> fx.Graph:
    return _LeafTracer().trace(module)


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
            if is_batchnorm(module) or is_layer(module):
                call_ids[node] = index.next_call_id()
                names[node] = name
                kinds[node] = "bn" if is_batchnorm(module) else "layer"
            else:
                for inner in module.modules():
                    if inner is not module and (is_batchnorm(inner) or is_layer(inner)):
                        referenced[index.name_of(inner)] = f"it is called inside {name}, outside the graph"
        elif node.op == "get_attr":
            owner = _owning_module(root, str(node.target))
            if owner is not None and (is_batchnorm(owner) or is_layer(owner)):
                referenced[index.name_of(owner)] = f"forward() reads {_join(prefix, str(node.target))} directly"
    ranks: dict[fx.Node, int | None] = {}
    calls = []
    for node, call_id in call_ids.items():
        source = _input_of(node)
        observed = observed_ranks.get(names[node], [])
        input_rank, output_rank = observed[0] if len(observed) == 1 else (None, None)
        if input_rank is None:
            input_rank = _static_rank(source, root, ranks)
        if output_rank is None:
            output_rank = _static_rank(node, root, ranks)
        calls.append(Call(
            id=call_id,
            module=names[node],
            kind=kinds[node],  # type: ignore[arg-type]
            source=call_ids.get(source) if isinstance(source, fx.Node) else None,
            consumers=[
                call_ids[user] if user in call_ids and _only_as_input(user, node) else None
                for user in node.users
            ],
            input_rank=input_rank,
            output_rank=output_rank,
        ))
    return Dataflow(calls, referenced)


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
            return _flatten_rank(node.args[1:], node.kwargs)
        if node.target in _RANK_KEEPING_FUNCTIONS:
            return rank_of(node.args[0])
        if node.target in _BROADCASTING:
            return _broadcast_rank([rank_of(a) if isinstance(a, fx.Node) else 0 for a in node.args[:2]])
        return None
    if node.op == "call_method":
        if node.target == "flatten":
            return _flatten_rank(node.args[1:], node.kwargs)
        if node.target in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                return len(sizes[0])
            return len(sizes) if sizes and all(not isinstance(s, (tuple, list)) for s in sizes) else None
        if node.target in _RANK_KEEPING_METHODS:
            return rank_of(node.args[0])
    return None


def _flatten_rank(args: tuple, kwargs: dict) -> int | None:
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    if isinstance(start, int) and start >= 0 and end == -1:
        return start + 1
    return None


def _broadcast_rank(ranks: list[int | None]) -> int | None:
    return None if any(r is None for r in ranks) else max(ranks)  # type: ignore[type-var]
