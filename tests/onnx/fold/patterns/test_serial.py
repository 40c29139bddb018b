"""serial-conv and serial-gemm: two linear layers with nothing between them become one, exactly, or stay with a
reason; either way the folded model computes what the original did."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold import fold_onnx
from tests.support.graphs import GraphBuilder, assert_equivalent, count_ops, rtol_for


def fold(model: onnx.ModelProto, **options):
    return fold_onnx(model, verify=False, **options)


def records(result, pattern: str, status: str) -> list:
    return [r for r in result.report.records if r.pattern == pattern and r.status == status
            and r.op_type != "BatchNormalization"]


@st.composite
def conv_pairs(draw) -> dict:
    spatial = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 1, 2]))
    kernel = draw(st.integers(1, 3))
    return {
        "spatial": spatial,
        "pointwise_first": draw(st.booleans()),
        "groups": (groups, draw(st.sampled_from([groups, 1]))),
        "channels": [groups * draw(st.integers(1, 3)) for _ in range(3)],
        "kernel": kernel,
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "pads": [draw(st.integers(0, kernel - 1)) for _ in range(2 * spatial)],
        "bias": (draw(st.sampled_from(["none", "zero", "random"])), draw(st.booleans())),
        "dtype": draw(st.sampled_from([np.float32, np.float16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def conv_pair_model(pair: dict) -> onnx.ModelProto:
    g = GraphBuilder(pair["seed"], pair["dtype"])
    spatial = pair["spatial"]
    c_in, c_mid, c_out = pair["channels"]
    x = g.input("x", [1, c_in] + [7] * spatial)
    value = x
    for position, (c_from, c_to) in enumerate([(c_in, c_mid), (c_mid, c_out)]):
        groups = pair["groups"][position]
        pointwise = (position == 0) == pair["pointwise_first"]
        size = 1 if pointwise else pair["kernel"]
        inputs = [value, g.weight([c_to, c_from // groups] + [size] * spatial)]
        bias = pair["bias"][0] if position == 0 else ("random" if pair["bias"][1] else "none")
        if bias != "none":
            inputs.append(g.weight([c_to]) if bias == "random" else g.const(np.zeros(c_to)))
        attributes = {} if pointwise else {"strides": [pair["stride"]] * spatial,
                                           "dilations": [pair["dilation"]] * spatial, "pads": pair["pads"]}
        value = g.node("Conv", inputs, group=groups, **attributes)
    return g.model([g.node("Relu", [value])])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=conv_pairs())
def test_serial_convs_merge_exactly_or_stay_with_a_reason(pair):
    model = conv_pair_model(pair)
    result = fold(model)
    assert_equivalent(model, result.model, rtol=rtol_for(pair["dtype"]), seed=pair["seed"])
    left = records(result, "serial-conv", "left")
    assert {r.reason for r in left} <= {"padding", "merge_costlier"}
    merged = count_ops(result.model, "Conv") == 1
    assert merged == bool(records(result, "serial-conv", "folded"))
    padded_bias = not pair["pointwise_first"] or not any(pair["pads"]) or pair["bias"][0] != "random"
    if not padded_bias:
        assert not merged


def test_a_bias_before_a_padded_conv_stays_with_padding():
    g = GraphBuilder(1)
    x = g.input("x", [1, 2, 5, 5])
    first = g.node("Conv", [x, g.weight([4, 2, 1, 1]), g.weight([4])])
    model = g.model([g.node("Conv", [first, g.weight([4, 4, 3, 3])], pads=[1, 1, 1, 1])])
    result = fold(model)
    assert [r.reason for r in records(result, "serial-conv", "left")] == ["padding"]
    assert count_ops(result.model, "Conv") == 2


def test_pointwise_after_a_strided_conv_merges_into_it():
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 8, 8])
    first = g.node("Conv", [x, g.weight([6, 3, 3, 3]), g.weight([6])], strides=[2, 2], pads=[1, 1, 1, 1])
    model = g.model([g.node("Conv", [first, g.weight([4, 6, 1, 1]), g.weight([4])])])
    result = fold(model)
    assert count_ops(result.model, "Conv") == 1
    assert_equivalent(model, result.model)


def test_skip_keeps_serial_convs():
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 8, 8])
    first = g.node("Conv", [x, g.weight([6, 3, 3, 3])], pads=[1, 1, 1, 1])
    model = g.model([g.node("Conv", [first, g.weight([4, 6, 1, 1])])])
    assert count_ops(fold(model, skip=["serial-conv"]).model, "Conv") == 2


@st.composite
def gemm_pairs(draw) -> dict:
    return {
        "sizes": [draw(st.integers(1, 6)) for _ in range(4)],  # batch, in, middle, out
        "trans": [draw(st.booleans()) for _ in range(3)],  # first transA, first transB, second transB
        "alphas": [draw(st.sampled_from([1.0, 0.5, -2.0])) for _ in range(4)],  # alpha1, beta1, alpha2, beta2
        "biases": [draw(st.sampled_from(["none", "row", "matrix", "scalar"])) for _ in range(2)],
        "second": draw(st.sampled_from(["Gemm", "MatMul"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def gemm_pair_model(pair: dict) -> onnx.ModelProto:
    g = GraphBuilder(pair["seed"])
    batch, n_in, middle, n_out = pair["sizes"]
    trans_a, trans_b1, trans_b2 = pair["trans"]
    alpha1, beta1, alpha2, beta2 = pair["alphas"]
    x = g.input("x", [n_in, batch] if trans_a else [batch, n_in])

    def bias(kind: str, columns: int) -> list[str]:
        shapes = {"none": None, "row": [columns], "matrix": [batch, columns], "scalar": []}
        return [] if shapes[kind] is None else [g.weight(shapes[kind])]

    b1 = g.weight([middle, n_in] if trans_b1 else [n_in, middle])
    first = g.node("Gemm", [x, b1, *bias(pair["biases"][0], middle)], transA=int(trans_a), transB=int(trans_b1),
                   alpha=alpha1, beta=beta1)
    if pair["second"] == "MatMul":
        second = g.node("MatMul", [first, g.weight([middle, n_out])])
    else:
        b2 = g.weight([n_out, middle] if trans_b2 else [middle, n_out])
        second = g.node("Gemm", [first, b2, *bias(pair["biases"][1], n_out)], transB=int(trans_b2), alpha=alpha2,
                        beta=beta2)
    return g.model([g.node("Relu", [second])])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=gemm_pairs())
def test_serial_gemms_merge_exactly_or_stay_when_costlier(pair):
    model = gemm_pair_model(pair)
    result = fold(model)
    assert_equivalent(model, result.model, seed=pair["seed"])
    _, n_in, middle, n_out = pair["sizes"]
    merged = bool(records(result, "serial-gemm", "folded"))
    assert merged == (n_in * n_out <= middle * (n_in + n_out))
    assert merged == (len(result.model.graph.node) == 2)
