"""loc3r.kernels: fused attention and W4A16 kernels (Triton) with pure-PyTorch references.

Modules (nothing here is imported eagerly):
- ``prefill_attention`` / ``decode_attention`` / ``w4a16_gemm``: Triton kernels + references;
- ``int4_layout``: the MatMulNBits int4 layout shared with the int4 export;
- ``ops``: torch custom ops ``loc3r::*`` and the model entries ``attention`` / ``int4_linear``;
- ``onnx_symbolic``: the ``loc3r::FusedAttention`` / ``MatMulNBits`` ONNX nodes;
- ``aot``: ahead-of-time compilation for sm_87 / sm_90 (CLI: ``python -m loc3r.kernels.aot``);
- ``tensorrt_plugin``: TensorRT plugin registration (lazy).
See kernels/README.md.
"""
