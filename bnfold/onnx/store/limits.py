"""Every size limit of the ONNX front, in one place, each named for what it bounds.

Limits that depend on one another are defined from one another here, so they cannot drift apart (they did
once: the guard's weightless skeleton and the held tensors used two equal constants, and a change to one
would have made the checker refuse every fold). Modules read them as ``limits.NAME`` at call time, so a test
patches this module alone.
"""

from __future__ import annotations

# -- protobuf ----------------------------------------------------------------------------------------------
# The largest message protobuf reads or writes: 2 GiB minus one byte.
PROTOBUF_MESSAGE_MAX = 2**31 - 1
# Models whose tensors reach this many bytes are written with external data: protobuf cannot serialize a
# message of 2 GiB or more, and the graph itself needs a margin below that.
PROTOBUF_LIMIT = 2**31 - 2**24

# -- reading ---------------------------------------------------------------------------------------------
# A lazily read model leaves main-graph tensors this large in the file until a fold reads them: the weights.
# Smaller ones (batch norm parameters, biases) are parsed with the rest; reading each on its own costs more
# than the memory it saves.
LAZY_MIN_BYTES = 16 << 10
# Initializers of at most this many elements stay in the proto: shape inference needs the values of small
# integer tensors such as Reshape targets, never those of weights (so the lazy reader never leaves them in
# the file, and type inference keeps them in its skeleton).
KEPT_ELEMENTS = 64
# Tensor bytes in the proto from which type inference runs on a skeleton instead of the model itself.
SKELETON_FROM_BYTES = 8 << 20
# Tensors on disk this large are mapped rather than read; smaller ones are cheaper to copy than to map.
MAP_MIN_BYTES = 256 << 10
# Files mapped at once. A mapping keeps a descriptor of its file open, and a model may keep every tensor in
# a file of its own: past this many mapped files, tensors are read instead.
MAX_MAPPED_FILES = 256
# External data locations remembered as checked (base directory, location) pairs.
MAX_APPROVED_LOCATIONS = 4096

# -- folding ---------------------------------------------------------------------------------------------
# Values a fold writes into the main graph are held beside the proto from this size on (smaller ones go into
# the proto). The guard's weightless skeleton declares initializers from this same size on as graph inputs:
# a held tensor has no data in the proto, and the checker would refuse one left in the skeleton.
HELD_MIN_BYTES = 1024
# A scaled weight mapped from the input is computed only as it is written (a deferred product) from this
# size on; smaller ones are cheaper computed at once.
DEFERRED_MIN_BYTES = 256 << 10
# A deferred product is computed this many bytes of rows at a time, into one reused buffer.
DEFERRED_BLOCK_BYTES = 8 << 20

# A fold that adds more parameter bytes than this (and at least doubles them) says so: it stored weights the
# model computed at run time.
NOTED_GROWTH_BYTES = 1 << 20

# -- writing ---------------------------------------------------------------------------------------------
# Smaller tensors stay inline in the .onnx file, as onnx's own converter does.
EXTERNAL_MIN_BYTES = 1024
# Tensors at least this large start on this boundary in the data file, so onnxruntime can memory-map them
# (64 KiB is Windows' mapping granularity and a multiple of every page size; onnx caps padding at it too).
ALIGNMENT = 64 << 10
# Inline raw data below this size is encoded with its tensor by protobuf itself; larger payloads are written
# between the tensor's encoded fields, never copied into a serialization.
SPLIT_FROM_BYTES = 64 << 10
# Bytes copied at a time from an external data file when the kernel cannot copy them itself.
COPY_CHUNK_BYTES = 16 << 20

# -- verification ----------------------------------------------------------------------------------------
# The most bytes one generated input may take: a model that declares more is refused, not allocated.
GENERATED_INPUT_LIMIT = 4 << 30
