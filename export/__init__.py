"""loc3r.export: checkpoint conversion and model-package building (the PyTorch side).

The ``loc3r export`` command group lives in :mod:`loc3r.export.cli`.
"""
