"""Standalone batch norms: with no linear layer to fold into, a BN (with the per-channel nodes after it)
becomes its inference-time linear transform of Ioffe & Szegedy with precomputed per-channel constants, so
runtimes without a BatchNormalization kernel can run the model. Two forms, both opt-in, tried last and only
for what nothing else folds:

- ``mul-add``: one ``Mul`` and one ``Add``, any rank and dtype. For runtimes without a BatchNormalization
  kernel: under onnxruntime it is no faster than the BN it replaces, whose kernel makes one pass over the
  tensor where Mul and Add make two (``bench``: within noise to 1% slower at basic optimizations).
- ``conv``: one depthwise ``Conv`` with a 1x...x1 kernel where the tensor has spatial axes and the dtype is
  float32 or float16 (the Conv kernels runtimes have); otherwise ``Mul`` and ``Add``. Under onnxruntime's
  default ``ORT_ENABLE_ALL`` the Conv stays in the blocked NCHWc layout a BatchNormalization gets, where a
  Mul and an Add fall out of it: it is faster than ``mul-add``, but not than the BN left in place (a
  DenseNet-121 with 62 such BNs: 138 ms, against 186 ms for ``mul-add`` and 146 ms for the BNs, at 1
  thread; 300 / 370 / 286 ms at 2; the README has the setting).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.core.affine import FoldRefused
from bnfold.onnx.fold.batchnorm import batchnorm_affine
from bnfold.onnx.fold.patterns.base import FLOAT_TYPES, DepthwiseConv, Elementwise, Replacement, Rewrite, Site
from bnfold.onnx.fold.patterns.layers import tensor_rank
from bnfold.onnx.fold.patterns.runs import AffineRun, ChannelSpace, is_batchnorm, links_from, read_run
from bnfold.reasons import Reason

# Element types whose depthwise Conv onnxruntime's CPU provider (like most runtimes) can run.
_CONV_TYPES = {np.dtype(np.float32), np.dtype(np.float16)}


class _Standalone:
    name: str

    def plan(self, site: Site) -> Rewrite | None:
        bn, index = site.anchor, site.index
        if not is_batchnorm(bn):
            return None
        value_type = index.value_type(bn.input[0])
        if value_type is None or value_type.elem_type not in FLOAT_TYPES:
            raise FoldRefused(Reason.UNSUPPORTED_DTYPE, f"the input of {index.node_label(bn)} has no known float type")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_type.elem_type))
        rank = tensor_rank(index, bn.input[0], "the BN input")
        space = ChannelSpace(1, rank, batchnorm_affine(bn, index).channels)
        run = read_run(links_from(bn, index, site.chains), index, space, required=1)
        replacement = self.replacement(run, space, dtype)
        return Rewrite(self.name, run, None, [], replacement=replacement)

    def replacement(self, run: AffineRun, space: ChannelSpace, dtype: np.dtype) -> list[Replacement]:
        shape = space.constant_shape()
        return [
            Elementwise("Mul", run.affine.scale.reshape(shape), dtype, "scale"),
            Elementwise("Add", run.affine.shift.reshape(shape), dtype, "shift"),
        ]


class StandaloneMulAdd(_Standalone):
    name = "standalone-mul-add"


class StandaloneConv(_Standalone):
    name = "standalone-conv"

    def replacement(self, run: AffineRun, space: ChannelSpace, dtype: np.dtype) -> list[Replacement]:
        if space.rank < 3 or dtype not in _CONV_TYPES:
            return super().replacement(run, space, dtype)
        return [DepthwiseConv(run.affine.scale, run.affine.shift, space.rank - 2, dtype)]


# ``--standalone MODE`` -> the pattern that rewrites standalone batch norms that way.
STANDALONE_PATTERNS = {"mul-add": StandaloneMulAdd(), "conv": StandaloneConv()}
STANDALONE_MODES = tuple(STANDALONE_PATTERNS)
