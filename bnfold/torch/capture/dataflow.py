"""A capture-independent view of a model's dataflow between BN and linear-layer call sites.

torch.fx, torch.export and TorchScript captures are all reduced to this, so the fold rules in
:mod:`bnfold.torch.fold.plan` are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bnfold.core.affine import ChannelAffine, FoldRefused

CallKind = Literal["bn", "layer"]
LayerKind = Literal["conv", "convtranspose", "linear"]


@dataclass(frozen=True)
class LayerGeometry:
    """Where a linear layer's channels live in its weight ``[axis0, axis1, kernel...]``."""

    kind: LayerKind
    spatial: int
    groups: int
    in_channels: int
    out_channels: int
    zero_padded: bool

    @property
    def batched_rank(self) -> int:
        """Rank of the input and output tensors when the layer's channel axis is axis 1."""
        return self.spatial + 2

    @property
    def output_axis(self) -> tuple[int, int]:
        """``(weight axis, groups)`` for :func:`bnfold.core.affine.scale_weight` on the output side."""
        return (1, self.groups) if self.kind == "convtranspose" else (0, 1)

    @property
    def input_axis(self) -> tuple[int, int]:
        """``(weight axis, groups)`` on the input side."""
        if self.kind == "convtranspose":
            return (0, 1)
        return (1, self.groups) if self.kind == "conv" else (1, 1)

    @property
    def pattern_name(self) -> str:
        return self.kind


@dataclass(frozen=True)
class BnFacts:
    """What a BN module computes at inference, or why it cannot be folded at all."""

    affine: ChannelAffine | None
    refusal: FoldRefused | None
    ranks: frozenset[int] | None
    """Input ranks the BN accepts, when its class pins them (``None``: any rank)."""
    output_is_bn: bool = True
    """The module returns the batch norm's output; ``False`` when more work follows (an activation), so
    only the layer before it can take the fold."""


@dataclass
class Call:
    """One call site of a BN or layer module in a captured graph.

    ``source`` is the call producing this call's input tensor (``None`` when it is not a BN or
    layer call). ``consumers`` has one entry per user of this call's output: the id of a BN or
    layer call taking it as its input, or ``None`` for any other use.
    """

    id: int
    module: str
    kind: CallKind
    source: int | None
    consumers: list[int | None] = field(default_factory=list)
    input_rank: int | None = None
    output_rank: int | None = None
    link: object | None = None
    """Calls sharing a ``link`` are one rewrite site (e.g. a TorchScript graph shared by instances)."""
    flattened: bool = False
    """A BN whose input is ``source``'s output with every axis but the last merged into one (levit's
    ``bn(linear(x).flatten(0, 1))``): its channels are the source's last axis, and its input rank is 2."""


@dataclass
class Dataflow:
    calls: list[Call]
    referenced: dict[str, str] = field(default_factory=dict)
    """Modules used outside plain call sites (parameters read, opaque callers), with a message."""
