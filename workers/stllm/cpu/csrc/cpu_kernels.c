// CPU kernels for bf16 serving, built and loaded by workers/stllm/cpu_kernels.py (which says when each is used):
// attention on AMX tiles (Intel Sapphire Rapids and later), and a Llama decoder's RMSNorm and rotary
// embedding in one AVX-512 pass each (at the end of this file).
//
// Attention: out = softmax(scale * Q K^T + mask) V for every (batch, head), head size 64, queries and keys of
// one length, grouped K/V heads (GQA) and an optional additive bf16 mask shared by the heads. One (batch,
// K/V head) at a time, per thread: K and V are packed into the tile unit's pair-interleaved layout (K
// transposed) once for the query heads that share them, then 32 query rows at a time: S = Q K^T on the tiles
// (fp32), each row's softmax over all its keys with AVX-512 (the whole row fits in L2: no running rescale as
// in flash attention), P rounded to bf16 as SDPA does, O = P V on the tiles, divided by the row's sum and
// written as bf16 into (B, T, H, 64). The 32-row blocks run as a pipeline in which the tile unit's products
// overlap the vector unit's softmax.
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define D 64
typedef uint16_t bf16;

// Asks the kernel for the tile registers' state (Linux 5.16+). 0 on success.
int stllm_attention_init(void) {
  return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

typedef struct {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static void configure_tiles(void) {  // 8 tiles of 16 rows x 64 bytes
  tile_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

// 2^t for t <= 0: t = n + f with f in [-0.5, 0.5], 2^f by a degree-3 polynomial fitted for relative error
// (at most 7.5e-5: the probabilities are rounded to bf16 next, whose steps are 2^-8 apart); scalef returns 0
// below the smallest float.
static inline __m512 exp2_ps(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.0551716531f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.242611162f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693260992f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999928071f));
  return _mm512_scalef_ps(p, n);
}

static inline __m512i to_bf16(__m512 low, __m512 high) {  // 32 floats -> 32 bf16, round to nearest even
  return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

// 16 x 16 transpose of 32-bit elements: r[i] holds row i before, column i after.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // r[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; j++) {
    const __m512i x = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), y = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
    const __m512i z = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i w = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
    t[j] = _mm512_shuffle_i32x4(x, z, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(x, z, 0xdd);
    t[8 + j] = _mm512_shuffle_i32x4(y, w, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(y, w, 0xdd);
  }
  memcpy(r, t, sizeof t);
}

typedef struct {
  const bf16 *q, *k, *v, *mask;
  bf16 *out;
  long B, H, Hkv, T;
  long qs[3], ks[3], vs[3];  // element strides of batch, head and token; the head dimension is contiguous
  long ms[2];                // the mask's strides of batch and query row; its key dimension is contiguous
  float scale;
  long first, last;  // this thread's (batch, K/V head) pairs
} job;

static inline __mmask16 first_n(long n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

typedef struct {  // the softmax of one block of 32 query rows, computed in units of 32 keys of a row
  bf16 *p;        // the probabilities, (32, T32)
  long T, T32;    // keys, and keys padded to whole 32-key steps
  float c;        // scale x log2(e)
  float running_max[32][16] __attribute__((aligned(64)));
  float running_sum[32][16] __attribute__((aligned(64)));
  float max[32], inverse_sum[32];  // per row, once its last unit is done
} softmax_state;

// One unit of the row maxima: 32 keys of row r at step k (keys past T left out). With a mask, the mask's
// row r (of the block's rows that exist) is added to the scores first, in place.
static inline void max_unit(softmax_state *st, float *s, long r, long k, const bf16 *mask, long mask_row, long rows) {
  float *sr = s + r * st->T32 + k * 32;
  const long left = st->T - k * 32;
  if (mask && r < rows) {
    const bf16 *mr = mask + r * mask_row + k * 32;
    const __m512i m0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first_n(left), mr));
    const __m512i m1 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first_n(left - 16), mr + 16));
    _mm512_store_ps(sr, _mm512_add_ps(_mm512_load_ps(sr), _mm512_castsi512_ps(_mm512_slli_epi32(m0, 16))));
    _mm512_store_ps(sr + 16, _mm512_add_ps(_mm512_load_ps(sr + 16), _mm512_castsi512_ps(_mm512_slli_epi32(m1, 16))));
  }
  __m512 m = k == 0 ? _mm512_set1_ps(-__builtin_inff()) : _mm512_load_ps(st->running_max[r]);
  m = _mm512_mask_max_ps(m, first_n(left), m, _mm512_load_ps(sr));
  m = _mm512_mask_max_ps(m, first_n(left - 16), m, _mm512_load_ps(sr + 16));
  if ((k + 1) * 32 >= st->T32) st->max[r] = _mm512_reduce_max_ps(m);
  else _mm512_store_ps(st->running_max[r], m);
}

// One unit of the exponentials: 32 keys of row r at step k, rounded to bf16 into P; the row's sum is of the
// rounded values, the ones P V multiplies. Keys past T get probability 0.
static inline void exp_unit(softmax_state *st, const float *s, long r, long k) {
  const float *sr = s + r * st->T32 + k * 32;
  const long left = st->T - k * 32;
  const __m512 vc = _mm512_set1_ps(st->c), shift = _mm512_set1_ps(-st->max[r] * st->c);
  __m512 e0 = exp2_ps(_mm512_fmadd_ps(_mm512_load_ps(sr), vc, shift));
  __m512 e1 = exp2_ps(_mm512_fmadd_ps(_mm512_load_ps(sr + 16), vc, shift));
  if (left < 32) {
    e0 = _mm512_maskz_mov_ps(first_n(left), e0);
    e1 = _mm512_maskz_mov_ps(first_n(left - 16), e1);
  }
  const __m512i pb = to_bf16(e0, e1);
  _mm512_store_si512((__m512i *)(st->p + r * st->T32 + k * 32), pb);
  __m512 sum = k == 0 ? _mm512_setzero_ps() : _mm512_load_ps(st->running_sum[r]);
  sum = _mm512_dpbf16_ps(sum, (__m512bh)pb, (__m512bh)_mm512_set1_epi16(0x3f80));  // + 1.0 x each bf16
  if ((k + 1) * 32 >= st->T32) st->inverse_sum[r] = 1.f / _mm512_reduce_add_ps(sum);
  else _mm512_store_ps(st->running_sum[r], sum);
}

// K and V of batch b, K/V head g, packed for the tile unit.
static void pack_kv(const job *a, long b, long g, bf16 *kp, bf16 *vp) {
  const long T = a->T, T32 = (T + 31) / 32 * 32;  // keys padded to whole 32-key steps
  const bf16 *K = a->k + b * a->ks[0] + g * a->ks[1], *V = a->v + b * a->vs[0] + g * a->vs[1];
  // K^T packed: per 16 keys and per half of the head (32 values), row kk holds the pairs
  // (K[key][2kk], K[key][2kk + 1]) of the 16 keys.
  for (long j = 0; j < T32 / 16; j++)
    for (int c = 0; c < 2; c++) {
      __m512i r[16];
      for (int n = 0; n < 16; n++)
        r[n] = j * 16 + n < T ? _mm512_loadu_si512(K + (j * 16 + n) * a->ks[2] + c * 32) : _mm512_setzero_si512();
      transpose16(r);
      for (int kk = 0; kk < 16; kk++) _mm512_store_si512((__m512i *)(kp + j * 1024 + c * 512 + kk * 32), r[kk]);
    }
  // V packed: per 32 keys and per 16 output values, row kk interleaves keys 2kk and 2kk + 1
  static const uint16_t interleave[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                          8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_loadu_si512(interleave), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (long j = 0; j < T32 / 32; j++)
    for (int kk = 0; kk < 16; kk++) {
      const long k0 = j * 32 + 2 * kk;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
      if (k0 < T) {
        a0 = _mm512_loadu_si512(V + k0 * a->vs[2]);
        a1 = _mm512_loadu_si512(V + k0 * a->vs[2] + 32);
      }
      if (k0 + 1 < T) {
        b0 = _mm512_loadu_si512(V + (k0 + 1) * a->vs[2]);
        b1 = _mm512_loadu_si512(V + (k0 + 1) * a->vs[2] + 32);
      }
      bf16 *dst = vp + j * 2048 + kk * 32;
      _mm512_store_si512((__m512i *)dst, _mm512_permutex2var_epi16(a0, low, b0));
      _mm512_store_si512((__m512i *)(dst + 512), _mm512_permutex2var_epi16(a0, high, b0));
      _mm512_store_si512((__m512i *)(dst + 1024), _mm512_permutex2var_epi16(a1, low, b1));
      _mm512_store_si512((__m512i *)(dst + 1536), _mm512_permutex2var_epi16(a1, high, b1));
    }
}

// Query head h of batch b over the packed K and V.
static void one_head(const job *a, long b, long h, const bf16 *kp, const bf16 *vp, float *s, bf16 *p,
                     bf16 *qpad, float *o) {
  const long T = a->T, T32 = (T + 31) / 32 * 32;
  const bf16 *Q = a->q + b * a->qs[0] + h * a->qs[1];
  const bf16 *mask = a->mask ? a->mask + b * a->ms[0] : NULL;
  const float c = a->scale * 1.44269504f;  // exp(scale (x - max)) = 2^(c x - c max)
  const long steps = T32 / 32, blocks = (T + 31) / 32;
  // Query blocks of 32 rows run as a pipeline, so that the tile unit's products and the vector unit's
  // softmax overlap: block i's scores are computed while block i - 1's exponentials are, and block i - 1's
  // product with V while block i's row maxima are.
  softmax_state st = {.p = p, .T = T, .T32 = T32, .c = c};
  for (long i = 0; i <= blocks; i++) {
    float *si = s + (i % 2) * 32 * T32, *sprev = s + ((i + 1) % 2) * 32 * T32;
    long done = 0;  // units of block i - 1's exponentials
    if (i < blocks) {
      const long q0 = i * 32, rows = T - q0 < 32 ? T - q0 : 32;
      const bf16 *qb = Q + q0 * a->qs[2];  // 32 query rows, read in place unless the last rows are short
      long stride = a->qs[2] * 2;
      if (rows < 32) {
        for (int r = 0; r < 32; r++)
          if (r < rows) memcpy(qpad + r * D, Q + (q0 + r) * a->qs[2], D * 2);
          else memset(qpad + r * D, 0, D * 2);
        qb = qpad;
        stride = D * 2;
      }
      // S = Q K^T. Tiles 0-3: Q (rows 0-15 and 16-31, each half of the head); 4: K^T; 5, 6: S
      _tile_loadd(0, qb, stride);
      _tile_loadd(1, qb + 32, stride);
      _tile_loadd(2, (const char *)qb + 16 * stride, stride);
      _tile_loadd(3, (const char *)qb + 16 * stride + 64, stride);
      for (long j = 0; j < T32 / 16; j++) {
        _tile_zero(5);
        _tile_zero(6);
        _tile_loadd(4, kp + j * 1024, 64);
        _tile_dpbf16ps(5, 0, 4);
        _tile_dpbf16ps(6, 2, 4);
        _tile_loadd(4, kp + j * 1024 + 512, 64);
        _tile_dpbf16ps(5, 1, 4);
        _tile_dpbf16ps(6, 3, 4);
        _tile_stored(5, si + j * 16, T32 * 4);
        _tile_stored(6, si + 16 * T32 + j * 16, T32 * 4);
        if (i > 0)
          for (int u = 0; u < 16; u++, done++) exp_unit(&st, sprev, done / steps, done % steps);
      }
    }
    if (i > 0)
      for (; done < 32 * steps; done++) exp_unit(&st, sprev, done / steps, done % steps);
    long maxed = 0;  // units of block i's row maxima
    const long irows = T - i * 32 < 32 ? T - i * 32 : 32;  // block i's rows that exist (if i < blocks)
    const bf16 *mrows = mask ? mask + i * 32 * a->ms[1] : NULL;
    if (i > 0) {  // O = P V for block i - 1, 16 rows at a time. Tile 0: P; 1: V; 4-7: O (16 values each)
      const long q0 = (i - 1) * 32, rows = T - q0 < 32 ? T - q0 : 32;
      for (int half = 0; half < 2 && half * 16 < rows; half++) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        const bf16 *ph = p + half * 16 * T32;
        for (long j = 0; j < steps; j++) {
          const bf16 *vj = vp + j * 2048;
          _tile_loadd(0, ph + j * 32, T32 * 2);
          _tile_loadd(1, vj, 64);
          _tile_dpbf16ps(4, 0, 1);
          _tile_loadd(1, vj + 512, 64);
          _tile_dpbf16ps(5, 0, 1);
          _tile_loadd(1, vj + 1024, 64);
          _tile_dpbf16ps(6, 0, 1);
          _tile_loadd(1, vj + 1536, 64);
          _tile_dpbf16ps(7, 0, 1);
          if (i < blocks)
            for (int u = 0; u < 16; u++, maxed++) max_unit(&st, si, maxed / steps, maxed % steps, mrows, a->ms[1], irows);
        }
        _tile_stored(4, o, D * 4);
        _tile_stored(5, o + 16, D * 4);
        _tile_stored(6, o + 32, D * 4);
        _tile_stored(7, o + 48, D * 4);
        for (int r = 0; r < 16 && half * 16 + r < rows; r++) {
          const long row = half * 16 + r;
          const __m512 w = _mm512_set1_ps(st.inverse_sum[row]);
          bf16 *dst = a->out + ((b * T + q0 + row) * a->H + h) * D;
          const float *src = o + r * D;
          _mm512_storeu_si512((__m512i *)dst,
                              to_bf16(_mm512_mul_ps(_mm512_load_ps(src), w), _mm512_mul_ps(_mm512_load_ps(src + 16), w)));
          _mm512_storeu_si512((__m512i *)(dst + 32), to_bf16(_mm512_mul_ps(_mm512_load_ps(src + 32), w),
                                                             _mm512_mul_ps(_mm512_load_ps(src + 48), w)));
        }
      }
    }
    if (i < blocks)
      for (; maxed < 32 * steps; maxed++) max_unit(&st, si, maxed / steps, maxed % steps, mrows, a->ms[1], irows);
  }
}

static void *run(void *arg) {
  const job *a = arg;
  const long T32 = (a->T + 31) / 32 * 32;
  // per thread: packed K and V, two blocks of 32 rows of scores, one of probabilities, padded queries, 16
  // output rows
  const size_t kv = (size_t)T32 * D * 2, sz = (size_t)2 * 32 * T32 * 4, pz = (size_t)32 * T32 * 2;
  char *buf = aligned_alloc(64, 2 * kv + sz + pz + 32 * D * 2 + 16 * D * 4);
  if (!buf) return (void *)1;
  bf16 *kp = (bf16 *)buf, *vp = (bf16 *)(buf + kv);
  float *s = (float *)(buf + 2 * kv);
  bf16 *p = (bf16 *)(buf + 2 * kv + sz), *qpad = (bf16 *)(buf + 2 * kv + sz + pz);
  float *o = (float *)(buf + 2 * kv + sz + pz + 32 * D * 2);
  configure_tiles();
  const long group = a->H / a->Hkv;  // query heads per K/V head
  for (long bg = a->first; bg < a->last; bg++) {
    const long b = bg / a->Hkv, g = bg % a->Hkv;
    pack_kv(a, b, g, kp, vp);
    for (long h = g * group; h < (g + 1) * group; h++) one_head(a, b, h, kp, vp, s, p, qpad, o);
  }
  _tile_release();
  free(buf);
  return NULL;
}

// q: bf16 (B, H, T, 64), k and v: (B, Hkv, T, 64), H a multiple of Hkv, with the given element strides
// (batch, head, token; the last dimension contiguous). mask: NULL, or an additive bf16 mask (B, T, T) with
// strides ms (batch, query row; keys contiguous), the same for every head. out: bf16 (B, T, H, 64),
// contiguous. Splits the B x Hkv K/V heads evenly over `threads` threads (the caller's and threads - 1
// more). Returns 0; -1 if a buffer could not be allocated; -2 if the kernel refused the tile state (asked
// on every call: cheap, and right in a forked worker too).
int stllm_attention(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *mask, bf16 *out, long B, long H,
                    long Hkv, long T, const long *qs, const long *ks, const long *vs, const long *ms, float scale,
                    int threads) {
  if (stllm_attention_init() != 0) return -2;
  const long pairs = B * Hkv;
  if (threads < 1) threads = 1;
  if (threads > 256) threads = 256;
  if (threads > pairs) threads = (int)pairs;
  job jobs[256];
  pthread_t ids[256];
  int started[256] = {0}, failed = 0;
  for (int t = 0; t < threads; t++) {
    job j = {q,     k,     v,     mask,  out,   B,     H,     Hkv,   T,
             {qs[0], qs[1], qs[2]},     {ks[0], ks[1], ks[2]},     {vs[0], vs[1], vs[2]},
             {mask ? ms[0] : 0, mask ? ms[1] : 0},     scale, pairs * t / threads, pairs * (t + 1) / threads};
    jobs[t] = j;
  }
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
  for (int t = 1; t < threads; t++)  // a thread that could not start: its heads run here
    if (!started[t]) failed |= run(&jobs[t]) != NULL;
  failed |= run(&jobs[0]) != NULL;
  for (int t = 1; t < threads; t++)
    if (started[t]) {
      void *r;
      pthread_join(ids[t], &r);
      failed |= r != NULL;
    }
  return failed ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------------------
// Element-wise kernels of a Llama decoder layer in bf16, one pass each, with the eager module's roundings.

typedef void (*range_fn)(const void *arg, long first, long last);
typedef struct {
  range_fn fn;
  const void *arg;
  long first, last;
} range_job;

static void *range_run(void *p) {
  const range_job *j = p;
  j->fn(j->arg, j->first, j->last);
  return NULL;
}

// fn over [0, n) split evenly over `threads` threads (the caller's and threads - 1 more).
static void parallel_for(range_fn fn, const void *arg, long n, int threads) {
  if (threads > n) threads = (int)n;
  if (threads > 64) threads = 64;
  if (threads < 1) threads = 1;
  range_job jobs[64];
  pthread_t ids[64];
  int started[64] = {0};
  for (int t = 0; t < threads; t++) {
    range_job j = {fn, arg, n * t / threads, n * (t + 1) / threads};
    jobs[t] = j;
  }
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, range_run, &jobs[t]) == 0;
  for (int t = 1; t < threads; t++)
    if (!started[t]) range_run(&jobs[t]);
  range_run(&jobs[0]);
  for (int t = 1; t < threads; t++)
    if (started[t]) pthread_join(ids[t], NULL);
}

static inline __m512 load_bf16(const bf16 *p) {  // 16 bf16 -> 16 floats (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i to_bf16_16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }  // round to nearest even

static inline __m512 round_bf16(__m512 x) {  // x rounded to bf16, as a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(x)), 16));
}

typedef struct {
  const bf16 *x, *w;
  bf16 *out;
  long width, x_row;
  float eps;
} rms_args;

static void rms_rows(const void *p, long first, long last) {
  const rms_args *a = p;
  for (long r = first; r < last; r++) {
    const bf16 *x = a->x + r * a->x_row;
    bf16 *o = a->out + r * a->width;
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < a->width; i += 16) {
      const __m512 v = load_bf16(x + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float mean = _mm512_reduce_add_ps(acc) / (float)a->width;
    const __m512 s = _mm512_set1_ps(1.f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + a->eps))));
    for (long i = 0; i < a->width; i += 16) {
      const __m512 h = round_bf16(_mm512_mul_ps(load_bf16(x + i), s));  // (x / rms(x)).to(bf16)
      _mm256_storeu_si256((__m256i *)(o + i), to_bf16_16(_mm512_mul_ps(h, load_bf16(a->w + i))));  // weight * h
    }
  }
}

// Llama's RMSNorm: out = weight * (x * rsqrt(mean(x^2) + eps)).to(bf16), the mean in fp32. x: `rows` rows of
// `width` (a multiple of 16) bf16 values, x_row apart; out: contiguous.
void stllm_rms_norm(const bf16 *x, const bf16 *w, bf16 *out, long rows, long width, long x_row, float eps,
                    int threads) {
  const rms_args a = {x, w, out, width, x_row, eps};
  parallel_for(rms_rows, &a, rows, rows * width < 65536 ? 1 : threads);
}

typedef struct {
  const bf16 *x, *cos, *sin;
  bf16 *out;
  long T, H;
  long xs[3], cs[2];
} rope_args;

static void rope_rows(const void *p, long first, long last) {
  const rope_args *a = p;
  for (long r = first; r < last; r++) {  // r: (b, t, h), the output's row order
    const long b = r / (a->T * a->H), t = r / a->H % a->T, h = r % a->H;
    const bf16 *x = a->x + b * a->xs[0] + h * a->xs[1] + t * a->xs[2];
    const bf16 *c = a->cos + b * a->cs[0] + t * a->cs[1], *s = a->sin + b * a->cs[0] + t * a->cs[1];
    const __m512 x0 = load_bf16(x), x1 = load_bf16(x + 16), x2 = load_bf16(x + 32), x3 = load_bf16(x + 48);
    const __m512 rotated[4] = {_mm512_sub_ps(_mm512_setzero_ps(), x2), _mm512_sub_ps(_mm512_setzero_ps(), x3), x0, x1};
    const __m512 xs[4] = {x0, x1, x2, x3};
    bf16 *o = a->out + r * D;
    for (int i = 0; i < 4; i++) {  // (x * cos) + (rotate_half(x) * sin), each product rounded to bf16
      const __m512 y = _mm512_add_ps(round_bf16(_mm512_mul_ps(xs[i], load_bf16(c + 16 * i))),
                                     round_bf16(_mm512_mul_ps(rotated[i], load_bf16(s + 16 * i))));
      _mm256_storeu_si256((__m256i *)(o + 16 * i), to_bf16_16(y));
    }
  }
}

// Rotary position embedding as Llama applies it: (x * cos) + (rotate_half(x) * sin) in bf16, with the same
// roundings. x: (B, H, T, 64) with element strides xs (batch, head, token); cos, sin: (B, T, 64) with strides
// cs (batch, token); the last dimensions contiguous. out: (B, T, H, 64), contiguous.
void stllm_rope(const bf16 *x, const bf16 *cos, const bf16 *sin, bf16 *out, long B, long H, long T, const long *xs,
                const long *cs, int threads) {
  const rope_args a = {x, cos, sin, out, T, H, {xs[0], xs[1], xs[2]}, {cs[0], cs[1]}};
  parallel_for(rope_rows, &a, B * T * H, B * T * H * D < 65536 ? 1 : threads);
}
