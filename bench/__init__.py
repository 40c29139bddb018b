"""bnfold's benchmark: fold speed and memory against onnx load+save and the other folding tools, the
inference gain under onnxruntime, and the precision of the folded models. ``python -m bench --help``."""
