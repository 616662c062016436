"""Build a TensorRT engine package from a model package's ONNX graphs (TensorRT 10 Python API).

The engine package is a model package like the ONNX one: the same manifest
(graph entries with ``format: "tensorrt"`` and ``<graph>.engine`` files, the
same I/O), ``tokenizer.json``, the int8 calibration caches used, and
``tensorrt_build.json`` (TensorRT version, GPU, flags, profiles). Engines are
specific to one GPU and one TensorRT version: build them on the device.

- **Profiles:** :mod:`loc3r.export.tensorrt_profiles` (prefill-chunk and
  decode profiles for token graphs, the KV length from the context budget).
- **fp16:** ``BuilderFlag.FP16``; TensorRT keeps layers in fp32 where fp16
  has no kernel or would be slower.
- **int8:** graphs that already hold Q/DQ nodes (an int8 package's vision
  tower and pose prior) are built with explicit quantization. For other
  graphs with activation ranges (the package's ``ranges/<graph>.json``, or
  ranges calibrated now with ``--calib``), a calibration cache in TensorRT's
  text format is written and read by a cache-only calibrator, so TensorRT
  never re-runs calibration on the device. The decoder and heads get no
  int8 calibration (weight-only quantization is the ONNX path's job).
- **Timing cache:** read before and saved after every build, so later builds
  (other graphs, other packages, rebuilt engines) skip tactic timing.

- **Plugins:** a package exported with ``--target tensorrt`` (manifest
  ``target``) holds ``loc3r::FusedAttention`` nodes; the loc3r plugin library
  is loaded automatically (``--plugin``, else ``$LOC3R_TRT_PLUGIN``, else the
  CMake build folder; :func:`loc3r.runtime.backends.tensorrt.find_plugin_library`).
  Packages for onnxruntime (contrib ops) are refused unless ``--plugin`` gives
  plugins for those ops, with a line pointing at ``--target tensorrt``.

TensorRT is imported only when building; where it is absent the command
fails with one line (:data:`NOT_AVAILABLE`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from loc3r.errors import Loc3rError
from loc3r.export.tensorrt_calibration import calibration_cache_text
from loc3r.export.tensorrt_profiles import Profile, ProfileOptions, graph_profiles
from loc3r.runtime.package import TOKENIZER_NAME, GraphSpec, Manifest, load_package, write_manifest

NOT_AVAILABLE = ("TensorRT is not installed: 'loc3r export tensorrt' needs the tensorrt Python package "
                 "(TensorRT 10; on Jetson it comes with JetPack)")
BUILD_INFO = "tensorrt_build.json"
INT8_ROLES = ("vision", "pose_prior")
# Contrib ops the TensorRT ONNX parser has no importer for; they need a plugin of the same name.
CONTRIB_DOMAINS = ("com.microsoft",)


@dataclass(frozen=True)
class EngineOptions:
    fp16: bool = False
    int8: bool = False
    workspace_mb: int = 4096
    timing_cache: Optional[Path] = None  # None: ~/.cache/loc3r/tensorrt/timing.cache
    calib: Optional[str] = None  # calibration source for graphs without ranges (int8)
    plugins: tuple[Path, ...] = ()  # plugin libraries to load (e.g. the attention plugin)
    profiles: ProfileOptions = ProfileOptions()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workspace_mb < 16:
            raise Loc3rError(f"--workspace must be at least 16 MB, got {self.workspace_mb}")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise Loc3rError(NOT_AVAILABLE) from None
    return trt


def default_timing_cache() -> Path:
    import os

    base = os.environ.get("LOC3R_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "loc3r") / "tensorrt" / "timing.cache"


def engine_file(spec: GraphSpec) -> str:
    return Path(spec.file).with_suffix(".engine").name


def contrib_ops(onnx_path: Path) -> list[str]:
    """``domain.op`` of nodes the TensorRT parser cannot import without a plugin."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain in CONTRIB_DOMAINS})


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def graph_ranges(pkg_dir: Path, spec: GraphSpec, manifest: Manifest, options: EngineOptions):
    """Activation ranges for an int8 build of ``spec``: the package's, or calibrated now; None if neither."""
    from loc3r.export.quantize import RANGES_DIR

    stored = pkg_dir / RANGES_DIR / f"{Path(spec.file).stem}.json"
    if stored.is_file():
        return {k: tuple(v) for k, v in json.loads(stored.read_text())["ranges"].items()}
    if options.calib is None:
        return None
    from loc3r.calibration.dataset import build_calibration_set
    from loc3r.calibration.range_cache import RangeCache
    from loc3r.calibration.ranges import calibrated_ranges
    from loc3r.calibration.readers import pose_prior_feeds, vision_feeds
    from loc3r.runtime.package import sha256_of_file

    calib = build_calibration_set(options.calib, progress=options.progress)
    path = pkg_dir / spec.file
    if spec.role == "vision":
        pose = manifest.graph("pose_prior") if manifest.has_graph("pose_prior") else None
        feeds = lambda: vision_feeds(calib, manifest.vision, spec, manifest.pose_prior, pose,
                                     None if pose is None else pkg_dir / pose.file)
    else:
        feeds = lambda: pose_prior_feeds(calib, manifest.pose_prior, spec, path)
    ranges, _ = calibrated_ranges(path, sha256_of_file(path), calib.digest(), feeds, cache=RangeCache(),
                                  total=len(calib.frames), progress=options.progress)
    return ranges


def _cache_calibrator(trt, cache: bytes):
    """An int8 calibrator that only reads ``cache`` (TensorRT never asks it for batches)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheCalibrator()


def build_engine(trt, onnx_path: Path, engine_path: Path, profiles: Sequence[Profile], options: EngineOptions,
                 timing_cache: Path, calib_cache: Optional[bytes] = None, explicit_int8: bool = False) -> None:
    """Parse ``onnx_path``, build with ``profiles`` and flags, write ``engine_path``; updates the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise Loc3rError(f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if explicit_int8 or calib_cache is not None:
        config.set_flag(trt.BuilderFlag.INT8)
    if calib_cache is not None and not explicit_int8:
        config.int8_calibrator = _cache_calibrator(trt, calib_cache)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
        if calib_cache is not None and not explicit_int8 and config.num_optimization_profiles == 1:
            config.set_calibration_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    tcache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(tcache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise Loc3rError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def load_plugins(trt, manifest: Manifest, options: EngineOptions) -> list[Path]:
    """Load ``--plugin`` libraries, or for a tensorrt-target package the loc3r plugin found on this machine."""
    from loc3r.runtime.backends.tensorrt import find_plugin_library, load_plugin_library

    libs = [Path(lib) for lib in options.plugins]
    if not libs and manifest.target == "tensorrt":
        libs = [find_plugin_library()]
    for lib in libs:
        load_plugin_library(trt, lib, need_attention=manifest.target == "tensorrt")
    return libs


def engine_precision(source: str, options: EngineOptions) -> str:
    if options.int8:
        return "int8"
    if options.fp16:
        return "fp16"
    return source


def build_engine_package(pkg_dir: Path, out_dir: Path, options: EngineOptions = EngineOptions()) -> Manifest:
    """Build one engine per graph of the package in ``pkg_dir`` into the engine package ``out_dir``."""
    from tqdm import tqdm

    trt = import_tensorrt()
    pkg_dir, out_dir = Path(pkg_dir), Path(out_dir)
    package = load_package(pkg_dir)
    manifest = package.manifest
    if any(g.format != "onnx" for g in manifest.graphs):
        raise Loc3rError(f"{pkg_dir} is not an ONNX model package (build engines from 'loc3r export onnx' output)")
    if out_dir.resolve() == pkg_dir.resolve():
        raise Loc3rError("--out must differ from the source package")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise Loc3rError(f"output directory {out_dir} is not empty")
    if manifest.target == "tensorrt" and options.int8:
        from loc3r.export.trt_target import NO_INT8

        raise Loc3rError(NO_INT8)
    plugins = load_plugins(trt, manifest, options)
    if manifest.target == "tensorrt" and not options.fp16:
        print("note: the loc3r::FusedAttention plugin has fp16 kernels only; without --fp16 TensorRT must convert "
              "q and the whole KV cache around every attention (or reject the layer)", file=sys.stderr)
    for spec in manifest.graphs:
        ops = contrib_ops(pkg_dir / spec.file)
        if ops and not plugins:
            raise Loc3rError(f"graph {spec.file} uses {', '.join(ops)}, which TensorRT's ONNX parser cannot import: "
                             "pass --plugin LIB with TensorRT plugins of those names, or export the package with "
                             "'loc3r export onnx --target tensorrt'")
    timing = Path(options.timing_cache) if options.timing_cache else default_timing_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"tensorrt": trt.__version__, "fp16": options.fp16, "int8": options.int8,
            "workspace_mb": options.workspace_mb, "source_precision": manifest.precision,
            "target": manifest.target, "plugins": [str(p) for p in plugins], "graphs": {}}
    graphs = []
    try:
        shutil.copyfile(pkg_dir / TOKENIZER_NAME, out_dir / TOKENIZER_NAME)
        for spec in tqdm(manifest.graphs, desc="engines", unit="graph", disable=not options.progress,
                         file=sys.stderr):
            src = pkg_dir / spec.file
            profiles = graph_profiles(spec, manifest, options.profiles)
            explicit = options.int8 and has_qdq(src)
            cache = None
            if options.int8 and spec.role in INT8_ROLES and not explicit:
                ranges = graph_ranges(pkg_dir, spec, manifest, options)
                if ranges is None:
                    raise Loc3rError(f"--int8 needs activation ranges for {spec.file}: pass --calib SOURCE, "
                                     "or build from an int8 package")
                text = calibration_cache_text(ranges, trt.__version__)
                (out_dir / f"{Path(spec.file).stem}.calib.cache").write_text(text)
                cache = text.encode()
            target = out_dir / engine_file(spec)
            build_engine(trt, src, target, profiles, options, timing, cache, explicit)
            graphs.append(dataclasses.replace(spec, file=target.name, format="tensorrt"))
            info["graphs"][spec.role] = {
                "engine": target.name, "int8": "explicit (Q/DQ)" if explicit else ("calibration cache" if cache
                                                                                   else "no"),
                "profiles": [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                             for p in profiles]}
        (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
        return write_manifest(out_dir, dataclasses.replace(
            manifest, precision=engine_precision(manifest.precision, options), graphs=tuple(graphs), files={}))
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
