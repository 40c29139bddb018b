"""Regenerate the sample ONNX models next to this script: ``python models/make_models.py``.

The models come from :mod:`tests.support.zoo` with fixed seeds, so every run writes the same graphs.
They are exported by the TorchScript exporter with ``TrainingMode.PRESERVE`` at opset 17: of the two
exporters it gives the cleanest graph (parameters as initializers, no computed zero biases for
bias-less convolutions), and opset 17 is one both exporters' users commonly meet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
# `python models/make_models.py` puts models/, not the repository root, on sys.path; this lets the
# script run from a checkout where bnfold is not installed.
sys.path.insert(0, str(MODELS_DIR.parent))

import onnx  # noqa: E402

from tests.support.zoo import BuiltModel, export_onnx, mlp, mobilenet_v2, resnet, unet_decoder  # noqa: E402

OPSET = 17
SEED = 0

SAMPLE_BUILDERS: dict[str, Callable[[], BuiltModel]] = {
    # Four stages of basic residual blocks, 8 to 64 channels; stride-2 stages have 1x1 Conv+BN shortcuts.
    "resnet_small.onnx": lambda: resnet(depths=(1, 1, 1, 1), width=8, image_size=64, seed=SEED),
    # Linear -> BatchNorm1d -> ReLU twice: BN on rank-2 input, after Gemm.
    "mlp_bn1d.onnx": lambda: mlp(in_features=32, hidden=(64, 64), out_features=10, seed=SEED),
    # U-Net whose decoder upsamples with ConvTranspose -> BN, one of them grouped.
    "decoder_convtranspose.onnx": lambda: unet_decoder(width=8, depth=3, image_size=32, seed=SEED),
    # Depthwise convolutions, ReLU6 (Clip) and BN epsilon 1e-3.
    "mobilenet_v2_tiny.onnx": lambda: mobilenet_v2(width_mult=0.25, image_size=32, seed=SEED),
}


def write_sample_models(directory: Path) -> list[Path]:
    """Export every sample model into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, build in SAMPLE_BUILDERS.items():
        module, input_shape = build()
        paths.append(export_onnx(module, input_shape, directory / filename, opset=OPSET, seed=SEED))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=MODELS_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    total_bytes = 0
    for path in write_sample_models(args.output_dir):
        model = onnx.load(path)
        batchnorms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
        size = path.stat().st_size
        total_bytes += size
        print(f"{path.name}: {batchnorms} BatchNormalization nodes, {size / 1024:.1f} KiB")
    print(f"total: {total_bytes / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
