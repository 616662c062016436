/* See loc3r_kernels.h. Argument order mirrors the @triton.jit signatures in kernels/ (Python). */
#include "loc3r_kernels.h"

#include <stdio.h>

#include "loc3r_aot_runtime.h"

#define PREFILL_BLOCK_M 64
#define DECODE_BLOCK_N 64
#define DECODE_MAX_SPLITS 64
#define DECODE_MIN_SPLIT 256
#define DECODE_MAX_GROUP 16
#define GEMM_BLOCK 64
#define GEMV_MAX_ROWS 8

static int cdiv(int a, int b) { return (a + b - 1) / b; }
static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

int loc3r_decode_num_splits(int cache_len, int *split_size) {
  int splits = cdiv(cache_len, DECODE_MIN_SPLIT);
  if (splits > DECODE_MAX_SPLITS) splits = DECODE_MAX_SPLITS;
  if (splits < 1) splits = 1;
  int size = cdiv(cdiv(cache_len, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N;
  if (split_size) *split_size = size;
  return cdiv(cache_len, size);
}

static int is_decode(const Loc3rAttentionShape *s) { return s->q_len == 1 && s->causal; }

size_t loc3r_attention_workspace_size(const Loc3rAttentionShape *s) {
  if (!is_decode(s)) return 0;
  size_t rows = (size_t)s->batch * s->num_heads * loc3r_decode_num_splits(s->cache_len, NULL);
  return align256(rows * s->head_dim * sizeof(float)) + align256(rows * sizeof(float));
}

static int attention_shape_ok(const Loc3rAttentionShape *s) {
  return s->batch > 0 && s->num_kv_heads > 0 && s->num_heads % s->num_kv_heads == 0 && s->q_len > 0 &&
         s->cache_len >= s->q_len && (s->head_dim == 64 || s->head_dim == 128);
}

static Loc3rAotKernel *find_variant(const char *fmt, int a, const char *b) {
  char name[128];
  snprintf(name, sizeof(name), fmt, a, b);
  return loc3r_aot_find(name);
}

/* Each params array lists the kernel's arguments under their Triton names, in signature
 * order, then the two scratch pointers; tests/kernels checks them against manifest.json. */
CUresult loc3r_attention_fp16(CUstream stream, const Loc3rAttentionShape *s, CUdeviceptr q, CUdeviceptr k,
                              CUdeviceptr v, CUdeviceptr prefix_lens, CUdeviceptr out, CUdeviceptr workspace) {
  if (!attention_shape_ok(s)) return CUDA_ERROR_INVALID_VALUE;
  int32_t D = s->head_dim, H = s->num_heads, KVH = s->num_kv_heads, T = s->q_len, S = s->cache_len;
  CUdeviceptr Q = q, K = k, V = v, global_scratch = 0, profile_scratch = 0;
  float sm_scale = s->scale;
  int32_t num_heads = H, num_kv_heads = KVH, kv_group = H / KVH;
  /* k and v caches share one layout: (B, KVH, S, D) contiguous */
  int32_t stride_kb = KVH * S * D, stride_kh = S * D, stride_ks = D;
  int32_t stride_vb = stride_kb, stride_vh = stride_kh, stride_vs = stride_ks;
  if (is_decode(s) && kv_group <= DECODE_MAX_GROUP) {
    Loc3rAotKernel *split = find_variant("decode_attention_split_fp16_d%d%s", D, "");
    Loc3rAotKernel *reduce = find_variant("decode_attention_reduce_fp16_d%d%s", D, "");
    if (!split || !reduce) return CUDA_ERROR_NOT_FOUND;
    int32_t split_size;
    int32_t num_splits = loc3r_decode_num_splits(S, &split_size);
    size_t rows = (size_t)s->batch * H * num_splits;
    CUdeviceptr O_PART = workspace, LSE_PART = workspace + align256(rows * D * sizeof(float));
    CUdeviceptr KV_LENS = prefix_lens, O = out;
    int32_t stride_qb = H * D, stride_qh = D;     /* q is (B, H, 1, D) */
    int32_t kv_len_offset = 1;                    /* kv_len = prefix_len + 1 */
    void *params_split[] = {&Q, &K, &V, &O_PART, &LSE_PART, &KV_LENS, &sm_scale, &stride_qb, &stride_qh,
                            &stride_kb, &stride_kh, &stride_ks, &stride_vb, &stride_vh, &stride_vs, &num_kv_heads,
                            &kv_group, &num_splits, &split_size, &kv_len_offset,
                            &global_scratch, &profile_scratch}; /* decode_attention_split_kernel */
    CUresult rc = loc3r_aot_launch(split, stream, (unsigned)(s->batch * KVH), (unsigned)num_splits, 1, params_split);
    if (rc != CUDA_SUCCESS) return rc;
    int32_t stride_ob = H * D, stride_oh = D;
    void *params_reduce[] = {&O_PART, &LSE_PART, &O, &num_heads, &num_splits, &stride_ob, &stride_oh,
                             &global_scratch, &profile_scratch}; /* decode_attention_reduce_kernel */
    return loc3r_aot_launch(reduce, stream, (unsigned)(s->batch * H), 1, 1, params_reduce);
  }
  Loc3rAotKernel *prefill = find_variant("prefill_attention_fp16_d%d_%s", D, s->causal ? "causal" : "full");
  if (!prefill) return CUDA_ERROR_NOT_FOUND;
  CUdeviceptr O = out, PREFIX_LENS = prefix_lens;
  int32_t stride_qb = H * T * D, stride_qh = T * D, stride_qt = D; /* q and out: (B, H, T, D) contiguous */
  int32_t stride_ob = stride_qb, stride_oh = stride_qh, stride_ot = stride_qt;
  void *params_prefill[] = {&Q, &K, &V, &O, &PREFIX_LENS, &sm_scale, &stride_qb, &stride_qh, &stride_qt,
                            &stride_kb, &stride_kh, &stride_ks, &stride_vb, &stride_vh, &stride_vs, &stride_ob,
                            &stride_oh, &stride_ot, &T, &num_heads, &kv_group,
                            &global_scratch, &profile_scratch}; /* prefill_attention_kernel */
  return loc3r_aot_launch(prefill, stream, (unsigned)cdiv(T, PREFILL_BLOCK_M), (unsigned)(s->batch * H), 1,
                          params_prefill);
}

CUresult loc3r_w4a16_matmul_fp16(CUstream stream, const Loc3rW4A16Shape *s, CUdeviceptr x, CUdeviceptr packed,
                                 CUdeviceptr scales, CUdeviceptr zero_points, CUdeviceptr y) {
  if (s->m <= 0 || s->n <= 0 || s->k <= 0 || (s->block_size != 32 && s->block_size != 128))
    return CUDA_ERROR_INVALID_VALUE;
  int gemv = s->m <= GEMV_MAX_ROWS;
  Loc3rAotKernel *kernel = find_variant(gemv ? "w4a16_gemv_fp16_b%d_%s" : "w4a16_gemm_fp16_b%d_%s", s->block_size,
                                        s->has_zero_points ? "zp" : "nozp");
  if (!kernel) return CUDA_ERROR_NOT_FOUND;
  CUdeviceptr X = x, B = packed, SCALES = scales, Y = y, global_scratch = 0, profile_scratch = 0;
  CUdeviceptr ZEROS = s->has_zero_points ? zero_points : packed; /* not read when absent */
  int32_t M = s->m, N = s->n, K = s->k, n_blocks = cdiv(s->k, s->block_size), stride_xm = s->k, stride_ym = s->n;
  if (gemv) {
    void *params_gemv[] = {&X, &B, &SCALES, &ZEROS, &Y, &N, &K, &n_blocks, &stride_xm, &stride_ym,
                           &global_scratch, &profile_scratch}; /* w4a16_gemv_kernel */
    return loc3r_aot_launch(kernel, stream, (unsigned)cdiv(N, GEMM_BLOCK), (unsigned)M, 1, params_gemv);
  }
  void *params_gemm[] = {&X, &B, &SCALES, &ZEROS, &Y, &M, &N, &K, &n_blocks, &stride_xm, &stride_ym,
                         &global_scratch, &profile_scratch}; /* w4a16_gemm_kernel */
  return loc3r_aot_launch(kernel, stream, (unsigned)cdiv(M, GEMM_BLOCK), (unsigned)cdiv(N, GEMM_BLOCK), 1,
                          params_gemm);
}
