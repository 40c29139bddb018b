"""onnx-ir's ExternalTensor against bnfold's external-data reader (docs/store.md).

``python -m bench.external_ir [MB]``: writes a model of that many MB of float32 weights (256 KiB to 1 MiB
each) with external data, then reads every weight back as an array through each, and tries each on
locations bnfold refuses. Prints the median of 5 reads each and what each refused.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError
from bnfold.onnx.store.external import external_array, is_external, model_tensors


def _model(megabytes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights, total, index = [], 0, 0
    while total < megabytes << 20:
        rows = int(rng.integers(64, 256))
        weights.append(numpy_helper.from_array(rng.standard_normal((rows, 1024)).astype(np.float32), f"w{index}"))
        total += rows * 4096
        index += 1
    nodes = [helper.make_node("Identity", [w.name], [f"y{i}"]) for i, w in enumerate(weights)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))]
    return helper.make_model(helper.make_graph(nodes, "g", [], outputs, weights))


def _ir_tensor(tensor: TensorProto, base_dir: Path) -> ir.ExternalTensor:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return ir.ExternalTensor(entries["location"], int(entries.get("offset", 0)), int(entries["length"]),
                             ir.DataType(tensor.data_type), shape=ir.Shape(tensor.dims), name=tensor.name,
                             base_dir=base_dir)


READERS = {"bnfold": external_array, "onnx-ir": lambda tensor, base_dir: _ir_tensor(tensor, base_dir).numpy()}


def _median_seconds(read) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "model"
        base.mkdir()
        onnx.save(_model(megabytes), base / "m.onnx", save_as_external_data=True, location="m.data")
        model = onnx.load(base / "m.onnx", load_external_data=False)
        tensors = [tensor for tensor in model_tensors(model) if is_external(tensor)]
        for what, use in (("check and map each", lambda array: array.shape),
                          ("read and sum each", lambda array: float(array.sum()))):
            seconds = {name: _median_seconds(lambda read=read, use=use: [use(read(t, base)) for t in tensors])
                       for name, read in READERS.items()}
            print(f"{len(tensors)} tensors, {megabytes} MB, {what}: "
                  + ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in seconds.items()))
        outside = Path(scratch) / "outside.data"
        outside.write_bytes(b"\0" * 4096)
        os.symlink(outside, base / "link.data")
        probe = tensors[0]
        cases = {"../outside.data": "../outside.data", "absolute path": str(outside), "symlink outside": "link.data",
                 "length past the end": "m.data", "length not what dims need": "m.data"}
        for what, location in cases.items():
            bad = TensorProto()
            bad.CopyFrom(probe)
            for entry in bad.external_data:
                if entry.key == "location":
                    entry.value = location
                if entry.key == "offset" and what == "length past the end":
                    entry.value = str((base / "m.data").stat().st_size - 8)
                if entry.key == "length" and what == "length not what dims need":
                    entry.value = str(int(entry.value) - 4)
            verdicts = []
            for name, read in READERS.items():
                try:
                    read(bad, base)
                    verdicts.append(f"{name} read it")
                except (InputError, OSError, ValueError) as error:
                    verdicts.append(f"{name} refused ({type(error).__name__})")
            print(f"{what}: {', '.join(verdicts)}")


if __name__ == "__main__":
    main()
