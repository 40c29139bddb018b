"""The ONNX front: model I/O, a graph index with constant resolution, and the fold driver."""
