"""Backward folds (BN right before Conv / ConvTranspose / Gemm / MatMul): exact, or left with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, conv_forms, count_ops, node_kinds, random_feeds, run


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def only_record(result):
    (record,) = result.report.records
    return record


def bn_conv_model(spatial: int = 2, groups: int = 1, c_in: int = 4, c_out: int = 6, kernel: int = 3,
                  stride: int = 1, dilation: int = 1, pads: int = 0, bias: bool = True, seed: int = 0,
                  auto_pad: str | None = None, size: int = 7) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = g.input("x", [2, c_in] + [size] * spatial)
    inputs = [g.bn(g.node("Relu", [x]), c_in), g.weight([c_out, c_in // groups] + [kernel] * spatial)]
    if bias:
        inputs.append(g.weight([c_out]))
    attributes = {"auto_pad": auto_pad} if auto_pad else {"pads": [pads] * (2 * spatial)}
    y = g.node("Conv", inputs, group=groups, strides=[stride] * spatial, dilations=[dilation] * spatial,
               name="conv", **attributes)
    return g.model([y])


@pytest.mark.parametrize("auto_pad", [None, "VALID"])
@pytest.mark.parametrize(("groups", "c_in", "c_out"), [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["plain", "grouped", "depthwise", "channel-multiplier"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv_without_padding_folds_scale_and_shift(auto_pad, groups, c_in, c_out, bias):
    model = bn_conv_model(groups=groups, c_in=c_in, c_out=c_out, bias=bias, auto_pad=auto_pad, stride=2)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert count_ops(result.model, "Add") == 0, "the whole shift moved into the conv bias"
    record = only_record(result)
    assert (record.pattern, record.into) == ("bn-conv", "conv")
    assert_equivalent(model, result.model)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=conv_forms(), pads=st.integers(0, 2))
def test_bn_conv_fold_is_exact_for_random_attributes(form, pads):
    model = bn_conv_model(**form, pads=pads)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert node_kinds(result.model).count("Shift") == (1 if pads else 0)
    assert_equivalent(model, result.model, seed=form["seed"])


def _border(output: np.ndarray) -> np.ndarray:
    mask = np.zeros(output.shape[2:], dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return output[..., mask]


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}])
def test_bn_conv_with_zero_padding_keeps_the_shift_before_the_conv_exact_at_the_borders(padding):
    g = GraphBuilder(3)
    x = g.input("x", [1, 3, 6, 6])
    gamma, _, mean, var = g.bn_params(3)
    beta = g.const(np.array([4.0, -3.0, 5.0]))  # a large shift, so a border error could not hide
    bn = g.node("BatchNormalization", [x, gamma, beta, mean, var])
    model = g.model([g.node("Conv", [bn, g.weight([5, 3, 3, 3]), g.weight([5])], **padding)])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert node_kinds(result.model) == ["Shift", "Conv"]
    record = only_record(result)
    assert record.pattern == "bn-conv" and "shift stays before it" in record.message
    assert_equivalent(model, result.model)
    feeds = random_feeds(model)
    np.testing.assert_allclose(_border(run(result.model, feeds)[0]), _border(run(model, feeds)[0]), rtol=1e-5,
                               atol=1e-5)
    assert fold(result.model).model.SerializeToString() == result.model.SerializeToString()


def test_moving_the_shift_into_the_bias_would_be_wrong_at_the_borders():
    # The control for the test above: the naive fold differs at the borders, and only there.
    model = bn_conv_model(pads=1, c_out=5)
    unpadded = bn_conv_model(pads=0, c_out=5)
    naive = fold(unpadded).model
    next(a for a in naive.graph.node[-1].attribute if a.name == "pads").ints[:] = [1, 1, 1, 1]
    naive.graph.output[0].type.tensor_type.ClearField("shape")
    feeds = random_feeds(model)
    want, got = run(model, feeds)[0], run(naive, feeds)[0]
    assert not np.allclose(_border(got), _border(want), rtol=1e-3)
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)


def test_bn_conv_with_padding_and_a_zero_scale_is_left():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    _, beta, mean, var = g.bn_params(3)
    gamma = g.const(np.array([1.0, 0.0, -0.5]))
    bn = g.node("BatchNormalization", [g.node("Relu", [x]), gamma, beta, mean, var], name="bn")
    model = g.model([g.node("Conv", [bn, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1])])
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "padding")
    assert "channel 1 has scale 0" in record.message


def test_bn_without_shift_folds_into_a_padded_conv_completely():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    gamma, _, _, var = g.bn_params(3)
    zeros = [g.const(np.zeros(3)), g.const(np.zeros(3))]
    bn = g.node("BatchNormalization", [x, gamma, zeros[0], zeros[1], var])
    model = g.model([g.node("Conv", [bn, g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1])])
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert_equivalent(model, result.model)


def test_forward_fold_is_preferred_when_both_neighbours_are_layers():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    first = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="first")
    model = g.model([g.node("Conv", [g.bn(first, 4), g.weight([5, 4, 1, 1])], name="second")])
    record = only_record(fold(model))
    assert (record.pattern, record.into) == ("conv-bn", "first")


def test_backward_fold_takes_over_when_the_forward_one_is_unsafe():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    first = g.node("Conv", [x, g.weight([4, 3, 3, 3])], name="first")
    second = g.node("Conv", [g.bn(first, 4), g.weight([5, 4, 1, 1])], name="second")
    model = g.model([second, g.node("Relu", [first])])
    result = fold(model)
    record = only_record(result)
    assert (record.pattern, record.into) == ("bn-conv", "second")
    assert_equivalent(model, result.model)


def test_bn_output_with_two_readers_is_left():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    bn = g.bn(g.node("Relu", [x]), 3)
    model = g.model([g.node("Conv", [bn, g.weight([4, 3, 1, 1])]), g.node("Sigmoid", [bn])])
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "output_fan_out")


def test_bn_output_that_is_a_graph_output_is_left():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    bn = g.bn(g.node("Relu", [x]), 3)
    model = g.model([g.node("Conv", [bn, g.weight([4, 3, 1, 1])]), bn])
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "output_graph_output")


def test_shared_conv_weight_is_cloned_for_a_backward_fold():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    weight = g.weight([4, 3, 1, 1], name="shared_w")
    model = g.model([g.node("Conv", [g.bn(g.node("Relu", [x]), 3), weight]), g.node("Conv", [x, weight])])
    result = fold(model)
    assert count_ops(result.model) == 0
    original = {t.name: t for t in model.graph.initializer}["shared_w"]
    assert {t.name: t for t in result.model.graph.initializer}["shared_w"] == original
    assert_equivalent(model, result.model)


def bn_convtranspose_model(groups: int, c_in: int, c_out: int, kernel: int, stride: int, pads: int = 0,
                           seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = g.input("x", [1, c_in, 5, 5])
    bn = g.bn(g.node("Relu", [x]), c_in)
    y = g.node("ConvTranspose", [bn, g.weight([c_in, c_out // groups, kernel, kernel]), g.weight([c_out])],
               group=groups, strides=[stride, stride], pads=[pads] * 4)
    return g.model([y])


@pytest.mark.parametrize(("groups", "c_in", "c_out"), [(1, 4, 6), (2, 4, 6), (4, 4, 4), (2, 6, 4)])
def test_bn_convtranspose_with_1x1_kernel_and_stride_1_folds_completely(groups, c_in, c_out):
    model = bn_convtranspose_model(groups, c_in, c_out, kernel=1, stride=1)
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "ConvTranspose"]
    assert only_record(result).pattern == "bn-convtranspose"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("kernel", "stride", "pads"), [(3, 1, 0), (3, 2, 0), (1, 2, 0), (3, 2, 1)])
def test_bn_convtranspose_with_uneven_taps_keeps_the_shift_before_it(kernel, stride, pads):
    model = bn_convtranspose_model(2, 4, 6, kernel, stride, pads)
    result = fold(model)
    assert node_kinds(result.model) == ["Relu", "Shift", "ConvTranspose"]
    assert_equivalent(model, result.model)


def bn_gemm_model(trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None, trans_a: int = 0,
                  seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    m, k, n = 3, 5, 4
    x = g.input("x", [m, k])
    inputs = [g.bn(g.node("Relu", [x]), k), g.weight([n, k] if trans_b else [k, n])]
    if c_shape is not None:
        inputs.append(g.weight(c_shape))
    return g.model([g.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.7, 2.5)])
@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (3, 4), (3, 1), ()], ids=str)
def test_bn_gemm_honours_every_attribute(trans_b, alpha, beta, c_shape):
    model = bn_gemm_model(trans_b, alpha, beta, c_shape)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert only_record(result).pattern == "bn-gemm"
    assert_equivalent(model, result.model)


def test_bn_gemm_with_transposed_a_is_left():
    g = GraphBuilder()
    x = g.input("x", [5, 3])
    model = g.model([g.node("Gemm", [g.bn(g.node("Relu", [x]), 3), g.weight([5, 4])], transA=1)])
    assert only_record(fold(model)).reason == "gemm_trans_a"


def flatten_model(reshape: list[int] | None, op: str = "Gemm", axis: int = 1, batch: int | str = 2,
                  features: int = 12, seed: int = 0) -> onnx.ModelProto:
    """Relu -> BN over (batch, 3, 2, 2) -> Flatten(axis) or Reshape(reshape) -> Gemm/MatMul of ``features`` inputs."""
    g = GraphBuilder(seed)
    x = g.input("x", [batch, 3, 2, 2])
    bn = g.bn(g.node("Relu", [x]), 3)
    if reshape is None:
        flat = g.node("Flatten", [bn], axis=axis)
    else:
        flat = g.node("Reshape", [bn, g.const(np.array(reshape), dtype=np.int64)])
    inputs = [flat, g.weight([features, 5])] + ([g.weight([5])] if op == "Gemm" else [])
    return g.model([g.node(op, inputs)])


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("reshape", [None, [0, -1], [-1, 12], [2, 12]], ids=str)
def test_bn_flatten_linear_repeats_each_channel_over_its_feature_block(op, reshape):
    model = flatten_model(reshape, op)
    result = fold(model)
    assert count_ops(result.model) == 0
    assert only_record(result).pattern == ("bn-gemm" if op == "Gemm" else "bn-matmul")
    assert count_ops(result.model, "Gemm") == (op == "Gemm")
    assert_equivalent(model, result.model)


def test_bn_flatten_gemm_folds_with_a_dynamic_batch():
    model = flatten_model([0, -1], batch="N")
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("reshape", "features"), [(None, 4), ([6, 4], 4), ([12, 2], 2)],
                         ids=["flatten-axis-2", "rows-mix-channels", "halves"])
def test_a_reshape_that_does_not_keep_channel_blocks_is_left(reshape, features):
    model = flatten_model(reshape, axis=2, features=features)
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "reshape_mixes_channels")


@pytest.mark.parametrize("bias", [None, "after", "before"])
def test_bn_matmul_2d_adds_the_moved_shift_after_the_matmul(bias):
    g = GraphBuilder()
    x = g.input("x", [3, 5])
    y = g.node("MatMul", [g.bn(g.node("Relu", [x]), 5), g.weight([5, 4])], name="matmul")
    if bias:
        constant = g.weight([4])
        y = g.node("Add", [y, constant] if bias == "after" else [constant, y])
    model = g.model([y])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert count_ops(result.model, "Add") == 1 and count_ops(result.model, "Gemm") == 0
    assert [o.name for o in result.model.graph.output] == [y]
    assert only_record(result).pattern == "bn-matmul"
    assert_equivalent(model, result.model)


def test_bn_matmul_keeps_the_matmul_output_for_its_other_readers():
    g = GraphBuilder()
    x = g.input("x", [3, 5])
    y = g.node("MatMul", [g.bn(g.node("Relu", [x]), 5), g.weight([5, 4])])
    model = g.model([g.node("Add", [y, g.weight([4])]), g.node("Relu", [y])])
    result = fold(model)
    assert count_ops(result.model) == 0
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("perm", "reason"), [([0, 2, 1], None), ([2, 0, 1], None), ([1, 0, 2], "channel_axis")])
def test_bn_transpose_matmul_folds_when_the_transpose_puts_the_channels_last(perm, reason):
    # BatchNorm1d over (N, C, T), then a Linear over (N, T, C): the MatMul contracts the BN's channels.
    g = GraphBuilder(9)
    x = g.input("x", [2, 4, 3])
    bn = g.bn(g.node("Relu", [x]), 4)
    transposed = g.node("Transpose", [bn], perm=perm)
    model = g.model([g.node("Add", [g.node("MatMul", [transposed, g.weight([[2, 4, 3][perm[2]], 5])]),
                                     g.weight([5])])])
    result = fold(model)
    record = only_record(result)
    if reason is None:
        assert (record.status, record.pattern) == ("folded", "bn-matmul")
        assert count_ops(result.model, "Add") == 1
        assert_equivalent(model, result.model)
    else:
        assert (record.status, record.reason) == ("left", reason)


def test_bn_matmul_on_a_3d_input_is_left():
    # The BN's channel axis 1 is not the MatMul's feature axis 2, whatever the sizes.
    g = GraphBuilder()
    x = g.input("x", [2, 4, 4])
    model = g.model([g.node("MatMul", [g.bn(g.node("Relu", [x]), 4), g.weight([4, 3])])])
    record = only_record(fold(model))
    assert (record.status, record.reason) == ("left", "channel_axis")


@pytest.mark.parametrize("layer", ["Conv", "Gemm", "MatMul", "ConvTranspose"])
def test_mixed_precision_bn_folds_backward_into_the_layer_dtype(layer):
    # BN-15: fp16 activations with fp32 parameters. The folded tensors are fp16, rounded once.
    g = GraphBuilder(5, np.float16, opset=15)
    shape = [2, 4, 5, 5] if layer.startswith("Conv") else [3, 4]
    x = g.input("x", shape)
    bn = g.bn(g.node("Relu", [x]), 4, param_dtype=np.float32)
    weight = {"Conv": [6, 4, 3, 3], "ConvTranspose": [4, 6, 3, 3], "Gemm": [4, 6], "MatMul": [4, 6]}[layer]
    inputs = [bn, g.weight(weight)] + ([g.weight([6])] if layer != "MatMul" else [])
    model = g.model([g.node(layer, inputs)])
    result = fold(model)
    assert count_ops(result.model) == 0
    onnx.checker.check_model(result.model, full_check=True)
    layer_node = next(n for n in result.model.graph.node if n.op_type == layer)
    initializers = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert initializers[layer_node.input[1]].dtype == np.float16
    assert all(a.dtype == np.float16 for a in initializers.values())
    assert_equivalent(model, result.model, rtol=2e-2)


@pytest.mark.parametrize("skip", ["bn-conv", "bn-gemm"])
def test_skipped_backward_patterns_leave_their_batchnorms(skip):
    model = bn_conv_model() if skip == "bn-conv" else bn_gemm_model(0, 1.0, 1.0, (4,))
    record = only_record(fold(model, skip=[skip]))
    assert (record.status, record.reason) == ("left", "pattern_disabled")
