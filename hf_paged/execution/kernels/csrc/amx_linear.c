/* bf16 linear layers for a few dozen rows (decode steps) on AMX tiles: out = x @ W^T + bias.
 *
 * oneDNN's packed GEMM (mkldnn._linear_pointwise) has a fixed cost per call before any arithmetic, and a decode
 * step makes over a hundred such small calls: the weights stream from memory, the arithmetic is nothing for AMX. Here a call is a ctypes call and one OpenMP region.
 *
 * Weights are packed once (hf_amx_pack) into 1 KB tiles in AMX's VNNI layout, grouped by pairs of 16-column
 * blocks: [N / 32][K / 32][2 tiles][16 k-pairs][16 columns][2]. A thread takes whole column-block pairs (a
 * contiguous stretch of the packed weight, streamed once) and, for every 32 rows of x, accumulates a 32 x 32
 * block of out in four fp32 tiles over K. x rows are read as stored (padded to a multiple of 16 rows in a
 * scratch copy where needed); the fp32 results, plus the bias, are rounded to bf16 (nearest even).
 *
 * Needs N and K multiples of 32; the caller keeps oneDNN for anything else and for large row counts (prefill,
 * where the arithmetic matters and oneDNN's blocking wins). Built with the other CPU kernels; without AMX in the
 * compiler's target, hf_amx_available() returns 0 and nothing else is called.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"
#include "hf_paged_kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ELEMS 512 /* 16 rows x 64 bytes of bf16 */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* 1 where this process may use AMX tiles (asks Linux for the permission; oneDNN asks the same). */
int hf_amx_available(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

/* W [N, K] bf16 rows (row stride w_stride) -> packed (N * K elements). */
void hf_amx_pack(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
    const long KB = K / 32;
#pragma omp parallel for schedule(static)
    for (long pair = 0; pair < N / 32; pair++)
        for (long kb = 0; kb < KB; kb++)
            for (int t = 0; t < 2; t++) {
                uint16_t *tile = packed + ((pair * KB + kb) * 2 + t) * TILE_ELEMS;
                for (int r = 0; r < 16; r++)
                    for (int c = 0; c < 16; c++)
                        for (int e = 0; e < 2; e++)
                            tile[(r * 16 + c) * 2 + e] = w[(pair * 32 + t * 16 + c) * w_stride + kb * 32 + 2 * r + e];
            }
}

static void configure_tiles(void) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Rows [r0, r0 + n) of one 16 x 16 fp32 tile (+ bias) -> bf16 out rows, 16 columns. */
static inline void store_rows(const float *tile, int n, const uint16_t *bias, uint16_t *out, long out_stride) {
    vf b = bias ? load_vec(1, (const char *)bias) : splat(0.0f);
    for (int r = 0; r < n; r++) store_vec(1, (char *)(out + r * out_stride), *(const vf *)(tile + r * 16) + b);
}

/* out [M, N] = x [M, K] @ W^T (+ bias [N]); x rows with stride x_stride, out rows with stride out_stride. */
int hf_amx_linear(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias, long N,
                  long K, uint16_t *out, long out_stride, int num_threads) {
    if (M <= 0) return 0;
    if (N % 32 || K % 32) return -1;
    const long KB = K / 32, Mp = (M + 15) / 16 * 16;
    const uint16_t *a = x;
    long a_stride = x_stride;
    uint16_t *scratch = NULL;
    if (Mp != M) { /* tiles load 16 rows: copy x into zero-padded rows */
        scratch = (uint16_t *)aligned_alloc(64, (size_t)Mp * K * 2);
        if (!scratch) return -2;
        for (long r = 0; r < M; r++) memcpy(scratch + r * K, x + r * x_stride, K * 2);
        memset(scratch + M * K, 0, (size_t)(Mp - M) * K * 2);
        a = scratch;
        a_stride = K;
    }
    const long pairs = N / 32;
    if (num_threads > pairs) num_threads = (int)pairs;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float acc[4][256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (long pair = 0; pair < pairs; pair++) {
            const uint16_t *b = packed + pair * KB * 2 * TILE_ELEMS;
            const uint16_t *bias_pair = bias ? bias + pair * 32 : NULL;
            for (long m0 = 0; m0 < Mp; m0 += 32) {
                const int two = Mp - m0 > 16; /* a second block of 16 rows */
                const uint16_t *a0 = a + m0 * a_stride, *a1 = a0 + 16 * a_stride;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (long kb = 0; kb < KB; kb++) {
                    const uint16_t *bt = b + kb * 2 * TILE_ELEMS;
                    _tile_loadd(4, a0 + kb * 32, a_stride * 2);
                    _tile_loadd(6, bt, 64);
                    _tile_loadd(7, bt + TILE_ELEMS, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    if (two) {
                        _tile_loadd(5, a1 + kb * 32, a_stride * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, acc[0], 64);
                _tile_stored(1, acc[1], 64);
                if (two) {
                    _tile_stored(2, acc[2], 64);
                    _tile_stored(3, acc[3], 64);
                }
                for (int rb = 0; rb <= two; rb++) {
                    const long r0 = m0 + rb * 16;
                    const int n = M - r0 < 16 ? (int)(M - r0) : 16;
                    if (n <= 0) continue;
                    uint16_t *o = out + r0 * out_stride + pair * 32;
                    store_rows(acc[rb * 2], n, bias_pair, o, out_stride);
                    store_rows(acc[rb * 2 + 1], n, bias_pair ? bias_pair + 16 : NULL, o + 16, out_stride);
                }
            }
        }
        _tile_release();
    }
    free(scratch);
    return 0;
}

#else
int hf_amx_available(void) { return 0; }
void hf_amx_pack(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed) {
    (void)w, (void)w_stride, (void)N, (void)K, (void)packed;
}
int hf_amx_linear(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias, long N,
                  long K, uint16_t *out, long out_stride, int num_threads) {
    (void)x, (void)x_stride, (void)M, (void)packed, (void)bias, (void)N, (void)K, (void)out, (void)out_stride;
    (void)num_threads;
    return -1;
}
#endif
