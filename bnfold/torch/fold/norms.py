"""What a norm-like module's own forward computes, proven from its torch.fx trace, never from its class name.

Two forms fold:

* a batch-norm subclass whose forward is ``F.batch_norm(input, own running stats, own weight and bias,
  training=False, own eps)`` followed by work that reads neither the input's values nor the batch norm's
  tensors (timm's ``BatchNormAct2d``: dropout, then an activation). Only the batch-norm part folds, into
  the layer before it; the module stays and keeps the rest of its work.
* a leaf module with constant state whose forward is ``input * scale + shift``, both computed from its own
  buffers and parameters alone and varying only along axis 1 (torchvision's ``FrozenBatchNorm2d``).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.reasons import Reason
from bnfold.torch.fold.tensors import to_float64

_BN_STATE = ("running_mean", "running_var", "weight", "bias")
# Reading only these of the input leaves its values out of the result: checks such as timm's
# ``_assert(x.ndim == 4)`` stay true when the input becomes the folded batch norm's output.
_SHAPE_ATTRIBUTES = {"ndim", "shape", "dtype", "device"}
_SHAPE_METHODS = {"dim", "size"}
# Ops the constant part of an affine module may use: deterministic functions of their operands.
_CONSTANT_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.rsqrt, torch.sqrt, torch.reciprocal,
}
_CONSTANT_METHODS = {
    "reshape", "view", "rsqrt", "sqrt", "reciprocal", "unsqueeze", "squeeze", "flatten", "add", "sub", "mul", "div",
}
_AFFINE_STEPS = {
    operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul",
    operator.add: "Add", torch.add: "Add", "add": "Add",
    operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub",
    operator.truediv: "Div", torch.div: "Div", "div": "Div",
}


def _trace(module: nn.Module, what: str) -> fx.Graph:
    try:
        return fx.Tracer().trace(module)
    except Exception as error:
        raise FoldRefused(
            Reason.UNSUPPORTED_BN, f"its forward() cannot be traced to prove {what} ({type(error).__name__})"
        ) from error


def _single_input(graph: fx.Graph) -> fx.Node:
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise FoldRefused(Reason.UNSUPPORTED_BN, f"its forward() takes {len(placeholders)} inputs, not one")
    return placeholders[0]


def _shape_only(user: fx.Node, value: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is value and user.args[1] in _SHAPE_ATTRIBUTES
    return user.op == "call_method" and user.target in _SHAPE_METHODS and value not in user.args[1:]


_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_PLAIN = (bool, int, float, str, type(None))
Proofs = dict[tuple, "bool | FoldRefused"]
"""Proofs of :func:`batchnorm_forward_output_is_bn` already made in one fold, by :func:`proof_key`."""


def proof_key(module: nn.Module) -> tuple | None:
    """Everything the trace of ``module.forward`` depends on, when that is all it holds: its class and forward,
    its plain attribute values (flags, eps), which tensors it has, and its children's classes (leaves of the
    trace); ``None`` when it holds anything else, so its proof is made afresh."""
    values = []
    for name, value in vars(module).items():
        if name in _MODULE_INTERNALS and name != "training":
            continue
        if not isinstance(value, _PLAIN):
            return None
        values.append((name, value))
    children = []
    for name, child in module._modules.items():
        if child is None or child._modules or not type(child).__module__.startswith("torch.nn."):
            return None
        children.append((name, type(child), child.training))
    tensors = [(name, t is None) for name, t in [*module._parameters.items(), *module._buffers.items()]]
    return type(module), type(module).forward, tuple(values), tuple(children), tuple(tensors)


def proven_output_is_bn(module: nn.Module, proofs: Proofs) -> bool:
    """:func:`batchnorm_forward_output_is_bn`, traced once per kind of module in a fold."""
    key = proof_key(module)
    if key is None:
        return batchnorm_forward_output_is_bn(module)
    if key not in proofs:
        try:
            proofs[key] = batchnorm_forward_output_is_bn(module)
        except FoldRefused as refusal:
            proofs[key] = refusal
    proof = proofs[key]
    if isinstance(proof, FoldRefused):
        raise FoldRefused(proof.code, proof.message)
    return proof


def batchnorm_forward_output_is_bn(module: nn.Module) -> bool:
    """Prove ``module.forward`` starts with its own eval-mode batch norm of its input; tell whether its output
    is that batch norm's output (else more work follows). Raises :class:`FoldRefused` when it cannot be proven."""
    graph = _trace(module, "that it is a batch norm")
    data = _single_input(graph)
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    if len(calls) != 1:
        raise FoldRefused(Reason.UNSUPPORTED_BN, f"its forward() runs {len(calls)} batch norms, not one")
    bn = calls[0]
    normalized = normalize_function(bn.target, tuple(bn.args), dict(bn.kwargs), normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() calls batch_norm with arguments bnfold cannot read")
    arguments = normalized.kwargs
    if arguments["input"] is not data:
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() normalizes something other than its input")
    if arguments.get("training") is not False:
        raise FoldRefused(Reason.TRAINING_MODE, "its forward() normalizes with batch statistics")
    if arguments.get("eps") != module.eps:
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() passes another eps than the module's own")
    for name in _BN_STATE:
        argument = arguments.get(name)
        own = getattr(module, name, None)
        passes_own = argument is None if own is None else _is_attribute(argument, name)
        if not passes_own:
            raise FoldRefused(Reason.UNSUPPORTED_BN, f"its forward() does not pass its own {name} to batch_norm")
        if isinstance(argument, fx.Node) and set(argument.users) != {bn}:
            raise FoldRefused(Reason.UNSUPPORTED_BN, f"its forward() reads its {name} outside the batch norm")
    if any(user is not bn and not _shape_only(user, data) for user in data.users):
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() reads its input other than through the batch norm")
    if any(n.op == "get_attr" and n.target in _BN_STATE and n not in arguments.values() for n in graph.nodes):
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() reads the batch norm's tensors elsewhere")
    return _output_value(graph, module) is bn


def _is_attribute(argument: object, name: str) -> bool:
    return isinstance(argument, fx.Node) and argument.op == "get_attr" and argument.target == name


def _output_value(graph: fx.Graph, root: nn.Module) -> object:
    """What the graph returns, seen through eval-mode dropouts and identities."""
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    while isinstance(output, fx.Node) and output.op == "call_module" and len(output.args) == 1:
        module = root.get_submodule(str(output.target))
        if not (isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)):
            break
        output = output.args[0]
    return output


def is_affine_candidate(module: nn.Module) -> bool:
    """A leaf module with state of its own: worth tracing to see whether it is a per-channel affine map."""
    if module._modules or module._forward_hooks or module._forward_pre_hooks:
        return False
    state = list(module._buffers.values()) + list(module._parameters.values())
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in state)


def looks_like_batchnorm(module: nn.Module) -> bool:
    """Has batch-norm statistics: reported even when its forward cannot be proven affine."""
    return {"running_mean", "running_var"} <= module._buffers.keys()


def affine_forward(module: nn.Module) -> tuple[ChannelAffine, frozenset[int] | None]:
    """``(map, input ranks)`` of a module proven to compute ``input * scale + shift`` per channel on axis 1."""
    graph = _trace(module, "that it is a per-channel affine map")
    data = _single_input(graph)
    steps: list[tuple[str, fx.Node | float, bool]] = []
    current = data
    output = next(node for node in graph.nodes if node.op == "output")
    while current is not output.args[0]:
        if len(current.users) != 1:
            raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() reads its input other than through one affine map")
        step = next(iter(current.users))
        kind = _AFFINE_STEPS.get(step.target) if step.op in ("call_function", "call_method") else None
        if kind is None or len(step.args) != 2 or step.kwargs or step.args.count(current) != 1:
            raise FoldRefused(Reason.UNSUPPORTED_BN, f"its forward() applies {step.target} to its input")
        constant = step.args[1] if step.args[0] is current else step.args[0]
        steps.append((kind, constant, step.args[0] is not current))  # type: ignore[arg-type]
        current = step
    if not steps:
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its forward() returns its input unchanged")
    values = _ConstantValues(graph, module, data)
    vectors = [(kind, values.of(constant), first) for kind, constant, first in steps]
    channels, ranks = _channel_layout([array for _, array, _ in vectors])
    affine = ChannelAffine.identity(channels)
    for kind, array, first in vectors:
        vector = np.broadcast_to(array.reshape(-1), (channels,)) if array.size in (1, channels) else array
        affine = affine.then(ChannelAffine.from_elementwise(kind, np.ascontiguousarray(vector), first))
    return affine, ranks


def _channel_layout(arrays: list[np.ndarray]) -> tuple[int, frozenset[int] | None]:
    """Channel count and the one input rank that puts every constant's varying axis on axis 1."""
    channels, rank = 1, None
    for array in arrays:
        varying = [axis for axis, size in enumerate(array.shape) if size != 1]
        if not varying:
            continue
        if len(varying) > 1:
            raise FoldRefused(Reason.PARAM_SHAPE, f"a constant of shape {tuple(array.shape)} varies on several axes")
        axis = varying[0]
        wanted = array.ndim - axis + 1  # the input rank that aligns this axis with axis 1
        if wanted < array.ndim or (rank is not None and wanted != rank) or channels not in (1, array.shape[axis]):
            raise FoldRefused(
                Reason.SCALE_NOT_PER_CHANNEL, f"a constant of shape {tuple(array.shape)} is not per channel"
            )
        rank, channels = wanted, int(array.shape[axis])
    if rank is None:
        raise FoldRefused(Reason.PARAM_SHAPE, "its constants are scalars: no channel count to fold")
    if any(array.ndim > rank for array in arrays):
        raise FoldRefused(Reason.PARAM_SHAPE, "a constant has a higher rank than the input")
    return channels, frozenset({rank})


class _ConstantValues:
    """float64 values of graph nodes computed from the module's own tensors and Python numbers alone."""

    def __init__(self, graph: fx.Graph, module: nn.Module, data: fx.Node) -> None:
        self.module = module
        self.data = data
        self.memo: dict[fx.Node, Any] = {}

    def of(self, value: object) -> np.ndarray:
        result = self._value(value)
        if isinstance(result, torch.Tensor):
            return result.detach().numpy()
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            return np.array(float(result))
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, "its forward() combines its input with a non-tensor")

    def _value(self, value: object) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(self._value(v) for v in value)
        if not isinstance(value, fx.Node):
            return value
        if value not in self.memo:
            self.memo[value] = self._compute(value)
        return self.memo[value]

    def _compute(self, node: fx.Node) -> Any:
        if node is self.data or node.op == "placeholder":
            raise FoldRefused(Reason.NON_CONSTANT_PARAMS, "a scale or shift depends on the input")
        if node.op == "get_attr":
            tensor = getattr(self.module, str(node.target), None)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"{node.target} is not a floating-point tensor")
            return torch.from_numpy(to_float64(tensor))
        args = self._value(node.args)
        kwargs = {key: self._value(v) for key, v in node.kwargs.items()}
        if node.op == "call_function" and node.target in _CONSTANT_FUNCTIONS:
            return node.target(*args, **kwargs)
        if node.op == "call_method" and node.target in _CONSTANT_METHODS and isinstance(args[0], torch.Tensor):
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, f"a scale or shift is computed by {node.target}")
