"""Standalone batch norms: with no linear layer to fold into, a BN (with the per-channel nodes after it)
becomes one ``Mul`` and one ``Add`` with precomputed per-channel constants, the inference-time linear
transform of Ioffe & Szegedy, so runtimes without a BatchNormalization kernel can run the model.

Opt-in (``standalone="mul-add"``): the driver tries it last, only for what nothing else folds."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.affine import FoldRefused
from bnfold.onnx_front.batchnorm import batchnorm_affine
from bnfold.patterns.base import FLOAT_TYPES, Elementwise, Rewrite, Site
from bnfold.patterns.layers import tensor_rank
from bnfold.patterns.runs import ChannelSpace, is_batchnorm, links_from, read_run

STANDALONE_MODES = ("mul-add",)


class StandaloneMulAdd:
    name = "standalone-mul-add"
    opt_in = True

    def plan(self, site: Site) -> Rewrite | None:
        bn, index = site.anchor, site.index
        if not is_batchnorm(bn):
            return None
        value_type = index.value_type(bn.input[0])
        if value_type is None or value_type.elem_type not in FLOAT_TYPES:
            raise FoldRefused("unsupported_dtype", f"the input of {index.node_label(bn)} has no known float type")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_type.elem_type))
        rank = tensor_rank(index, bn.input[0], "the BN input")
        space = ChannelSpace(1, rank, batchnorm_affine(bn, index).channels)
        run = read_run(links_from(bn, index, site.chains), index, space, required=1)
        shape = space.constant_shape()
        return Rewrite(
            self.name,
            run,
            None,
            [],
            replacement=[
                Elementwise("Mul", run.affine.scale.reshape(shape), dtype, "scale"),
                Elementwise("Add", run.affine.shift.reshape(shape), dtype, "shift"),
            ],
        )
