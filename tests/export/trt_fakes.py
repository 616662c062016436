"""A stand-in `tensorrt` module for tests: records what the builder, parser and plugin registry were asked."""

from __future__ import annotations

import types
from pathlib import Path


class Recorder:
    """What the fake was asked: builder configs, parsed ONNX files, loaded plugin libraries (file names)."""

    def __init__(self):
        self.builds: list = []
        self.parsed: list[str] = []
        self.loaded: list[str] = []


def fake_tensorrt(rec: Recorder) -> types.ModuleType:
    """A `tensorrt` module with TensorRT 10's builder, parser and plugin-registry surface (loc3r::FusedAttention v1
    registered)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30"

    class Registry:
        def load_library(self, path):
            rec.loaded.append(Path(path).name)
            return object()

        def get_creator(self, name, version, namespace):
            return object() if (name, version, namespace) == ("FusedAttention", "1", "loc3r") else None

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.int8_calibrator, self.timing = set(), [], None, None

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        @property
        def num_optimization_profiles(self):
            return len(self.profiles)

        def set_calibration_profile(self, p):
            self.calibration_profile = p

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return self.timing

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.builds.append(config)
            return b"ENGINE"

    class OnnxParser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.parsed.append(Path(path).name)
            return True

    registry = Registry()
    trt.get_plugin_registry = lambda: registry
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
    return trt
