/* Linear layers for a few dozen rows (decode steps) on AVX-512: out = x @ W^T + bias, fp32, and bf16 through
 * AVX512_BF16 dot products (no AMX needed).
 *
 * A decode step multiplies a few dozen rows by every weight of the model once: the product is bound by streaming
 * the weights from memory and, at 32 rows in fp32, by the FMA units too. oneDNN's packed GEMM re-blocks such a
 * product for large row counts and reaches well under the bandwidth there. Here the weight is packed once into
 * groups of 64 output columns, contiguous over K ([N / 64][K][64] in fp32; [N / 64][K / 2][64][2] k-pairs in bf16,
 * the layout vdpbf16ps reads), so a group is one sequential stream. A thread takes whole groups; for each group,
 * every block of 6 rows of x accumulates a 6 x 64 block of out in 24 registers over K (one weight load feeds 6
 * FMAs), while the next group is prefetched, so the memory stream and the arithmetic overlap. The group's weights
 * stay in L2 between the row blocks. The products are summed in chunks of 64 along K, the chunks' sums then added
 * up, which keeps the rounding error near a blocked GEMM's rather than growing with K. Columns past N (the last group, N not a multiple of 64) are zero in the packed
 * weight and masked on store.
 *
 * The caller keeps oneDNN for large row counts (prefill), where its blocking of x wins. Without AVX-512 in the
 * compiler's target, hf_small_linear_available() returns 0 and nothing else is called; without AVX512_BF16,
 * hf_small_linear_bf16_available() returns 0.
 */
#include <stdint.h>
#include <string.h>


#define GROUP 64     /* output columns per packed group: 4 zmm vectors of fp32 */
#define ROW_BLOCK 6  /* rows of x per register block: 6 x 4 accumulators */
#define K_CHUNK 64   /* products summed in registers before they join the running sum (closer to F.linear's error) */

#if defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

int hf_small_linear_available(void) { return 1; }

static inline long num_groups(long N) { return (N + GROUP - 1) / GROUP; }

/* Store 64 fp32 (4 vectors) of one output row, plus bias, keeping only the first `cols` columns. */
static inline void store_f32(float *out, __m512 *acc, const float *bias, long cols) {
    for (int j = 0; j < 4; j++) {
        long left = cols - 16L * j;
        if (left <= 0) break;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 v = acc[j];
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + 16 * j));
        _mm512_mask_storeu_ps(out + 16 * j, m, v);
    }
}

/* One block of up to ROW_BLOCK rows of x against one packed group (block_f32, block_bf16), prefetching the next. */
typedef void (*block_fn)(const void *x_rows, long x_stride, int rows, const void *group, long K, void *out_rows,
                         long out_stride, const void *group_bias, long cols, const char *next, long next_bytes,
                         long *prefetched);

/* out = x @ W^T (+ bias) over all groups: a thread takes whole groups, and every block of rows of x against each;
 * `es` is the element size in bytes (strides are in elements). */
static void run_groups(block_fn block, long es, const void *x, long x_stride, long M, const void *packed,
                       const void *bias, long N, long K, void *out, long out_stride, int num_threads) {
    const long groups = num_groups(N), group_bytes = K * GROUP * es;
#pragma omp parallel num_threads(num_threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long g0 = groups * t / T, g1 = groups * (t + 1) / T;
        for (long g = g0; g < g1; g++) {
            const char *wg = (const char *)packed + g * group_bytes;
            const long cols = N - g * GROUP < GROUP ? N - g * GROUP : GROUP;
            long prefetched = 0;
            for (long r = 0; r < M; r += ROW_BLOCK)
                block((const char *)x + r * x_stride * es, x_stride, (int)(M - r < ROW_BLOCK ? M - r : ROW_BLOCK), wg,
                      K, (char *)out + (r * out_stride + g * GROUP) * es, out_stride,
                      bias ? (const char *)bias + g * GROUP * es : NULL, cols, wg + group_bytes,
                      g + 1 < g1 ? group_bytes : 0, &prefetched);
        }
    }
}

/* W [N, K] fp32 rows (row stride w_stride) -> packed ([N / 64] (rounded up) * K * 64 floats). */
void hf_small_linear_pack_f32(const float *w, long w_stride, long N, long K, float *packed) {
#pragma omp parallel for schedule(static)
    for (long g = 0; g < num_groups(N); g++)
        for (long k = 0; k < K; k++)
            for (long c = 0; c < GROUP; c++) {
                long n = g * GROUP + c;
                packed[(g * K + k) * GROUP + c] = n < N ? w[n * w_stride + k] : 0.0f;
            }
}

static void block_f32(const void *x_rows, long x_stride, int rows, const void *group, long K, void *out_rows,
                      long out_stride, const void *group_bias, long cols, const char *next, long next_bytes,
                      long *prefetched) {
    const float *x = x_rows, *wg = group, *bias = group_bias;
    float *out = out_rows;
    __m512 acc[ROW_BLOCK][4], sum[ROW_BLOCK][4];
    for (int r = 0; r < ROW_BLOCK; r++)
        for (int j = 0; j < 4; j++) sum[r][j] = _mm512_setzero_ps();
    for (long k0 = 0; k0 < K; k0 += K_CHUNK) {
        const long k1 = K - k0 < K_CHUNK ? K : k0 + K_CHUNK;
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        for (long k = k0; k < k1; k++) {
            const float *wk = wg + k * GROUP;
            __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
            __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
            if (*prefetched < next_bytes) {
                _mm_prefetch(next + *prefetched, _MM_HINT_T1);
                *prefetched += 64;
            }
#define HF_ROW_F32(r)                                                       \
            if ((r) < rows) {                                               \
                __m512 xv = _mm512_set1_ps(x[(r) * x_stride + k]);          \
                acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);             \
                acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);             \
                acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);             \
                acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);             \
            }
            HF_ROW_F32(0) HF_ROW_F32(1) HF_ROW_F32(2) HF_ROW_F32(3) HF_ROW_F32(4) HF_ROW_F32(5)
#undef HF_ROW_F32
        }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < 4; j++) sum[r][j] = _mm512_add_ps(sum[r][j], acc[r][j]);
    }
    for (int r = 0; r < rows; r++) store_f32(out + r * out_stride, sum[r], bias, cols);
}

/* out [M, N] (row stride out_stride) = x [M, K] (row stride x_stride) @ W^T (+ bias [N]); 0 on success. */
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads) {
    run_groups(block_f32, sizeof(float), x, x_stride, M, packed, bias, N, K, out, out_stride, num_threads);
    return 0;
}

#if defined(__AVX512BF16__)
int hf_small_linear_bf16_available(void) { return 1; }

/* W [N, K] bf16 rows (K even) -> packed ([N / 64] (rounded up) * K * 64 bf16) in k-pairs: [g][K / 2][64][2]. */
void hf_small_linear_pack_bf16(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
#pragma omp parallel for schedule(static)
    for (long g = 0; g < num_groups(N); g++)
        for (long kp = 0; kp < K / 2; kp++)
            for (long c = 0; c < GROUP; c++)
                for (int e = 0; e < 2; e++) {
                    long n = g * GROUP + c;
                    packed[((g * (K / 2) + kp) * GROUP + c) * 2 + e] = n < N ? w[n * w_stride + 2 * kp + e] : 0;
                }
}

static inline __m512 bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static void block_bf16(const void *x_rows, long x_stride, int rows, const void *group, long K, void *out_rows,
                       long out_stride, const void *group_bias, long cols, const char *next, long next_bytes,
                       long *prefetched) {
    const uint16_t *x = x_rows, *wg = group, *bias = group_bias;
    uint16_t *out = out_rows;
    __m512 acc[ROW_BLOCK][4], sum[ROW_BLOCK][4];
    for (int r = 0; r < ROW_BLOCK; r++)
        for (int j = 0; j < 4; j++) sum[r][j] = _mm512_setzero_ps();
    for (long p0 = 0; p0 < K / 2; p0 += K_CHUNK / 2) {
        const long p1 = K / 2 - p0 < K_CHUNK / 2 ? K / 2 : p0 + K_CHUNK / 2;
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        for (long kp = p0; kp < p1; kp++) {
            const uint16_t *wk = wg + kp * GROUP * 2;
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
            __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
            if (*prefetched < next_bytes) {
                _mm_prefetch(next + *prefetched, _MM_HINT_T1);
                *prefetched += 64;
            }
#define HF_ROW_BF16(r)                                                                    \
            if ((r) < rows) {                                                             \
                int32_t pair;                                                             \
                memcpy(&pair, x + (r) * x_stride + 2 * kp, sizeof pair);                  \
                __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                          \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);                          \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);                          \
                acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);                          \
                acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, w3);                          \
            }
            HF_ROW_BF16(0) HF_ROW_BF16(1) HF_ROW_BF16(2) HF_ROW_BF16(3) HF_ROW_BF16(4) HF_ROW_BF16(5)
#undef HF_ROW_BF16
        }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < 4; j++) sum[r][j] = _mm512_add_ps(sum[r][j], acc[r][j]);
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++) {
            long left = cols - 16L * j;
            if (left <= 0) break;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = sum[r][j];
            if (bias) v = _mm512_add_ps(v, bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, bias + 16 * j)));
            _mm256_mask_storeu_epi16(out + r * out_stride + 16 * j, m, (__m256i)_mm512_cvtneps_pbh(v));
        }
}

/* out [M, N] bf16 = x [M, K] bf16 @ W^T (+ bias [N] bf16), accumulated in fp32, rounded once (nearest even);
 * K even. 0 on success. */
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads) {
    if (K % 2) return -1;
    run_groups(block_bf16, sizeof(uint16_t), x, x_stride, M, packed, bias, N, K, out, out_stride, num_threads);
    return 0;
}
#endif /* __AVX512BF16__ */

#else /* no AVX-512 */
int hf_small_linear_available(void) { return 0; }
void hf_small_linear_pack_f32(const float *w, long w_stride, long N, long K, float *packed) {
    (void)w, (void)w_stride, (void)N, (void)K, (void)packed;
}
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads) {
    (void)x, (void)x_stride, (void)M, (void)packed, (void)bias, (void)N, (void)K, (void)out, (void)out_stride;
    (void)num_threads;
    return -1;
}
#endif /* __AVX512F__ */

#if !(defined(__AVX512F__) && defined(__AVX512BF16__))
int hf_small_linear_bf16_available(void) { return 0; }
void hf_small_linear_pack_bf16(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
    (void)w, (void)w_stride, (void)N, (void)K, (void)packed;
}
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads) {
    (void)x, (void)x_stride, (void)M, (void)packed, (void)bias, (void)N, (void)K, (void)out, (void)out_stride;
    (void)num_threads;
    return -1;
}
#endif
