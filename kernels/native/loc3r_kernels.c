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

CUresult loc3r_attention_fp16(CUstream stream, const Loc3rAttentionShape *s, CUdeviceptr q, CUdeviceptr k,
                              CUdeviceptr v, CUdeviceptr prefix_lens, CUdeviceptr out, CUdeviceptr workspace) {
  if (!attention_shape_ok(s)) return CUDA_ERROR_INVALID_VALUE;
  int32_t D = s->head_dim, H = s->num_heads, KVH = s->num_kv_heads, T = s->q_len, S = s->cache_len;
  int32_t group = H / KVH;
  float scale = s->scale;
  CUdeviceptr scratch0 = 0, scratch1 = 0; /* Triton's trailing global/profile scratch params */
  /* k and v caches share one layout: (B, KVH, S, D) contiguous */
  int32_t skb = KVH * S * D, skh = S * D, sks = D;
  if (is_decode(s) && group <= DECODE_MAX_GROUP) {
    Loc3rAotKernel *split = find_variant("decode_attention_split_fp16_d%d%s", D, "");
    Loc3rAotKernel *reduce = find_variant("decode_attention_reduce_fp16_d%d%s", D, "");
    if (!split || !reduce) return CUDA_ERROR_NOT_FOUND;
    int32_t split_size;
    int32_t splits = loc3r_decode_num_splits(S, &split_size);
    size_t rows = (size_t)s->batch * H * splits;
    CUdeviceptr o_part = workspace, lse_part = workspace + align256(rows * D * sizeof(float));
    int32_t sqb = H * D, sqh = D, offset = 1; /* q is (B,H,1,D); kv_len = prefix_len + 1 */
    void *p1[] = {&q, &k, &v, &o_part, &lse_part, &prefix_lens, &scale, &sqb, &sqh, &skb, &skh, &sks,
                  &skb, &skh, &sks, &KVH, &group, &splits, &split_size, &offset, &scratch0, &scratch1};
    CUresult rc = loc3r_aot_launch(split, stream, (unsigned)(s->batch * KVH), (unsigned)splits, 1, p1);
    if (rc != CUDA_SUCCESS) return rc;
    int32_t sob = H * D, soh = D;
    void *p2[] = {&o_part, &lse_part, &out, &H, &splits, &sob, &soh, &scratch0, &scratch1};
    return loc3r_aot_launch(reduce, stream, (unsigned)(s->batch * H), 1, 1, p2);
  }
  Loc3rAotKernel *prefill = find_variant("prefill_attention_fp16_d%d_%s", D, s->causal ? "causal" : "full");
  if (!prefill) return CUDA_ERROR_NOT_FOUND;
  int32_t sqb = H * T * D, sqh = T * D, sqt = D; /* q and out: (B, H, T, D) contiguous */
  void *params[] = {&q, &k, &v, &out, &prefix_lens, &scale, &sqb, &sqh, &sqt, &skb, &skh, &sks, &skb, &skh, &sks,
                    &sqb, &sqh, &sqt, &T, &H, &group, &scratch0, &scratch1};
  return loc3r_aot_launch(prefill, stream, (unsigned)cdiv(T, PREFILL_BLOCK_M), (unsigned)(s->batch * H), 1, params);
}

CUresult loc3r_w4a16_matmul_fp16(CUstream stream, const Loc3rW4A16Shape *s, CUdeviceptr x, CUdeviceptr packed,
                                 CUdeviceptr scales, CUdeviceptr zero_points, CUdeviceptr y) {
  if (s->m <= 0 || s->n <= 0 || s->k <= 0 || (s->block_size != 32 && s->block_size != 128))
    return CUDA_ERROR_INVALID_VALUE;
  int gemv = s->m <= GEMV_MAX_ROWS;
  Loc3rAotKernel *kernel = find_variant(gemv ? "w4a16_gemv_fp16_b%d_%s" : "w4a16_gemm_fp16_b%d_%s", s->block_size,
                                        s->has_zero_points ? "zp" : "nozp");
  if (!kernel) return CUDA_ERROR_NOT_FOUND;
  int32_t M = s->m, N = s->n, K = s->k, n_blocks = cdiv(s->k, s->block_size), sxm = s->k, sym = s->n;
  CUdeviceptr zeros = s->has_zero_points ? zero_points : packed; /* unused pointer when absent */
  CUdeviceptr scratch0 = 0, scratch1 = 0;
  if (gemv) {
    void *params[] = {&x, &packed, &scales, &zeros, &y, &N, &K, &n_blocks, &sxm, &sym, &scratch0, &scratch1};
    return loc3r_aot_launch(kernel, stream, (unsigned)cdiv(N, GEMM_BLOCK), (unsigned)M, 1, params);
  }
  void *params[] = {&x, &packed, &scales, &zeros, &y, &M, &N, &K, &n_blocks, &sxm, &sym, &scratch0, &scratch1};
  return loc3r_aot_launch(kernel, stream, (unsigned)cdiv(M, GEMM_BLOCK), (unsigned)cdiv(N, GEMM_BLOCK), 1, params);
}
