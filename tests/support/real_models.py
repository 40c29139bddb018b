"""Real model code from timm and torchvision, built with random weights and random batch-norm statistics.

Nothing is downloaded: every model is created with ``pretrained=False``/``weights=None`` and small inputs
(64x64) keep a fold of each under a few seconds. Batch norms get random running statistics and affine
parameters so that a wrong fold cannot hide behind an identity map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SIZE = 64


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return make


def _frozen_fpn_backbone() -> nn.Module:
    """What torchvision's detection models use with pretrained weights: FrozenBatchNorm2d after every conv."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm/efficientnet_b0": _timm("efficientnet_b0"),
    "timm/mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "timm/regnety_002": _timm("regnety_002"),
    "timm/densenet121": _timm("densenet121"),
    "timm/levit_128s": _timm("levit_128s", img_size=SIZE),
    "timm/cs3darknet_s": _timm("cs3darknet_s"),
    "timm/repvgg_a0": _timm("repvgg_a0"),
    # Amplifies float32 rounding ~1e5-fold at random init: the exact fold passes only by the rounding rule.
    "timm/mixnet_s": _timm("mixnet_s"),
    "torchvision/resnet18": _torchvision("resnet18"),
    "torchvision/mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "torchvision/resnet18_fpn_frozen_bn": _frozen_fpn_backbone,
}


def _smp(architecture: str, encoder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=2)

    return make


# More architectures for the benchmark's table (python -m bench.torch_coverage --all); the tests fold MODELS.
MORE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm/dpn68": _timm("dpn68"),
    "timm/ese_vovnet19b_dw": _timm("ese_vovnet19b_dw"),
    "timm/fbnetc_100": _timm("fbnetc_100"),
    "timm/lcnet_050": _timm("lcnet_050"),
    "timm/mobileone_s0": _timm("mobileone_s0"),
    "timm/fastvit_t8": _timm("fastvit_t8"),
    "timm/cspresnet50": _timm("cspresnet50"),
    "timm/resnet18d": _timm("resnet18d"),
    "timm/ghostnet_100": _timm("ghostnet_100"),
    "torchvision/densenet121": _torchvision("densenet121"),
    "torchvision/efficientnet_b0": _torchvision("efficientnet_b0"),
    "torchvision/regnet_y_400mf": _torchvision("regnet_y_400mf"),
    "torchvision/shufflenet_v2_x0_5": _torchvision("shufflenet_v2_x0_5"),
    "torchvision/mnasnet0_5": _torchvision("mnasnet0_5"),
    "smp/unet_resnet18": _smp("Unet", "resnet18"),
    "smp/fpn_mobilenet_v2": _smp("FPN", "mobilenet_v2"),
    "smp/deeplabv3_resnet18": _smp("DeepLabV3", "resnet18"),
}


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Random statistics and affine parameters for every batch norm, trainable or frozen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            state = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
            if not {"running_mean", "running_var"} <= state.keys():
                continue
            channels = state["running_mean"].shape
            state["running_mean"].copy_(torch.randn(channels, generator=generator) * 0.5)
            state["running_var"].copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
            if state.get("weight") is not None:
                state["weight"].copy_(torch.rand(channels, generator=generator) + 0.5)
            if state.get("bias") is not None:
                state["bias"].copy_(torch.randn(channels, generator=generator) * 0.2)


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode with random weights and BN state, and one example input."""
    torch.manual_seed(seed)
    model = (MODELS | MORE_MODELS)[name]()
    randomize_norms(model, seed)
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
