"""Loading and saving ONNX graphs of any size (over protobuf's 2 GB limit, weights go to a side file)."""

from __future__ import annotations

from pathlib import Path

import onnx

from loc3r.errors import Loc3rError

# Above this many bytes of weights a graph is saved with external data
# (protobuf cannot serialize a message over 2 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph with its weights (external data, if any, read from beside it)."""
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise Loc3rError(f"cannot read ONNX graph {Path(path).name}: {exc}") from None


def external_data_files(path: Path) -> set[str]:
    """Side files holding the weights of the graph file ``path`` (read without loading them)."""
    model = onnx.load(str(path), load_external_data=False)
    out = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out |= {e.value for e in t.external_data if e.key == "location"}
    return out


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in memory."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
    return total


def is_large(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) > EXTERNAL_DATA_BYTES


def save_graph(model: onnx.ModelProto, path: Path, replaced: set[str] = frozenset()) -> None:
    """Save ``model`` to ``path``: one file, or ``<name>.data`` beside it for a large graph.

    ``replaced`` names the side files of the graph being overwritten; they are
    deleted first so no stale weights stay in the package.
    """
    path = Path(path)
    for name in replaced:
        (path.parent / name).unlink(missing_ok=True)
    if is_large(model):
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
