"""What a TorchScript module's own graph says about it, where its class and attributes do not.

A traced module keeps only tensors: a traced batch norm's training flag and epsilon, a traced conv's stride,
padding and groups, and whether it has a bias at all, are constants of the one aten op its graph holds. A module
of any other class (timm's ``BatchNormAct2d``) can hold a batch norm too: its graph begins with an
``aten::batch_norm`` of its input on its own attributes, then does other work with the result.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from bnfold.core.affine import FoldRefused
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import LayerGeometry


def all_nodes(nodes: Any):
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from all_nodes(block.nodes())


def forward_graph(module: torch.jit.ScriptModule) -> Any:
    return module._c._get_method("forward").graph


class LeadingNorm(NamedTuple):
    """A batch norm a module's forward begins with: the node, and the positions of its arguments."""

    node: Any
    weight: int
    bias: int
    mean: int
    var: int
    training: int
    eps: int
    traced: bool
    """An ``aten::batch_norm`` as a trace records it, rather than scripted code's ``F.batch_norm`` call."""


_FUNCTIONAL = "__torch__.torch.nn.functional.batch_norm"


def leading_batch_norm(module: torch.jit.ScriptModule) -> LeadingNorm | None:
    """The batch norm a module's forward begins with: the only reader of its one input (rank checks aside),
    outside any branch, on attributes of the module nothing else in the graph reads. Whatever the module does
    with its result afterwards, the batch norm itself is a per-channel affine map of the module's input."""
    if "forward" not in module._c._method_names():
        return None
    graph = forward_graph(module)
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return None
    uses = [use for use in inputs[1].uses() if use.user.kind() != "aten::dim"]
    if len(uses) != 1 or uses[0].user.owningBlock() != graph.block():
        return None
    node, offset = uses[0].user, uses[0].offset
    if node.kind() == "aten::batch_norm" and offset == 0:
        norm = LeadingNorm(node, 1, 2, 3, 4, 5, 7, traced=True)
    elif node.kind() == "prim::CallFunction" and offset == 1 and str(node.inputsAt(0).type()) == _FUNCTIONAL:
        norm = LeadingNorm(node, 4, 5, 2, 3, 6, 8, traced=False)
    else:
        return None
    names = []
    for position in (norm.weight, norm.bias, norm.mean, norm.var):
        source = node.inputsAt(position).node()
        if source.kind() == "prim::GetAttr":
            if source.inputsAt(0) != inputs[0] or len(node.inputsAt(position).uses()) != 1:
                return None
            names.append(source.s("name"))
    reads = [
        n.s("name") for n in all_nodes(graph.nodes()) if n.kind() == "prim::GetAttr" and n.inputsAt(0) == inputs[0]
    ]
    if any(reads.count(name) != 1 for name in names):
        return None
    return norm


def sole_batch_norm(module: torch.jit.ScriptModule) -> LeadingNorm:
    """The one ``aten::batch_norm`` a traced BN's graph is, or a refusal."""
    if "forward" not in module._c._method_names():
        raise FoldRefused(Reason.NOT_CALLED, "the traced forward pass never calls it (it has no forward)")
    graph = forward_graph(module)
    norms = [n for n in all_nodes(graph.nodes()) if n.kind() == "aten::batch_norm"]
    if len(norms) != 1 or norms[0].output() != graph.return_node().inputsAt(0):
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its traced graph is not a single batch_norm")
    return LeadingNorm(norms[0], 1, 2, 3, 4, 5, 7, traced=True)


def asserted_rank(module: torch.jit.ScriptModule) -> int | None:
    """The input rank a module's forward insists on (``x.ndim == 4`` in a check that raises otherwise)."""
    graph = forward_graph(module)
    for use in list(graph.inputs())[1].uses():
        if use.user.kind() != "aten::dim" or use.user.owningBlock() != graph.block():  # a check that always runs
            continue
        for compare in use.user.output().uses():
            other = [v for v in compare.user.inputs() if v != use.user.output()]
            checked = compare.user.kind() == "aten::eq" and len(other) == 1 and isinstance(other[0].toIValue(), int)
            if checked and any(_raises_unless(u.user) and u.user.owningBlock() == graph.block()
                               for u in compare.user.output().uses()):
                return int(other[0].toIValue())
    return None


def _known_bool(module: torch.jit.ScriptModule, value: Any) -> bool | None:
    """A flag's value where the graph fixes it: a constant, the module's ``training``, or an ``if`` on those
    choosing between them (timm: ``bn_training = True if self.training else ...``); None otherwise."""
    producer = value.node()
    if producer.kind() == "prim::Constant":
        constant = value.toIValue()
        return constant if isinstance(constant, bool) else None
    if producer.kind() == "prim::GetAttr" and producer.s("name") == "training":
        return bool(module.training)
    if producer.kind() == "prim::If":
        condition = _known_bool(module, producer.inputsAt(0))
        if condition is None:
            return None
        block = list(producer.blocks())[0 if condition else 1]
        position = list(producer.outputs()).index(value)
        return _known_bool(module, block.returnNode().inputsAt(position))
    return None


def _raises_unless(check: Any) -> bool:
    """Whether ``check`` stops the forward when its condition is false: ``torch._assert``, or an ``if`` whose
    else branch raises."""
    if check.kind() == "aten::_assert":
        return True
    if check.kind() != "prim::If":
        return False
    otherwise = list(check.blocks())[1]
    return any(n.kind() == "prim::RaiseException" for n in otherwise.nodes())


def batch_norm_params(module: torch.jit.ScriptModule, norm: LeadingNorm) -> tuple[Any, Any, Any, Any, float]:
    """weight, bias, running mean and variance, epsilon of one batch norm on ``module``'s attributes."""
    node = norm.node
    trains = _known_bool(module, node.inputsAt(norm.training))
    if trains is not False:
        raise FoldRefused(Reason.TRAINING_MODE, "it normalizes with batch statistics (training mode)")
    eps = node.inputsAt(norm.eps).toIValue()
    tensors = []
    for position in (norm.weight, norm.bias, norm.mean, norm.var):
        source = node.inputsAt(position).node()
        if source.kind() == "prim::GetAttr":
            tensors.append(getattr(module, source.s("name")))
        elif node.inputsAt(position).toIValue() is None and position in (norm.weight, norm.bias):
            tensors.append(None)
        else:
            raise FoldRefused(Reason.NO_RUNNING_STATS, "its statistics are not attributes of the module")
    if any(t is None for t in tensors[2:]):
        raise FoldRefused(Reason.NO_RUNNING_STATS, "it has no running statistics")
    if not isinstance(eps, float):
        raise FoldRefused(Reason.NON_CONSTANT_PARAMS, "its epsilon is not a constant")
    return (*tensors, eps)


def remove_batch_norm(module: torch.jit.ScriptModule, norm: LeadingNorm) -> None:
    """The module's graph without its leading batch norm: the rest reads the module's input instead."""
    norm.node.output().replaceAllUsesWith(norm.node.inputsAt(0 if norm.traced else 1))
    norm.node.destroy()
    torch._C._jit_pass_dce(forward_graph(module))


_BIASED_OPS = {"aten::_convolution", "aten::linear"}


def biasless_op(module: torch.jit.ScriptModule) -> Any | None:
    """A traced layer without a bias: its graph's one convolution or linear op, whose bias input is None."""
    graph = forward_graph(module)
    ops = [n for n in all_nodes(graph.nodes()) if n.kind() in _BIASED_OPS]
    if len(ops) != 1 or ops[0].output() != graph.return_node().inputsAt(0):
        return None
    bias = ops[0].inputsAt(2)
    return ops[0] if bias.node().kind() == "prim::Constant" and bias.toIValue() is None else None


def give_bias(module: torch.jit.ScriptModule, bias: torch.Tensor) -> None:
    """Give a layer traced without a bias one: a new tensor attribute, read in its graph where the op took None.
    (The caller makes sure the layer's TorchScript class is its own.)"""
    node = biasless_op(module)
    if node is None:
        raise AssertionError("give_bias is only called for a layer whose geometry found its bias-less op")
    graph = forward_graph(module)
    module._c._register_attribute("bias", torch._C.TensorType.get(), bias)
    read = graph.create("prim::GetAttr", [next(iter(graph.inputs()))], 1)
    read.s_("name", "bias")
    read.output().setType(torch._C.TensorType.get())
    read.insertBefore(node)
    node.replaceInput(2, read.output())


def traced_geometry(module: torch.jit.ScriptModule, kind: str, spatial: int) -> LayerGeometry | FoldRefused:
    """A traced conv keeps no attributes: read stride/padding/groups from its one aten::_convolution."""
    graph = forward_graph(module)
    convolutions = [n for n in all_nodes(graph.nodes()) if n.kind() == "aten::_convolution"]
    if len(convolutions) != 1 or convolutions[0].output() != graph.return_node().inputsAt(0):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its traced graph is not a single convolution")
    node = convolutions[0]
    padding, transposed, groups = _constant(node.inputsAt(4)), node.inputsAt(6).toIValue(), node.inputsAt(8).toIValue()
    if padding is None or transposed != (kind == "convtranspose") or not isinstance(groups, int):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its traced convolution has non-constant arguments")
    weight = module.weight
    if kind == "conv":
        out_channels, in_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    else:
        in_channels, out_channels = int(weight.shape[0]), int(weight.shape[1]) * groups
    zero_padded = kind == "conv" and any(p > 0 for p in padding)
    return LayerGeometry(kind, spatial, groups, in_channels, out_channels, zero_padded)  # type: ignore[arg-type]


def _constant(value: Any) -> list[int] | None:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [v.toIValue() for v in node.inputs()]
        return items if all(isinstance(i, int) for i in items) else None
    constant = value.toIValue()
    return list(constant) if isinstance(constant, (list, tuple)) else None
