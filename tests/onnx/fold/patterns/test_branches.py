"""parallel-branches: linear branches reading one input and meeting in Add/Sub/Sum become one Conv, exactly,
or stay with a reason; either way the folded model computes what the original did."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops, rtol_for

PATTERN = "parallel-branches"
REFUSALS = {"branch_geometry", "merge_costlier", "channel_mismatch"}


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def merges(result, status: str = "folded") -> list:
    return [r for r in result.report.records if r.pattern == PATTERN and r.op_type != "BatchNormalization"
            and r.status == status]


@st.composite
def branch_blocks(draw) -> dict:
    """A block of 2-4 branches on one input: convolutions (random kernel, padding whose taps may or may not
    align, dilation, groups, bias, a batch norm after), identity, a batch norm or a scale of the input, an
    average pool; all give outputs of one shape, so the block is a valid model whether or not it merges."""
    spatial = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    reach = draw(st.sampled_from([0, 0, -1, 1]))  # begin + end pad - dilation * (k - 1): the output length
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    c_in = 4
    c_out = draw(st.sampled_from([4, 4, 8]))
    same_size = stride == 1 and reach == 0 and c_in == c_out
    kinds = ["conv", "conv", "conv"] + (["identity", "bn", "scale", "pool"] if same_size else [])
    branches = []
    for position in range(draw(st.integers(2, 4))):
        kind = "conv" if position == 0 else draw(st.sampled_from(kinds))
        axes = []
        for _ in range(spatial):
            dilation = draw(st.sampled_from([1, 1, 2]))
            size = draw(st.integers(1 if reach >= 0 else 2, 3))
            span = reach + dilation * (size - 1)  # begin + end pad
            begin = draw(st.integers(0, span))
            axes.append((size, dilation, begin, span - begin))
        branch_groups = draw(st.sampled_from([groups, groups, 1])) if kind == "conv" else groups
        branches.append({"kind": kind, "axes": axes, "groups": branch_groups, "bias": draw(st.booleans()),
                         "bn": draw(st.booleans())})
    return {"spatial": spatial, "stride": stride, "c_in": c_in, "c_out": c_out, "branches": branches,
            "join": draw(st.sampled_from(["Add", "Sum", "Sub"])), "dtype": draw(st.sampled_from([np.float32,
                                                                                                np.float16])),
            "seed": draw(st.integers(0, 2**16))}


def block_model(block: dict) -> onnx.ModelProto:
    g = GraphBuilder(block["seed"], block["dtype"])
    spatial, stride, c_in, c_out = block["spatial"], block["stride"], block["c_in"], block["c_out"]
    x = g.input("x", [1, c_in] + [7] * spatial)
    outputs = []
    for branch in block["branches"]:
        kind, axes = branch["kind"], branch["axes"]
        if kind == "conv":
            inputs = [x, g.weight([c_out, c_in // branch["groups"]] + [a[0] for a in axes])]
            if branch["bias"]:
                inputs.append(g.weight([c_out]))
            y = g.node("Conv", inputs, group=branch["groups"], strides=[stride] * spatial,
                       dilations=[a[1] for a in axes], pads=[a[2] for a in axes] + [a[3] for a in axes])
            outputs.append(g.bn(y, c_out) if branch["bn"] else y)
        elif kind == "identity":
            outputs.append(x)
        elif kind == "bn":
            outputs.append(g.bn(x, c_in))
        elif kind == "scale":
            outputs.append(g.node("Mul", [x, g.weight([c_in] + [1] * spatial)]))
        else:
            sizes = [a[0] for a in axes]
            outputs.append(g.node("AveragePool", [x], kernel_shape=sizes, count_include_pad=1,
                                  pads=[(s - 1) // 2 for s in sizes] + [s // 2 for s in sizes]))
    if block["join"] == "Sum":
        joined = g.node("Sum", outputs)
    else:
        joined = outputs[0]
        for position, other in enumerate(outputs[1:]):
            op = "Sub" if block["join"] == "Sub" and position == 0 else "Add"
            joined = g.node(op, [joined, other])
    return g.model([g.node("Relu", [joined])])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=branch_blocks())
def test_branches_merge_exactly_or_stay_with_a_reason(block):
    model = block_model(block)
    result = fold(model)
    assert_equivalent(model, result.model, rtol=rtol_for(block["dtype"]), seed=block["seed"])
    assert {r.reason for r in merges(result, "left")} <= REFUSALS
    if not any(count_ops(result.model, join) for join in ("Add", "Sub", "Sum")):
        assert merges(result)
        assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]


def repvgg_block(seed: int = 0, dtype=np.float32, channels: int = 4) -> onnx.ModelProto:
    g = GraphBuilder(seed, dtype)
    x = g.input("x", [1, channels, 6, 6])
    dense = g.bn(g.node("Conv", [x, g.weight([channels, channels, 3, 3])], pads=[1, 1, 1, 1]), channels)
    pointwise = g.bn(g.node("Conv", [x, g.weight([channels, channels, 1, 1])]), channels)
    summed = g.node("Add", [g.node("Add", [pointwise, dense]), g.bn(x, channels)])
    return g.model([g.node("Relu", [summed])])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_repvgg_block_becomes_one_3x3_conv(dtype):
    model = repvgg_block(dtype=dtype)
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    conv = result.model.graph.node[0]
    assert onnx.helper.get_attribute_value(next(a for a in conv.attribute if a.name == "kernel_shape")) == [3, 3]
    assert len(merges(result)) == 2
    assert {r.status for r in result.report.records if r.op_type == "BatchNormalization"} == {"folded"}
    assert_equivalent(model, result.model, rtol=rtol_for(dtype))


def test_a_second_fold_finds_nothing_to_merge():
    once = fold(repvgg_block()).model
    again = fold(once)
    assert again.report.records == []


def test_skip_keeps_the_branches():
    model = repvgg_block()
    result = fold(model, skip=[PATTERN])
    assert count_ops(result.model, "Conv") == 2
    assert not merges(result)


def test_only_the_merge_pattern_merges_without_folding_the_batch_norms_first():
    model = repvgg_block()
    result = fold(model, only=[PATTERN])
    assert count_ops(result.model, "Conv") == 1
    assert_equivalent(model, result.model)


def test_a_branch_read_elsewhere_is_not_merged():
    g = GraphBuilder(3)
    x = g.input("x", [1, 4, 6, 6])
    left = g.node("Conv", [x, g.weight([4, 4, 3, 3])], pads=[1, 1, 1, 1])
    right = g.node("Conv", [x, g.weight([4, 4, 1, 1])])
    model = g.model([g.node("Add", [left, right]), right])
    result = fold(model)
    assert count_ops(result.model, "Conv") == 2
    assert_equivalent(model, result.model)


def test_misaligned_taps_stay_with_branch_geometry():
    # Equal output lengths, but along axis 0 the 1x1 tap falls between the dilated 3x3's taps.
    g = GraphBuilder(4)
    x = g.input("x", [1, 4, 6, 6])
    left = g.node("Conv", [x, g.weight([4, 4, 3, 3])], pads=[2, 1, 3, 1], dilations=[2, 1])
    right = g.node("Conv", [x, g.weight([4, 4, 1, 1])], pads=[1, 0, 0, 0])
    model = g.model([g.node("Add", [left, right])])
    result = fold(model)
    assert [r.reason for r in merges(result, "left")] == ["branch_geometry"]
    assert count_ops(result.model, "Conv") == 2
    assert_equivalent(model, result.model)


def test_a_depthwise_and_a_dense_branch_stay_when_merging_costs_more():
    g = GraphBuilder(5)
    x = g.input("x", [1, 8, 6, 6])
    depthwise = g.node("Conv", [x, g.weight([8, 1, 3, 3])], group=8, pads=[1, 1, 1, 1])
    pointwise = g.node("Conv", [x, g.weight([8, 8, 1, 1])])
    model = g.model([g.node("Add", [depthwise, pointwise])])
    result = fold(model)
    assert [r.reason for r in merges(result, "left")] == ["merge_costlier"]


def test_an_average_pool_without_its_padding_counted_stays():
    g = GraphBuilder(6)
    x = g.input("x", [1, 4, 6, 6])
    conv = g.node("Conv", [x, g.weight([4, 1, 3, 3])], group=4, pads=[1, 1, 1, 1])
    pool = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = g.model([g.node("Add", [conv, pool])])
    result = fold(model)
    assert [r.reason for r in merges(result, "left")] == ["pool_border"]
    assert_equivalent(model, result.model)


def test_fastvit_repmixer_becomes_one_depthwise_conv():
    """``x + gamma * (mixer(x) - norm(x))`` with mixer a depthwise 3x3 + 1x1 scale + identity batch norm."""
    g = GraphBuilder(7)
    c = 8
    x = g.input("x", [1, c, 6, 6])
    kxk = g.bn(g.node("Conv", [x, g.weight([c, 1, 3, 3])], group=c, pads=[1, 1, 1, 1]), c)
    scale = g.bn(g.node("Conv", [x, g.weight([c, 1, 1, 1])], group=c), c)
    mixer = g.node("Add", [g.node("Add", [scale, g.bn(x, c)]), kxk])
    mixed = g.node("Mul", [g.node("Sub", [mixer, g.bn(x, c)]), g.weight([c, 1, 1])])
    model = g.model([g.node("Add", [x, mixed])])
    result = fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert_equivalent(model, result.model)


@st.composite
def gemm_blocks(draw) -> dict:
    return {
        "branches": [{"transB": draw(st.booleans()), "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
                      "beta": draw(st.sampled_from([1.0, 0.25])),
                      "bias": draw(st.sampled_from(["none", "row", "matrix"])), "scale": draw(st.booleans())}
                     for _ in range(draw(st.integers(2, 3)))],
        "transA": draw(st.booleans()),
        "join": draw(st.sampled_from(["Add", "Sub", "Sum"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def gemm_block_model(block: dict) -> onnx.ModelProto:
    """Gemm heads on one input (a distillation head pair, an ensemble), each maybe scaled per feature."""
    g = GraphBuilder(block["seed"])
    batch, features, outputs = 3, 5, 4
    x = g.input("x", [features, batch] if block["transA"] else [batch, features])
    values = []
    for branch in block["branches"]:
        bias = {"none": [], "row": [g.weight([outputs])], "matrix": [g.weight([batch, outputs])]}[branch["bias"]]
        weight = g.weight([outputs, features] if branch["transB"] else [features, outputs])
        y = g.node("Gemm", [x, weight, *bias], transA=int(block["transA"]), transB=int(branch["transB"]),
                   alpha=branch["alpha"], beta=branch["beta"])
        values.append(g.node("Mul", [y, g.weight([outputs])]) if branch["scale"] else y)
    if block["join"] == "Sum":
        joined = g.node("Sum", values)
    else:
        joined = g.node(block["join"], values[:2])
        for other in values[2:]:
            joined = g.node("Add", [joined, other])
    return g.model([g.node("Div", [joined, g.const(np.array(2.0))])])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=gemm_blocks())
def test_gemm_branches_of_one_input_merge_into_one_gemm(block):
    model = gemm_block_model(block)
    result = fold(model)
    assert_equivalent(model, result.model, seed=block["seed"])
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert merges(result)
