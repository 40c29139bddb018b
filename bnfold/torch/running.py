"""Running the user's model without leaving a trace on it: buffers restored, RNG forked, no grad."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from bnfold.errors import InputError
from bnfold.torch.fold.layers import is_layer
from bnfold.torch.modules import ModuleIndex


@dataclass(frozen=True)
class Inputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def normalize_inputs(example_inputs: object) -> Inputs | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        return Inputs(tuple(example_inputs), {})
    raise InputError("example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs")


def random_inputs(
    module: nn.Module, shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]], seed: int = 0
) -> Inputs:
    """Standard-normal inputs of the model's floating dtype and device, for the given shapes."""
    reference = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)

    def make(shape: Sequence[int]) -> torch.Tensor:
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as error:
            raise InputError(f"input shape {shape!r} is not a sequence of integers") from error
        if any(d < 0 for d in dims):
            raise InputError(f"input shape {dims} has a negative dimension")
        return torch.randn(dims, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    if isinstance(shapes, Mapping):
        return Inputs((), {name: make(shape) for name, shape in shapes.items()})
    return Inputs(tuple(make(shape) for shape in shapes), {})


@contextlib.contextmanager
def untouched(module: nn.Module, seed: int = 0) -> Iterator[None]:
    """Run inside: buffers (e.g. BN running stats) are restored and the global RNG is left as it was."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def double(inputs: Inputs) -> Inputs:
    """``inputs`` with every floating-point tensor, however nested, in float64."""
    def widen(value: Any) -> Any:
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return Inputs(tuple(tree_map(widen, list(inputs.args))), tree_map(widen, dict(inputs.kwargs)))


def call(module: nn.Module, inputs: Inputs, seed: int = 0) -> Any:
    with untouched(module, seed):
        return module(*inputs.args, **inputs.kwargs)


@dataclass
class Observation:
    """One reference run: outputs, how often each module ran, ranks at layers, and module inputs."""

    outputs: Any
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ranks: dict[str, list[tuple[int | None, int | None]]] = field(default_factory=lambda: defaultdict(list))
    inputs: dict[str, Inputs] = field(default_factory=dict)


def observe(module: nn.Module, inputs: Inputs, index: ModuleIndex, keep_inputs: bool = False) -> Observation:
    observation = Observation(outputs=None)
    handles = []

    def before(name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            observation.calls[name] += 1
            if keep_inputs and name not in observation.inputs:
                observation.inputs[name] = Inputs(tuple(args), dict(kwargs))
        return hook

    def after(name: str):
        def hook(mod: nn.Module, args: tuple, output: object) -> None:
            observation.ranks[name].append((_rank(args[0] if args else None), _rank(output)))
        return hook

    for sub in module.modules():
        name = index.name_of(sub)
        handles.append(sub.register_forward_pre_hook(before(name), with_kwargs=True))
        if is_layer(sub):
            handles.append(sub.register_forward_hook(after(name)))
    try:
        observation.outputs = call(module, inputs)
    except Exception as error:
        raise InputError(f"the model failed on the example inputs: {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    return observation


def _rank(value: object) -> int | None:
    return value.dim() if isinstance(value, torch.Tensor) else None
