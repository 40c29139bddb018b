"""Reading an ONNX BatchNormalization node as an inference-time per-channel affine map."""

from __future__ import annotations

import onnx
from onnx import NodeProto

from bnfold.core.affine import ChannelAffine, FoldRefused
from bnfold.onnx.graph.index import GraphIndex
from bnfold.reasons import Reason

_KNOWN_ATTRIBUTES = {"epsilon", "momentum", "spatial", "training_mode", "is_test", "consumed_inputs"}
# Before opset 7 a BatchNormalization normalizes with the batch's statistics unless ``is_test`` is set.
_FIRST_OPSET_WITHOUT_IS_TEST = 7


def batchnorm_affine(node: NodeProto, index: GraphIndex) -> ChannelAffine:
    """The map ``node`` applies at inference, or ``FoldRefused`` saying why it cannot be trusted."""
    known = index.batchnorm_affines.get(id(node))
    if known is not None:
        return known
    affine = _read_batchnorm(node, index)
    index.batchnorm_affines[id(node)] = affine
    return affine


def _read_batchnorm(node: NodeProto, index: GraphIndex) -> ChannelAffine:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    unknown = sorted(set(attributes) - _KNOWN_ATTRIBUTES)
    if unknown:
        raise FoldRefused(Reason.UNSUPPORTED_ATTRIBUTE, f"unknown attribute(s) {', '.join(unknown)}")
    # ``consumed_inputs`` (opset 1) only marks the statistics a training step updates in place.
    if index.opset < _FIRST_OPSET_WITHOUT_IS_TEST and int(attributes.get("is_test", 0)) == 0:
        raise FoldRefused(Reason.TRAINING_MODE,
                          f"opset {index.opset} BatchNormalization without is_test=1 normalizes with batch statistics")
    if int(attributes.get("training_mode", 0)) != 0:
        raise FoldRefused(Reason.TRAINING_MODE, "training_mode=1: it normalizes with batch statistics")
    if any(node.output[1:]):
        raise FoldRefused(Reason.TRAINING_MODE, "it has running-statistics outputs, i.e. it runs in training mode")
    if int(attributes.get("spatial", 1)) != 1:
        raise FoldRefused(Reason.SPATIAL_0, "spatial=0: statistics are per activation, not per channel")
    if len(node.input) != 5 or not all(node.input):
        raise FoldRefused(Reason.MALFORMED, f"expected 5 inputs, found {len(node.input)}")
    x_type = index.value_type(node.input[0])
    if x_type is not None and x_type.rank is not None and x_type.rank < 2:
        raise FoldRefused(Reason.UNSUPPORTED_SHAPE, f"input has rank {x_type.rank}; the channel axis is 1")
    gamma, beta, mean, var = (index.constants.value(name) for name in node.input[1:])
    return ChannelAffine.from_batchnorm(gamma, beta, mean, var, float(attributes.get("epsilon", 1e-5)))
