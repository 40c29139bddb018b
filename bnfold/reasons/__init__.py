"""Why a batch norm stays: every reason code a report can give, with its meaning, for both fronts.

A record's ``reason`` is a :class:`Reason`, a ``str`` whose value is the code in the JSON report. The
README's table is :func:`markdown_table` (``python -m bnfold.reasons`` prints it); a test keeps them equal.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """A reason code; ``meaning`` is its one-line explanation."""

    meaning: str

    def __new__(cls, code: str, meaning: str) -> Reason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    # The code itself wherever the member is printed, as enum.StrEnum (Python 3.11+ only) does.
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    # The batch norm itself
    TRAINING_MODE = "training_mode", "it normalizes with batch statistics (training mode), not running ones"
    NO_RUNNING_STATS = "no_running_stats", "it has no constant running statistics to fold (PyTorch)"
    SPATIAL_0 = "spatial_0", "`spatial=0`: its statistics are per activation, not per channel"
    UNSUPPORTED_OPSET = "unsupported_opset", (
        "at the model's opset the fold would need a node that behaves otherwise there (before opset 7, Mul and Add "
        "broadcast by attribute)")
    UNSUPPORTED_ATTRIBUTE = "unsupported_attribute", "the BatchNormalization has an attribute bnfold does not know"
    MALFORMED = "malformed", "the BatchNormalization does not have its five inputs"
    UNSUPPORTED_BN = "unsupported_bn", (
        "its computation is not a plain batch norm (PyTorch: forward() overridden, lazy, or traced to more)")
    HOOKS = "hooks", "a PyTorch forward hook on it or on the layer would see the folded values"
    # Its parameters
    NON_CONSTANT_PARAMS = "non_constant_params", "a parameter of it (or of a Mul/Add/Sub/Div run) is not a constant"
    OVERRIDABLE_PARAMS = "overridable_params", (
        "a parameter is an initializer that is also a graph input, so a caller may override it "
        "(`--allow-overridable`)")
    FUNCTION_ATTRIBUTE_REFERENCE = "function_attribute_reference", (
        "it is inside an ONNX function that takes attributes from each caller, so its values are not known")
    PARAM_SHAPE = "param_shape", "its parameters are not one value per channel"
    NON_FINITE_PARAMS = "non_finite_params", "a parameter, or the folded scale or shift, is NaN or infinite"
    NONPOSITIVE_VARIANCE = "nonpositive_variance", "`var + epsilon <= 0` in some channel"
    UNSUPPORTED_DTYPE = "unsupported_dtype", "a tensor the fold computes with is not floating point"
    # Mul/Add/Sub/Div runs by constants
    SCALE_NOT_PER_CHANNEL = "scale_not_per_channel", "a Mul or Div constant varies along another axis than the channels"
    BIAS_NOT_PER_CHANNEL = "bias_not_per_channel", "an Add or Sub constant varies along another axis than the channels"
    ZERO_DIVISOR = "zero_divisor", "a Div constant is 0 in some channel"
    NOT_AFFINE = "not_affine", "the constant is the dividend of a Div: the result is not affine in the input"
    # Its neighbours
    NO_LINEAR_NEIGHBOUR = "no_linear_neighbour", "neither the node before it nor the one after is a layer it folds into"
    INPUT_FAN_OUT = "input_fan_out", "its input has other readers, which would see the folded values"
    OUTPUT_FAN_OUT = "output_fan_out", "its output has other readers than the layer it would fold into"
    WORK_AFTER_BN = "work_after_bn", (
        "its PyTorch module does more after the batch norm (an activation), so only a layer before it could take it")
    INPUT_GRAPH_OUTPUT = "input_graph_output", "its input is a graph output, which a fold would change"
    OUTPUT_GRAPH_OUTPUT = "output_graph_output", "its output is a graph output, which a fold would remove"
    MODULE_REUSED = "module_reused", "the PyTorch module (it or its layer) is called or referenced elsewhere too"
    NOT_CALLED = "not_called", "the PyTorch forward pass never calls it"
    SHARED_CODE = "shared_code", "its PyTorch call site is shared with a batch norm that does not fold"
    CAPTURE_FAILED = "capture_failed", "no capture of the PyTorch forward pass (fx, export, tracing) saw it"
    # The layer it would fold into
    NON_CONSTANT_WEIGHT = "non_constant_weight", "the layer's weight or bias is not a constant"
    UNSUPPORTED_LAYER = "unsupported_layer", (
        "the PyTorch layer computes something else than its class (forward overridden, parametrized, lazy)")
    DTYPE_MISMATCH = "dtype_mismatch", "the layer's bias has another dtype than its weight"
    UNSUPPORTED_SHAPE = "unsupported_shape", "a tensor or attribute of the layer has a shape the fold does not handle"
    UNKNOWN_SHAPE = "unknown_shape", "a shape or rank the fold depends on is unknown (PyTorch: pass example inputs)"
    CHANNEL_MISMATCH = "channel_mismatch", "its channel count differs from the layer's"
    CHANNEL_AXIS = "channel_axis", "the layer's channels are not on axis 1, the axis it normalizes"
    RESHAPE_MIXES_CHANNELS = "reshape_mixes_channels", (
        "a Reshape or Flatten between them does not keep each channel one contiguous block of features")
    UNSUPPORTED_LAYOUT = "unsupported_layout", "the layer groups its channels on an axis the fold does not handle"
    MATMUL_RANK = "matmul_rank", "the MatMul's weight is batched, or its ranks leave the features off the channel axis"
    GEMM_TRANS_A = "gemm_trans_a", "the Gemm after it transposes its input, so rows, not features, are its channels"
    PADDING = "padding", "the layer after it zero-pads its input, which its shift, moved into the bias, would not reach"
    UNEVEN_TAPS = "uneven_taps", (
        "the ConvTranspose after it gives output positions different numbers of taps: a shift reaches them unevenly")
    # Merging parallel or serial linear layers (structural re-parameterization)
    BRANCH_GEOMETRY = "branch_geometry", (
        "the parallel branches differ in stride or dilation, or their taps do not align under their paddings")
    POOL_BORDER = "pool_border", (
        "the AveragePool divides border windows by fewer taps (count_include_pad=0 with padding, or ceil_mode)")
    MERGE_COSTLIER = "merge_costlier", "the merged layer would compute more than the layers it replaces"
    CAST_OVERFLOW = "cast_overflow", "a folded value overflows the weight's dtype"
    # Options and the guard
    PATTERN_DISABLED = "pattern_disabled", "the pattern that would fold it is disabled (`--only`, `--skip`)"
    GUARD_REJECTED = "guard_rejected", "the fold failed or gave an invalid model (a bnfold bug: please report it)"


def markdown_table() -> str:
    """The README's table of every reason code and its meaning."""
    rows = [f"| `{reason.value}` | {reason.meaning} |" for reason in Reason]
    return "\n".join(["| reason | why the batch norm stays |", "|---|---|", *rows])
