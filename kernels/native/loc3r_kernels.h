/* Host-side entry points over the AOT kernels: shape checks, variant choice, grids.
 *
 * Used by the TensorRT plugin and any C/C++ runtime. Tensors are contiguous fp16 device
 * buffers in the layouts of kernels/README.md; int32 offsets (each tensor < 2^31 elements).
 * Every function returns CUDA_SUCCESS, a driver error, CUDA_ERROR_INVALID_VALUE for an
 * unsupported shape, or CUDA_ERROR_NOT_FOUND when the needed variant was not built.
 */
#ifndef LOC3R_KERNELS_H
#define LOC3R_KERNELS_H

#include <cuda.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int batch;        /* B */
  int num_heads;    /* H, a multiple of num_kv_heads, H / KVH <= 16 */
  int num_kv_heads; /* KVH */
  int q_len;        /* T new tokens */
  int cache_len;    /* S, cache capacity (>= prefix_len + T) */
  int head_dim;     /* 64 or 128 */
  float scale;      /* softmax scale, usually 1/sqrt(head_dim) */
  int causal;       /* 1: query i sees keys j <= prefix + i; 0: all j < prefix + T */
} Loc3rAttentionShape;

/* Bytes of scratch loc3r_attention_fp16 needs (0 unless it takes the split-K decode path). */
size_t loc3r_attention_workspace_size(const Loc3rAttentionShape *shape);

/* out (B,H,T,D) = attention of q (B,H,T,D) over caches k, v (B,KVH,S,D); prefix_lens (B,) int32.
 * T == 1 with causal=1 runs flash-decoding (split-K + reduction) in `workspace`. */
CUresult loc3r_attention_fp16(CUstream stream, const Loc3rAttentionShape *shape, CUdeviceptr q, CUdeviceptr k,
                              CUdeviceptr v, CUdeviceptr prefix_lens, CUdeviceptr out, CUdeviceptr workspace);

typedef struct {
  int m;               /* activation rows */
  int n;               /* output features */
  int k;               /* input features */
  int block_size;      /* 32 or 128 */
  int has_zero_points; /* 0: zero point 8 */
} Loc3rW4A16Shape;

/* y (M,N) fp16 = x (M,K) fp16 @ dequant(B).T with B, scales, zero_points in MatMulNBits layout. */
CUresult loc3r_w4a16_matmul_fp16(CUstream stream, const Loc3rW4A16Shape *shape, CUdeviceptr x, CUdeviceptr packed,
                                 CUdeviceptr scales, CUdeviceptr zero_points, CUdeviceptr y);

/* Split count flash-decoding uses for a cache of capacity cache_len (same rule as Python). */
int loc3r_decode_num_splits(int cache_len, int *split_size);

#ifdef __cplusplus
}
#endif
#endif
