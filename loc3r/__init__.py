"""loc3r: an edge-inference runtime for Loc3R-VLM.

The subpackages live in top-level folders of the repository and are mapped
into this namespace by setup.py (``package_dir``):

- ``loc3r.model``        PyTorch definitions and checkpoint I/O
- ``loc3r.export``       torch -> ONNX / TensorRT model packages
- ``loc3r.calibration``  calibration sets and range caches
- ``loc3r.kernels``      Triton kernels and their references
- ``loc3r.runtime``      the torch-free streaming runtime
- ``loc3r.synthetic``    procedural rooms, questions, metrics, demo training

Importing ``loc3r`` imports nothing heavy.
"""

__version__ = "0.1.0"
