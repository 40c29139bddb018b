"""What bnfold knows about torch.nn modules: which are BNs and layers, and their fold geometry."""

from __future__ import annotations

from typing import TypeGuard

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from bnfold.core.affine import ChannelAffine, FoldRefused, contract_shift, scale_weight
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import BnFacts, LayerGeometry
from bnfold.torch.fold.norms import Proofs, affine_forward, proven_output_is_bn
from bnfold.torch.fold.tensors import from_float64, optional_float64, to_float64

_CONV_CLASSES: dict[type[nn.Module], tuple[str, int]] = {
    nn.Conv1d: ("conv", 1), nn.Conv2d: ("conv", 2), nn.Conv3d: ("conv", 3),
    nn.ConvTranspose1d: ("convtranspose", 1), nn.ConvTranspose2d: ("convtranspose", 2),
    nn.ConvTranspose3d: ("convtranspose", 3),
}
_BN_RANKS: dict[type[nn.Module], frozenset[int]] = {
    nn.BatchNorm1d: frozenset({2, 3}), nn.BatchNorm2d: frozenset({4}), nn.BatchNorm3d: frozenset({5}),
}
_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def is_batchnorm(module: nn.Module) -> TypeGuard[_BatchNorm]:
    return isinstance(module, _BatchNorm)


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, (_ConvNd, nn.Linear))


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def bn_facts(module: _BatchNorm, proofs: Proofs | None = None) -> BnFacts:
    """What ``module`` computes; ``proofs`` shares the proofs of own forwards between the BNs of one model."""
    ranks = _pinned_ranks(module)
    try:
        affine = bn_affine(module)
        whole = type(module).forward in _BN_FORWARDS or proven_output_is_bn(module, {} if proofs is None else proofs)
        return BnFacts(affine, None, ranks, whole)
    except FoldRefused as refusal:
        return BnFacts(None, refusal, ranks)


def affine_facts(module: nn.Module) -> BnFacts:
    """A module other than a batch norm, proven (or not) to be a per-channel affine map with constant state."""
    try:
        affine, ranks = affine_forward(module)
        return BnFacts(affine, None, ranks)
    except FoldRefused as refusal:
        return BnFacts(None, refusal, None)


def uses_own_forward(module: nn.Module) -> bool:
    """A batch norm whose class runs a forward of its own (proven by :func:`bn_facts` before it folds)."""
    return is_batchnorm(module) and type(module).forward not in _BN_FORWARDS


def _pinned_ranks(module: _BatchNorm) -> frozenset[int] | None:
    for base, ranks in _BN_RANKS.items():
        if isinstance(module, base) and type(module)._check_input_dim is base._check_input_dim:  # type: ignore[attr-defined]
            return ranks
    return None


def bn_affine(module: _BatchNorm) -> ChannelAffine:
    if _hooks(module):
        raise FoldRefused(Reason.HOOKS, "it has forward hooks that would see its output")
    if module.training:
        raise FoldRefused(Reason.TRAINING_MODE, "it is in training mode (normalizes with batch statistics)")
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        raise FoldRefused(Reason.NO_RUNNING_STATS, "track_running_stats=False: it always uses batch statistics")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise FoldRefused(Reason.UNSUPPORTED_BN, "its lazy parameters are not initialized")
    return ChannelAffine.from_batchnorm(
        optional_float64(module.weight), optional_float64(module.bias),
        to_float64(module.running_mean), to_float64(module.running_var), module.eps,
    )


def layer_geometry(module: nn.Module) -> LayerGeometry | FoldRefused:
    """The layer's geometry, or why its weights must not be changed."""
    if isinstance(module, nn.Linear):
        base: type[nn.Module] = nn.Linear
        kind, spatial = "linear", 0
    else:
        base = next((cls for cls in _CONV_CLASSES if isinstance(module, cls)), None)  # type: ignore[assignment]
        if base is None:
            return FoldRefused(Reason.UNSUPPORTED_LAYER, f"{type(module).__name__} is not a supported layer")
        kind, spatial = _CONV_CLASSES[base]
        if kind == "conv" and type(module)._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
            return FoldRefused(Reason.UNSUPPORTED_LAYER, f"{type(module).__name__} overrides _conv_forward()")
    if type(module).forward is not base.forward:
        return FoldRefused(Reason.UNSUPPORTED_LAYER, f"{type(module).__name__} overrides forward()")
    if parametrize.is_parametrized(module):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its weight is parametrized (computed at call time)")
    if _hooks(module):
        return FoldRefused(Reason.HOOKS, "the layer has forward hooks that would see folded values")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        return FoldRefused(Reason.UNSUPPORTED_LAYER, "its lazy parameters are not initialized")
    if kind == "linear":
        return LayerGeometry("linear", 0, 1, module.in_features, module.out_features, False)  # type: ignore[arg-type]
    return LayerGeometry(
        kind, spatial, module.groups, module.in_channels, module.out_channels, _zero_padded(module),  # type: ignore[arg-type]
    )


def _zero_padded(conv: _ConvNd) -> bool:
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return any(p > 0 for p in conv.padding)  # type: ignore[operator]  # a tuple: "same"/"valid" returned above


def fold_arrays(
    weight: np.ndarray,
    bias: np.ndarray | None,
    geometry: LayerGeometry,
    before: ChannelAffine | None,
    after: ChannelAffine | None,
) -> tuple[np.ndarray, np.ndarray]:
    """New float64 ``(weight, bias)`` of a layer with ``before`` on its input and ``after`` on its output."""
    bias64 = np.zeros(geometry.out_channels) if bias is None else np.asarray(bias, dtype=np.float64)
    weight64 = np.asarray(weight, dtype=np.float64)
    if before is not None:
        axis, groups = geometry.input_axis
        if np.any(before.shift != 0):
            bias64 = bias64 + contract_shift(weight64, before.shift, axis, groups)
        weight64 = scale_weight(weight64, before.scale, axis, groups)
    if after is not None:
        axis, groups = geometry.output_axis
        weight64 = scale_weight(weight64, after.scale, axis, groups)
        bias64 = after.apply(bias64)
    return weight64, bias64


def fold_module_weights(
    module: nn.Module, geometry: LayerGeometry, before: ChannelAffine | None, after: ChannelAffine | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's folded ``(weight, bias)`` as tensors of its parameter dtype and device."""
    weight, bias = fold_arrays(
        to_float64(module.weight), optional_float64(module.bias), geometry, before, after  # type: ignore[arg-type]
    )
    return from_float64(weight, module.weight, "weight"), from_float64(bias, module.weight, "bias")  # type: ignore[arg-type]


def neutralise_batchnorm(module: _BatchNorm) -> None:
    """Make the batch-norm part of ``module``'s own forward the identity, exactly: ``(x - 0) / sqrt(1 + 0) * 1
    + 0`` is ``x`` in every dtype. The module keeps its class and the rest of its work (an activation)."""
    with torch.no_grad():
        module.running_mean.zero_()  # type: ignore[union-attr]  # proven present: the fold used them
        module.running_var.fill_(1)  # type: ignore[union-attr]
        if module.weight is not None:
            module.weight.fill_(1)
        if module.bias is not None:
            module.bias.zero_()
    module.eps = 0.0


def install_weights(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write folded values into the layer, keeping its parameter objects (and creating a bias)."""
    with torch.no_grad():
        module.weight.copy_(weight)  # type: ignore[operator]
        if module.bias is None:
            module.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
        else:
            module.bias.copy_(bias)  # type: ignore[operator]
