"""loc3r.model: PyTorch definitions of Loc3R-VLM and checkpoint I/O.

Import submodules directly (``from loc3r.model.config import get_config``);
this package imports nothing heavy on its own.
"""
