"""fold_module: fold an nn.Module's batch norms, keeping its class, methods, attributes and hooks."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from bnfold.core.affine import FoldRefused
from bnfold.core.compare import VerificationSet, VerifyReport
from bnfold.core.report import FoldReport, Totals
from bnfold.core.result import FoldResult
from bnfold.errors import InputError
from bnfold.reasons import Reason
from bnfold.torch.capture.dataflow import BnFacts, LayerGeometry
from bnfold.torch.capture.fx import trace
from bnfold.torch.capture.strategy import Capture, capture
from bnfold.torch.checks import compare, exact_math, judge_against_rounding
from bnfold.torch.fold.layers import (
    affine_facts,
    bn_facts,
    fold_module_weights,
    install_weights,
    is_batchnorm,
    is_layer,
    layer_geometry,
    neutralise_batchnorm,
    uses_own_forward,
)
from bnfold.torch.fold.norms import Proofs, is_affine_candidate, looks_like_batchnorm
from bnfold.torch.fold.plan import Plan, plan_folds
from bnfold.torch.modules import ModuleIndex
from bnfold.torch.result import TorchFolded, save_module
from bnfold.torch.running import call, double, normalize_inputs, observe, random_inputs

_WRAPPERS = (DataParallel, DistributedDataParallel)
Progress = Callable[[str], None]


def fold_module(
    module: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    allow_train_mode: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
    verify: bool = True,
    export_onnx: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold every provably foldable batch norm of ``module``; see the package docstring."""
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    say = progress or (lambda _message: None)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    wrapper, inner = (module, module.module) if isinstance(module, _WRAPPERS) else (None, module)
    if inner.training and not allow_train_mode:
        raise InputError(
            "the model is in training mode; call model.eval() first, or pass allow_train_mode=True "
            "to fold its eval-mode behaviour"
        )
    inputs = normalize_inputs(example_inputs)
    if inputs is None and input_shapes is not None:
        inputs = random_inputs(inner, input_shapes)
    if export_onnx is not None and inputs is None:
        raise InputError("exporting to ONNX needs example inputs or input shapes")
    work = inner if inplace else _copy(inner)
    if work.training:
        work.eval()
    with exact_math():
        index = ModuleIndex(work)
        _find_affine_norms(work, index)
        observation = None
        if inputs is not None:
            say("running the original model")
            observation = observe(work, inputs, index, keep_inputs=not _traceable(work))
        say("capturing the dataflow")
        captured = capture(work, index, observation)
        seconds["capture"] = time.perf_counter() - started
        before = _totals(work, index)
        plan = _plan(work, index, captured)
        neutralised = _apply(work, index, plan)
        report = FoldReport(records=plan.records, seconds=seconds, node_unit="modules")
        if isinstance(example_inputs, list):
            report.notes.append(
                "example_inputs is a list: its items were passed as positional arguments "
                "(pass a tuple to say so, or (items,) to pass the list as one argument)"
            )
        after = _totals(work, index, neutralised)
        report.totals = Totals.between(before, after)
        checks: list[VerifyReport] = []
        if verify and observation is not None:
            say("verifying the folded model")
            candidate = call(work, inputs)  # type: ignore[arg-type]  # observed: inputs given
            check = compare(observation.outputs, candidate, "pytorch", rtol, atol)
            if not check.passed and atol is None and work is not inner:
                check = judge_against_rounding(check, observation.outputs, candidate,
                                               lambda: call(_copy(inner).double(), double(inputs)), rtol)  # type: ignore[arg-type]
            checks.append(check)
        if export_onnx is not None:
            from bnfold.torch.export import export_and_check

            say("exporting to ONNX and checking it under onnxruntime")
            reference = observation.outputs if observation is not None else call(inner, inputs)  # type: ignore[arg-type]
            checks.append(export_and_check(work, inputs, reference, export_onnx, rtol, atol))  # type: ignore[arg-type]  # else refused above
        if checks:
            report.verification = checks[0] if len(checks) == 1 else VerificationSet(checks)
    seconds["total"] = time.perf_counter() - started
    folded = _rewrap(wrapper, work, inplace)
    return FoldResult(TorchFolded(folded, save_module(folded)), report)


def _copy(module: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as error:
        raise InputError(
            f"cannot copy the model ({type(error).__name__}: {error}); pass inplace=True to fold it in place"
        ) from error


def _find_affine_norms(work: nn.Module, index: ModuleIndex) -> None:
    """Modules that fold like a batch norm without being one: proven per-channel affine maps, and modules with
    batch-norm statistics whose forward is not (reported, so that none goes unmentioned)."""
    for module in work.modules():
        if is_batchnorm(module) or is_layer(module) or not is_affine_candidate(module):
            continue
        facts = affine_facts(module)
        if facts.refusal is None or looks_like_batchnorm(module):
            index.affine_norms[id(module)] = facts


def _traceable(module: nn.Module) -> bool:
    try:
        trace(module)
    except Exception:
        return False
    return True


def _plan(work: nn.Module, index: ModuleIndex, captured: Capture) -> Plan:
    bns: dict[str, BnFacts] = {}
    layers: dict[str, LayerGeometry | FoldRefused] = {}
    proofs: Proofs = {}
    for module in work.modules():
        name = index.name_of(module)
        if index.is_norm(module):
            facts = bn_facts(module, proofs) if is_batchnorm(module) else index.affine_norms[id(module)]
            if name in captured.uncaptured and facts.refusal is None:
                facts = BnFacts(None, FoldRefused(Reason.CAPTURE_FAILED, captured.uncaptured[name]), facts.ranks)
            bns[name] = facts
        elif is_layer(module):
            layers[name] = layer_geometry(module)

    def fold_weights(layer: str, geometry: LayerGeometry, before, after):
        return fold_module_weights(index.module(layer), geometry, before, after)

    return plan_folds(captured.flow, bns, layers, fold_weights)


def _apply(work: nn.Module, index: ModuleIndex, plan: Plan) -> set[int]:
    """Install the folded weights and take the folded batch norms out; returns the modules kept (with their
    own work after the batch norm) whose batch-norm part is now the identity."""
    for fold in plan.folds.values():
        install_weights(index.module(fold.layer), *fold.params)
    neutralised = set()
    for name in plan.removed:
        module = index.module(name)
        if uses_own_forward(module):
            neutralise_batchnorm(module)  # type: ignore[arg-type]  # uses_own_forward: a batch norm
            neutralised.add(id(module))
        else:
            index.replace(module, nn.Identity())
    return neutralised


def _totals(module: nn.Module, index: ModuleIndex, neutralised: set[int] = frozenset()) -> tuple[int, int, int]:  # type: ignore[assignment]
    modules = list(module.modules())
    bns = sum(1 for m in modules if index.is_norm(m) and id(m) not in neutralised)
    params = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return bns, len(modules), params


def _rewrap(wrapper: nn.Module | None, folded: nn.Module, inplace: bool) -> nn.Module:
    if wrapper is None or inplace:
        return wrapper if wrapper is not None else folded
    rewrapped = copy.copy(wrapper)
    rewrapped.__dict__ = dict(wrapper.__dict__)
    for attribute in ("_parameters", "_buffers", "_modules"):
        setattr(rewrapped, attribute, dict(getattr(wrapper, attribute)))
    rewrapped._modules["module"] = folded
    return rewrapped
