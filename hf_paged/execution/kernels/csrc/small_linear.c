/* Linear layers for a few dozen rows (decode steps): out = x @ W^T + bias, fp32 and bf16, on AVX-512 (bf16 through
 * AVX512_BF16 dot products, no AMX needed) or on AVX2 + FMA (bf16 widened to fp32 in registers, fp32 FMAs).
 *
 * A decode step multiplies a few dozen rows by every weight of the model once: the product is bound by streaming the
 * weights from memory and, at 32 rows in fp32, by the FMA units too. oneDNN's packed GEMM re-blocks such a product for
 * large row counts and reaches well under the bandwidth there. Here the weight is packed once into groups of GROUP
 * output columns, contiguous over K, so a group is one sequential stream. A thread takes whole groups (from
 * PARTS_FROM_ROWS rows on, where the arithmetic binds and the groups do not divide evenly between the threads, whole
 * halves of groups on AVX-512: a column's sums are the same whoever computes them) and walks each in chunks of K_CHUNK
 * along K; every block of up to 6 rows of x (as many in each block) takes the chunk in turn (one weight load feeds 6
 * FMAs; the first block reads the chunk from memory, the others from L1) and adds its rows x GROUP partial products
 * to the group's running sums. The memory stream must run under the arithmetic, not between its
 * bursts: the hardware prefetcher only runs a little ahead of the loads, so each chunk's blocks also prefetch the chunk
 * PREFETCH_CHUNKS ahead into L2 (a single row too: the stream alone is slower), in equal shares, each spread evenly
 * over its block's k steps: issued in bursts (all of a block's share in its first steps), the prefetches leave the
 * memory idle for the rest of the block, which measurably slows products of two or more blocks. Each chunk's products
 * are summed in registers from zero and then added to the running sum, which keeps the rounding error near a blocked
 * GEMM's rather than growing with K. Columns past N (the last group, N not a multiple of GROUP) are zero in the packed
 * weight and left out on store, where the bias is added and bf16 rounded once (nearest even, as torch rounds).
 *
 *   AVX-512: GROUP 64 (4 zmm), 6 x 4 accumulators of 32 registers. fp32 [N / 64][K][64]; bf16 with AVX512_BF16
 *            in k-pairs, [N / 64][K / 2][64][2], the layout vdpbf16ps reads; without it widened as on AVX2 (below),
 *            each half of the 64 columns one load (oneDNN's bf16 GEMM there is emulated, several times slower).
 *   AVX2:    GROUP 16 (2 ymm), 6 x 2 accumulators + 2 weights + 1 broadcast of 16 registers. fp32 [N / 16][K][16];
 *            bf16 [N / 16][K][16] with the 32-bit word j holding columns j (low half) and j + 8 (high half), so one
 *            load and a shift / a mask give the group's two fp32 vectors. bf16 rows of x are widened to fp32 once
 *            per call (128 rows at a time, into a per-thread scratch buffer), so a row's broadcast is one load.
 *            The widened bf16 kernel takes any row count: without oneDNN's bf16 GEMM (a CPU without AVX-512), it is
 *            the bf16 prefill's GEMM too.
 *
 * hf_small_linear_available() returns the vector width the kernels were built for (512, 256), 0 where the target
 * has neither (nothing else is then called); hf_small_linear_bf16_available() returns 2 where bf16 is multiplied
 * as bf16 (AVX512_BF16 dot products), 1 where it is widened to fp32 (AVX2, AVX-512 without AVX512_BF16: the kernel
 * then takes every row count, prefill included), 0 without either.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hf_paged_kernels.h"

#define ROW_BLOCK 6       /* rows of x per register block */
#define K_CHUNK 64        /* products summed in registers before joining the running sum (closer to F.linear's error) */
#define PREFETCH_CHUNKS 4 /* how far ahead of the chunk being multiplied its blocks prefetch */
#define SUM_ROWS 128      /* rows of running sums a thread keeps (on its stack): more rows are taken in turns */
#define PARTS_FROM_ROWS 8 /* from this many rows of x (the arithmetic binds), threads split groups in halves too */

#if defined(__AVX512F__)
#define SMALL_LINEAR_BITS 512
#define GROUP 64 /* output columns per packed group: 4 zmm vectors of fp32 */
#define GROUP_PARTS 2 /* a group's halves (2 zmm vectors) may go to two threads */
#elif defined(__AVX2__) && defined(__FMA__)
#define SMALL_LINEAR_BITS 256
#define GROUP 16 /* 2 ymm vectors of fp32 */
#define GROUP_PARTS 1
#endif

#ifdef SMALL_LINEAR_BITS
#include <immintrin.h>
#include <omp.h>

#include "cpu_vec.h"

int hf_small_linear_available(void) { return SMALL_LINEAR_BITS; }

static inline long num_groups(long N) { return (N + GROUP - 1) / GROUP; }

/* One block of up to ROW_BLOCK rows of x against K indices [k0, k1) (one chunk) of one packed group: adds the
 * products to sums (ROW_BLOCK x GROUP floats, columns in order) and prefetches `lines` cache lines from `ahead`. */
typedef void (*block_fn)(const void *x_rows, long x_stride, int rows, const void *group, long k0, long k1,
                         float *sums, const char *ahead, long lines);

/* A packed layout's blocks: of a whole group, and of one of its GROUP_PARTS parts (`group` then points at the part's
 * first column: col_bytes a column takes in a k step of the layout). */
typedef struct {
    block_fn block, part;
    long col_bytes;
} kernel_t;

/* A block_fn `name` calling `body`, an always-inline block taking its row count as a constant, once per row count: so
 * each instance keeps its accumulators and row pointers in registers and has no per-row branches. */
#define HF_ROWS_CASE(body, n)                                                                                        \
    case n:                                                                                                          \
        body(x_rows, x_stride, n, group, k0, k1, sums, ahead, lines);                                                \
        break;
#define HF_BLOCK_BY_ROWS(name, body)                                                                                 \
    static void name(const void *x_rows, long x_stride, int rows, const void *group, long k0, long k1, float *sums,  \
                     const char *ahead, long lines) {                                                                \
        switch (rows) {                                                                                              \
            HF_ROWS_CASE(body, 1) HF_ROWS_CASE(body, 2) HF_ROWS_CASE(body, 3)                                        \
            HF_ROWS_CASE(body, 4) HF_ROWS_CASE(body, 5) HF_ROWS_CASE(body, 6)                                        \
        }                                                                                                            \
    }

/* A block's share of the prefetches: `lines` cache lines from `next` on, spread evenly over its `steps` k steps. */
typedef struct {
    const char *next;
    long lines, steps, due;
} prefetch_t;

/* One k step's prefetches into L2: those that have fallen due (lines / steps a step on average). */
static inline void prefetch_step(prefetch_t *p) {
    for (p->due += p->lines; p->due >= p->steps; p->due -= p->steps, p->next += 64) _mm_prefetch(p->next, _MM_HINT_T1);
}

/* sums (rows x GROUP fp32) + bias -> rows of out (fp32, or bf16 rounded once, nearest even); the first `cols`. */
static void store_rows(const float *sums, int rows, long cols, const void *bias, int bf16, char *out,
                       long out_stride_bytes) {
    const long es = bf16 ? 2 : 4;
    for (int r = 0; r < rows; r++) {
        const float *s = sums + r * GROUP;
        char *o = out + r * out_stride_bytes;
        long c = 0;
        for (; c + VL <= cols; c += VL) {
            vf v = *(const vf_unaligned *)(s + c);
            if (bias) v += load_vec(bf16, (const char *)bias + c * es);
            store_vec(bf16, o + c * es, v);
        }
        for (; c < cols; c++) {
            const float v = s[c] + (bias ? load_scalar(bf16, bias, c) : 0.0f);
            if (bf16) ((uint16_t *)o)[c] = f32_to_bf16(v);
            else ((float *)o)[c] = v;
        }
    }
}

/* This thread's share of out = x @ W^T (+ bias): whole groups or parts, each chunk of K against every block of rows
 * of x.
 * Element sizes in bytes: x_es of x, w_es of the packed weight, out_es of out and bias (2: bf16, rounded on store;
 * strides are in elements). */
static inline void thread_groups(const kernel_t *kernel, long x_es, long w_es, long out_es, const void *x,
                                 long x_stride, long M, const void *packed, const void *bias, long N, long K,
                                 void *out, long out_stride, int t, int T) {
    float sums[SUM_ROWS * GROUP] __attribute__((aligned(64)));
    const long groups = num_groups(N), group_bytes = K * GROUP * w_es, chunk_bytes = K_CHUNK * GROUP * w_es;
    /* Where the arithmetic binds, groups that do not split evenly between the threads split in parts (a column's
     * sums are the same whoever computes them); where the memory stream binds, whole groups keep each thread's
     * stream to itself. */
    const long parts = M >= PARTS_FROM_ROWS && groups % T ? GROUP_PARTS : 1, units = groups * parts;
    const long u0 = units * t / T, u1 = units * (t + 1) / T;
    const long g0 = u0 / parts, g1 = (u1 + parts - 1) / parts;
    const char *end = (const char *)packed + g1 * group_bytes; /* this thread's weights end here */
    for (long g = g0; g < g1; g++) {
        const char *wg = (const char *)packed + g * group_bytes;
        const long p0 = g * parts < u0 ? u0 - g * parts : 0, p1 = (g + 1) * parts > u1 ? u1 - g * parts : parts;
        const long c0 = p0 * (GROUP / parts), width = (p1 - p0) * (GROUP / parts); /* this thread's columns */
        const block_fn block = width == GROUP ? kernel->block : kernel->part;
        const char *wpart = wg + c0 * kernel->col_bytes;
        const long cols = N - g * GROUP - c0 < width ? N - g * GROUP - c0 : width;
        if (cols <= 0) continue; /* a part wholly past N */
        for (long r0 = 0; r0 < M; r0 += SUM_ROWS) {
            const long rows = M - r0 < SUM_ROWS ? M - r0 : SUM_ROWS, blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
            memset(sums, 0, sizeof(float) * rows * GROUP);
            for (long k0 = 0; k0 < K; k0 += K_CHUNK) {
                const long k1 = K - k0 < K_CHUNK ? K : k0 + K_CHUNK;
                /* Prefetch on the first pass over the group's rows only: later passes find it in L2. */
                const char *ahead = wg + k0 * GROUP * w_es + PREFETCH_CHUNKS * chunk_bytes;
                const long lines = r0 == 0 && ahead < end
                                       ? (end - ahead < chunk_bytes ? end - ahead : chunk_bytes) / 64 : 0;
                const long share = (lines + blocks - 1) / blocks;
                for (long b = 0, r = 0; b < blocks; b++) { /* blocks of equal size, to a row */
                    const long n = rows / blocks + (b < rows % blocks), from = b * share < lines ? b * share : lines;
                    block((const char *)x + (r0 + r) * x_stride * x_es, x_stride, (int)n, wpart, k0, k1,
                          sums + r * GROUP + c0, ahead + 64 * from, lines - from < share ? lines - from : share);
                    r += n;
                }
            }
            store_rows(sums + c0, (int)rows, cols, bias ? (const char *)bias + (g * GROUP + c0) * out_es : NULL,
                       out_es == 2, (char *)out + (r0 * out_stride + g * GROUP + c0) * out_es, out_stride * out_es);
        }
    }
}

static void run_groups(const kernel_t *kernel, long es, const void *x, long x_stride, long M, const void *packed,
                       const void *bias, long N, long K, void *out, long out_stride, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    thread_groups(kernel, es, es, es, x, x_stride, M, packed, bias, N, K, out, out_stride, omp_get_thread_num(),
                  omp_get_num_threads());
}

/* W [N, K] fp32 rows (row stride w_stride) -> packed ([N / GROUP] (rounded up) * K * GROUP floats). */
void hf_small_linear_pack_f32(const float *w, long w_stride, long N, long K, float *packed) {
#pragma omp parallel for schedule(static)
    for (long g = 0; g < num_groups(N); g++)
        for (long k = 0; k < K; k++)
            for (long c = 0; c < GROUP; c++) {
                long n = g * GROUP + c;
                packed[(g * K + k) * GROUP + c] = n < N ? w[n * w_stride + k] : 0.0f;
            }
}

#endif /* SMALL_LINEAR_BITS */

#if defined(__AVX512F__)
/* sums[r][0..63] += acc[r] for the block's rows. */
static inline void add_sums(float *sums, __m512 (*acc)[4], int rows, int vecs) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < vecs; j++) {
            float *s = sums + r * GROUP + 16 * j;
            _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), acc[r][j]));
        }
}

/* The 6 x 64 block of fp32 products (6 x 32: `vecs` 2, half a group), `rows` a constant (HF_BLOCK_BY_ROWS): the group
 * fp32, or (`bf16_words`, AVX-512 without AVX512_BF16) bf16 in the word layout of hf_small_linear_pack_bf16 below,
 * widened by a shift and a mask; x fp32 rows (bf16 ones widened by the caller). */
static inline __attribute__((always_inline)) void block_fma_rows(const int bf16_words, const int vecs, const float *x,
                                                                long x_stride, const int rows, const void *group,
                                                                long k0, long k1, float *sums, const char *ahead,
                                                                long lines) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    prefetch_t prefetch = {ahead, lines, k1 - k0, 0};
    const float *xr[ROW_BLOCK];
    for (int r = 0; r < rows; r++) xr[r] = x + r * x_stride;
    __m512 acc[ROW_BLOCK][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < vecs; j++) acc[r][j] = _mm512_setzero_ps();
    for (long k = k0; k < k1; k++) {
        __m512 w0, w1, w2 = _mm512_setzero_ps(), w3 = _mm512_setzero_ps();
        if (bf16_words) {
            const uint16_t *wk = (const uint16_t *)group + k * GROUP;
            const __m512i lo = _mm512_loadu_si512(wk);
            w0 = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
            w1 = _mm512_castsi512_ps(_mm512_and_si512(lo, high));
            if (vecs == 4) {
                const __m512i hi = _mm512_loadu_si512(wk + 32);
                w2 = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
                w3 = _mm512_castsi512_ps(_mm512_and_si512(hi, high));
            }
        } else {
            const float *wk = (const float *)group + k * GROUP;
            w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
            if (vecs == 4) w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
        }
        prefetch_step(&prefetch);
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) {
            const __m512 xv = _mm512_set1_ps(xr[r][k]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
            if (vecs == 4) {
                acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);
            }
        }
    }
    add_sums(sums, acc, rows, vecs);
}

static inline __attribute__((always_inline)) void block_f32_rows(const void *x, long x_stride, const int rows,
                                                                const void *group, long k0, long k1, float *sums,
                                                                const char *ahead, long lines) {
    block_fma_rows(0, 4, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

static inline __attribute__((always_inline)) void block_f32_half_rows(const void *x, long x_stride, const int rows,
                                                                     const void *group, long k0, long k1,
                                                                     float *sums, const char *ahead, long lines) {
    block_fma_rows(0, 2, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

HF_BLOCK_BY_ROWS(block_f32, block_f32_rows)
HF_BLOCK_BY_ROWS(block_f32_half, block_f32_half_rows)
static const kernel_t kernel_f32 = {block_f32, block_f32_half, sizeof(float)};

/* out [M, N] (row stride out_stride) = x [M, K] (row stride x_stride) @ W^T (+ bias [N]); 0 on success. */
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads) {
    run_groups(&kernel_f32, sizeof(float), x, x_stride, M, packed, bias, N, K, out, out_stride, num_threads);
    return 0;
}

#if defined(__AVX512BF16__)
int hf_small_linear_bf16_available(void) { return 2; } /* dot products on the bf16 values */

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

/* k0, k1 even (K_CHUNK is): the chunk is k-pairs [k0 / 2, k1 / 2). The block with `rows` a constant, as
 * block_f32_rows. */
static inline __attribute__((always_inline)) void block_dot_rows(const int vecs, const uint16_t *x, long x_stride,
                                                                const int rows, const uint16_t *wg, long k0, long k1,
                                                                float *sums, const char *ahead, long lines) {
    const long p0 = k0 / 2, p1 = k1 / 2;
    prefetch_t prefetch = {ahead, lines, p1 - p0, 0};
    const uint16_t *xr[ROW_BLOCK];
    for (int r = 0; r < rows; r++) xr[r] = x + r * x_stride;
    __m512 acc[ROW_BLOCK][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < vecs; j++) acc[r][j] = _mm512_setzero_ps();
    for (long kp = p0; kp < p1; kp++) {
        const uint16_t *wk = wg + kp * GROUP * 2;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        __m512bh w2 = w0, w3 = w0;
        if (vecs == 4) w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        prefetch_step(&prefetch);
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, xr[r] + 2 * kp, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
            if (vecs == 4) {
                acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);
                acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, w3);
            }
        }
    }
    add_sums(sums, acc, rows, vecs);
}

static inline __attribute__((always_inline)) void block_bf16_rows(const uint16_t *x, long x_stride, const int rows,
                                                                 const uint16_t *wg, long k0, long k1, float *sums,
                                                                 const char *ahead, long lines) {
    block_dot_rows(4, x, x_stride, rows, wg, k0, k1, sums, ahead, lines);
}

static inline __attribute__((always_inline)) void block_bf16_half_rows(const uint16_t *x, long x_stride,
                                                                      const int rows, const uint16_t *wg, long k0,
                                                                      long k1, float *sums, const char *ahead,
                                                                      long lines) {
    block_dot_rows(2, x, x_stride, rows, wg, k0, k1, sums, ahead, lines);
}

HF_BLOCK_BY_ROWS(block_bf16, block_bf16_rows)
HF_BLOCK_BY_ROWS(block_bf16_half, block_bf16_half_rows)
static const kernel_t kernel_bf16 = {block_bf16, block_bf16_half, 2 * sizeof(uint16_t)}; /* k-pairs */

/* out [M, N] bf16 = x [M, K] bf16 @ W^T (+ bias [N] bf16), accumulated in fp32, rounded once (nearest even);
 * K even. 0 on success. */
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads) {
    if (K % 2) return -1;
    run_groups(&kernel_bf16, sizeof(uint16_t), x, x_stride, M, packed, bias, N, K, out, out_stride, num_threads);
    return 0;
}
#else /* AVX-512 without AVX512_BF16: bf16 widened to fp32 (hf_small_linear_bf16 below) */
#define SMALL_LINEAR_WIDENS_BF16

/* W [N, K] bf16 rows -> packed ([N / 64] (rounded up) * K * 64 bf16): group g, k, half h of the 64 columns, 32-bit
 * word j = (column 32 h + j, column 32 h + j + 16), so one load and a shift / a mask give two fp32 vectors. */
void hf_small_linear_pack_bf16(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
#pragma omp parallel for schedule(static)
    for (long g = 0; g < num_groups(N); g++)
        for (long k = 0; k < K; k++)
            for (long c = 0; c < GROUP; c++) {
                const long n = g * GROUP + c / 32 * 32 + c % 32 / 2 + (c % 2) * 16;
                packed[(g * K + k) * GROUP + c] = n < N ? w[n * w_stride + k] : 0;
            }
}

/* x rows already widened to fp32 (stride x_stride floats). */
static inline __attribute__((always_inline)) void block_wide_rows(const void *x, long x_stride, const int rows,
                                                                 const void *group, long k0, long k1, float *sums,
                                                                 const char *ahead, long lines) {
    block_fma_rows(1, 4, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

static inline __attribute__((always_inline)) void block_wide_half_rows(const void *x, long x_stride, const int rows,
                                                                      const void *group, long k0, long k1,
                                                                      float *sums, const char *ahead, long lines) {
    block_fma_rows(1, 2, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

HF_BLOCK_BY_ROWS(block_bf16, block_wide_rows)
HF_BLOCK_BY_ROWS(block_bf16_half, block_wide_half_rows)
static const kernel_t kernel_bf16 = {block_bf16, block_bf16_half, sizeof(uint16_t)}; /* the word layout */
#endif /* __AVX512BF16__ */


#elif SMALL_LINEAR_BITS == 256 /* AVX2 + FMA */

_Static_assert(ROW_BLOCK == 6, "the AVX2 block names its 6 rows' accumulators");

/* One row's step of the AVX2 block, and the row's sums added to `sums` (row r of the block, when r < rows). Named
 * accumulators, not an array: GCC keeps an array of 12 ymm accumulators in registers but also stores it on every k
 * step, which halves the rate on CPUs whose FMA units outrun their stores. */
#define AVX2_ROW_FMA(r)                                                                                              \
    if (rows > r) {                                                                                                  \
        const __m256 xv = _mm256_broadcast_ss(x + r * x_stride + k);                                                 \
        a##r##0 = _mm256_fmadd_ps(xv, w0, a##r##0);                                                                   \
        a##r##1 = _mm256_fmadd_ps(xv, w1, a##r##1);                                                                   \
    }
#define AVX2_ROW_ADD(r)                                                                                              \
    if (rows > r) {                                                                                                  \
        float *s = sums + r * GROUP;                                                                                 \
        _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), a##r##0));                                             \
        _mm256_storeu_ps(s + 8, _mm256_add_ps(_mm256_loadu_ps(s + 8), a##r##1));                                     \
    }

/* The 6 x 16 block: `x` fp32 rows (bf16 rows were widened by the caller), the group fp32 or bf16 (the word layout
 * below). Inlined once per row count (a constant), so the accumulators stay in registers and the loop has no per-row
 * branches. */
static inline __attribute__((always_inline)) void block_avx2(const int bf16, const float *x, long x_stride,
                                                            const int rows, const void *group, long k0, long k1,
                                                            float *sums, const char *ahead, long lines) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    prefetch_t prefetch = {ahead, lines, k1 - k0, 0};
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
           a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (long k = k0; k < k1; k++) {
        __m256 w0, w1;
        if (bf16) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)((const uint16_t *)group + k * GROUP));
            w0 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            w1 = _mm256_castsi256_ps(_mm256_and_si256(w, high));
        } else {
            w0 = _mm256_loadu_ps((const float *)group + k * GROUP);
            w1 = _mm256_loadu_ps((const float *)group + k * GROUP + 8);
        }
        prefetch_step(&prefetch);
        AVX2_ROW_FMA(0) AVX2_ROW_FMA(1) AVX2_ROW_FMA(2) AVX2_ROW_FMA(3) AVX2_ROW_FMA(4) AVX2_ROW_FMA(5)
    }
    /* Columns j and j + 8 are lanes j of a<r>0 and a<r>1 in both layouts. */
    AVX2_ROW_ADD(0) AVX2_ROW_ADD(1) AVX2_ROW_ADD(2) AVX2_ROW_ADD(3) AVX2_ROW_ADD(4) AVX2_ROW_ADD(5)
}

static inline __attribute__((always_inline)) void block_avx2_f32(const void *x, long x_stride, const int rows,
                                                                const void *group, long k0, long k1, float *sums,
                                                                const char *ahead, long lines) {
    block_avx2(0, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

static inline __attribute__((always_inline)) void block_avx2_bf16(const void *x, long x_stride, const int rows,
                                                                 const void *group, long k0, long k1, float *sums,
                                                                 const char *ahead, long lines) {
    block_avx2(1, x, x_stride, rows, group, k0, k1, sums, ahead, lines);
}

HF_BLOCK_BY_ROWS(block_f32, block_avx2_f32)
HF_BLOCK_BY_ROWS(block_bf16, block_avx2_bf16)
static const kernel_t kernel_f32 = {block_f32, NULL, 0}, kernel_bf16 = {block_bf16, NULL, 0}; /* whole groups only */

/* out [M, N] (row stride out_stride) = x [M, K] (row stride x_stride) @ W^T (+ bias [N]); 0 on success. */
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads) {
    run_groups(&kernel_f32, sizeof(float), x, x_stride, M, packed, bias, N, K, out, out_stride, num_threads);
    return 0;
}

#define SMALL_LINEAR_WIDENS_BF16

/* W [N, K] bf16 rows -> packed ([N / 16] (rounded up) * K * 16 bf16): group g, k, word j = (column j, column j + 8). */
void hf_small_linear_pack_bf16(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
#pragma omp parallel for schedule(static)
    for (long g = 0; g < num_groups(N); g++)
        for (long k = 0; k < K; k++)
            for (long j = 0; j < GROUP / 2; j++)
                for (int e = 0; e < 2; e++) {
                    const long n = g * GROUP + j + e * (GROUP / 2);
                    packed[(g * K + k) * GROUP + 2 * j + e] = n < N ? w[n * w_stride + k] : 0;
                }
}

#else /* neither AVX-512 nor AVX2 + FMA */
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
#endif

#ifdef SMALL_LINEAR_WIDENS_BF16 /* AVX2, or AVX-512 without AVX512_BF16 */
int hf_small_linear_bf16_available(void) { return 1; } /* bf16 widened to fp32 */

#define WIDEN_ROWS 128 /* rows of x widened to fp32 at a time */

/* A per-thread scratch buffer of at least n floats (kept for the next call), or NULL. */
static float *scratch(size_t n) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (n > capacity) {
        free(buffer);
        buffer = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        capacity = buffer ? n : 0;
    }
    return buffer;
}

/* out [M, N] bf16 = x [M, K] bf16 @ W^T (+ bias [N] bf16), accumulated in fp32, rounded once (nearest even); any row
 * count. 0 on success, -1 where the scratch buffer cannot be allocated. */
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads) {
    const long chunk = M < WIDEN_ROWS ? M : WIDEN_ROWS;
    float *wide = scratch((size_t)(chunk > 0 ? chunk : 1) * K);
    if (!wide) return -1;
    for (long r0 = 0; r0 < M; r0 += chunk) {
        const long rows = M - r0 < chunk ? M - r0 : chunk;
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static)
            for (long r = 0; r < rows; r++) {
                const uint16_t *src = x + (r0 + r) * x_stride;
                float *dst = wide + r * K;
                long k = 0;
                for (; k + VL <= K; k += VL) *(vf_unaligned *)(dst + k) = load_vec(1, (const char *)(src + k));
                for (; k < K; k++) dst[k] = bf16_to_f32(src[k]);
            }
            thread_groups(&kernel_bf16, sizeof(float), sizeof(uint16_t), sizeof(uint16_t), wide, K, rows, packed,
                          bias, N, K, out + r0 * out_stride, out_stride, omp_get_thread_num(), omp_get_num_threads());
        }
    }
    return 0;
}
#endif /* SMALL_LINEAR_WIDENS_BF16 */

#if !(defined(SMALL_LINEAR_WIDENS_BF16) || (defined(__AVX512F__) && defined(__AVX512BF16__)))
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
