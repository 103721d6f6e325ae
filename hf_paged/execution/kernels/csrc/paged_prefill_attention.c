/* Paged prefill attention on the CPU: the query tokens of prompt chunks attend causally to their cached prefix and
 * to themselves, K/V read straight from the blocks (flash attention over the block table).
 *
 * Built into the library of hf_paged/execution/kernels/cpu_library.py and called through ctypes
 * (hf_paged/execution/kernels/cpu_prefill_attention.py) with raw data pointers and the argument structs of
 * hf_paged_kernels.h (hf_attention_t: the layer's caches and heads; hf_seqs_t: the step's prefill sequences).
 *
 * Layouts (strides in elements):
 *   q            [T, H, hd]       row strides q_s0 (token), q_s1 (head); head_dim contiguous
 *   key/value    [num_blocks, block_size, KVH, hd] contiguous (one layer's cache)
 *   block_tables [S, >= ceil(kv_len / block_size)] int64, row stride bt_stride
 *   q_starts, q_lens, kv_lens  [S] int32: sequence s owns query rows q_starts[s] .. + q_lens[s]; they are the last
 *                q_lens[s] of its kv_lens[s] cached tokens (query token t sits at position kv_len - q_len + t)
 *   out          [T, H, hd_v]     row strides o_s0, o_s1 (hd_v: the values' width, hd unless it differs)
 * GQA: query head h reads KV head h / (H / KVH). No sliding window, no chunking, no soft-capping (the caller keeps its
 * PyTorch path for those). Attention sinks (one fp32 logit per query head): exp(sink - max) joins each row's sum. int8
 * K/V (caches with scales [num_blocks, KVH, block_size] beside them): the keys are dequantized as the tile is packed,
 * each V row's scale multiplies its probabilities; fp32 products.
 *
 * A unit of work is (sequence, KV head, qt query tokens; qt = 512 / G, 8 to 128): its rows are the qt tokens x
 * G = H / KVH query heads sharing the KV head, token-major, so one K/V tile serves all of them. For each tile of KT
 * keys (up to the unit's last position): the tile's keys are widened to fp32 and packed transposed ([hd][KT], VL x VL
 * blocks transposed in registers), so that the scores of RB rows x KT keys are RB x KT/VL vector accumulators over
 * hd broadcast-FMAs (no horizontal sums); the online softmax updates each row's running max and sum; then RB rows x
 * 4*VL output dims accumulate P.V, V rows read from their blocks. The query is scaled and widened once per unit;
 * everything accumulates in fp32; bf16 inputs (uint16 bit patterns) are widened on load and the output rounded to
 * nearest even. The packing is what a unit pays per key whatever its rows, so a verification unit (the 1 + k tokens
 * of a drafted sequence) costs little more than a decode's row per key. Units are sorted by their number of keys,
 * largest first, and claimed dynamically by the OpenMP threads.
 *
 * No -ffast-math (see cpu_vec.h): exp is the polynomial of cpu_vec.h; masked keys get probability 0 exactly.
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"
#include "hf_paged_kernels.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define KT (4 * VL)      /* keys per tile: 4 vectors of scores per row */
#define DC (4 * VL)      /* output dims per P.V pass: 4 vectors per row */
#define NV 4             /* vectors per row in both */
#define UNIT_ROWS 512 /* query rows (tokens x G) per unit, at most: the unit's query and output stay in L2 */
#define UNIT_MAX_TOKENS 128
#if VL == 16
#define RB 6 /* rows per register block: RB x NV accumulators + NV loads + 1 broadcast <= 32 zmm */
#else
#define RB 2
#endif

typedef struct {
    const char *q, *key_cache, *value_cache;
    char *out;
    const int64_t *block_tables;
    const int32_t *q_starts, *q_lens, *kv_lens;
    long q_s0, q_s1, o_s0, o_s1, bt_stride;
    int H, KVH, G, hd, block_size, bf16;
    float scale;
    const float *k_scales, *v_scales; /* int8 K/V: [num_blocks, KVH, block_size] row scales (else NULL) */
    int hd_v;
    const float *sinks; /* [H] or NULL */
} prefill_t;

typedef struct {
    int seq, kvh, t0, t1; /* query tokens t0 .. t1 of the sequence (relative to its q_starts row) */
    long keys;            /* keys the unit reads: its cost */
} unit_t;

static inline vf vmax(vf a, vf b) {
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

/* Horizontal max and sum in log2(VL) shuffles (cpu_vec.h's hmax / hsum go lane by lane). */
static inline float reduce_max(vf x) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)x);
#else
    return hmax(x);
#endif
}

static inline float reduce_add(vf x) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)x);
#else
    return hsum(x);
#endif
}

static int by_keys_desc(const void *a, const void *b) {
    long x = ((const unit_t *)a)->keys, y = ((const unit_t *)b)->keys;
    return (x < y) - (x > y);
}

typedef struct {
    float *qs;         /* [qt * G, hd] scaled query */
    float *acc;        /* [qt * G, hd_v] unnormalised output */
    float *m, *l;      /* [qt * G] running max and sum */
    float *kt;         /* [hd, KT] the tile's keys, transposed */
    const char **vrow; /* [KT] the tile's value rows */
    const char **krow; /* [KT] the tile's key rows */
    float *kscale;     /* [KT] int8 K: the tile's row scales */
    float *p;          /* [RB, KT] a row block's probabilities */
    float *vscale;     /* [KT] int8 V: the tile's row scales */
} work_t;

/* What both unit bodies need of a unit: its rows (token-major: row r is token t0 + r / G, query head kvh * G + r % G),
 * its sequence's block table and the keys its last row sees. */
typedef struct {
    int n, first_pos, num_keys; /* rows; position of query token 0; keys 0 .. num_keys - 1 */
    const int64_t *table;
} span_t;

static inline span_t unit_span(const prefill_t *a, const unit_t *u) {
    const int first_pos = a->kv_lens[u->seq] - a->q_lens[u->seq];
    return (span_t){(u->t1 - u->t0) * a->G, first_pos, first_pos + u->t1,
                    a->block_tables + (long)u->seq * a->bt_stride};
}

/* Element offset of (token, head) in q or out. */
static inline long row_offset(const prefill_t *a, const unit_t *u, int r, long s0, long s1) {
    return (long)(a->q_starts[u->seq] + u->t0 + r / a->G) * s0 + (long)(u->kvh * a->G + r % a->G) * s1;
}

static inline void reset_rows(work_t *w, int n, int hd) {
    memset(w->acc, 0, sizeof(float) * n * hd);
    for (int r = 0; r < n; r++) {
        w->m[r] = -__builtin_inff();
        w->l[r] = 0.0f;
    }
}

/* Visible keys in the tile [k0, k0 + kn) of the rows r0 .. r0 + nr (those at positions <= the row's; 0 for the
 * padding rows past nr); returns their maximum. */
static inline int block_visibility(const prefill_t *a, const unit_t *u, const span_t *sp, int r0, int nr, int k0,
                                   int kn, int vis[RB]) {
    int max_vis = 0;
    for (int i = 0; i < RB; i++) {
        int v = sp->first_pos + u->t0 + (r0 + i) / a->G + 1 - k0;
        v = v < 0 ? 0 : (v > kn ? kn : v);
        vis[i] = i < nr ? v : 0;
        if (vis[i] > max_vis) max_vis = vis[i];
    }
    return max_vis;
}

/* out rows = acc / l (l + exp(sink - m) with sinks), in the output's dtype. */
static inline void store_rows(const prefill_t *a, const unit_t *u, const work_t *w, int n) {
    const int esz = a->bf16 ? 2 : 4, hv = a->hd_v;
    for (int r = 0; r < n; r++) {
        char *dst = a->out + row_offset(a, u, r, a->o_s0, a->o_s1) * esz;
        const float sink = a->sinks ? exp_vec(splat(a->sinks[u->kvh * a->G + r % a->G] - w->m[r]))[0] : 0.0f;
        const vf inv = splat(1.0f / (w->l[r] + sink));
        for (int d = 0; d < hv; d += VL)
            store_vec(a->bf16, dst + (long)d * esz, *(const vf *)(w->acc + (long)r * hv + d) * inv);
    }
}

/* The tile's K and V row pointers (int8: and their scales, where kscale is not NULL): keys k0 .. k0 + kn of the
 * unit's KV head, walked block by block. */
static inline void tile_rows(const prefill_t *a, const unit_t *u, const span_t *sp, int k0, int kn, int kesz,
                             const char **krow, const char **vrow, float *kscale, float *vscale) {
    const int bs = a->block_size;
    const long row = (long)a->KVH * a->hd, vrow_len = (long)a->KVH * a->hd_v;
    for (int j = 0; j < kn;) {
        const int key = k0 + j, in_block = key % bs, count = bs - in_block < kn - j ? bs - in_block : kn - j;
        const long slot = sp->table[key / bs] * bs + in_block;
        const char *k = a->key_cache + (slot * row + (long)u->kvh * a->hd) * kesz;
        const char *v = a->value_cache + (slot * vrow_len + (long)u->kvh * a->hd_v) * kesz;
        const long scales = (sp->table[key / bs] * a->KVH + u->kvh) * bs + in_block;
        for (int i = 0; i < count; i++, j++) {
            krow[j] = k + i * row * kesz;
            vrow[j] = v + i * vrow_len * kesz;
            if (kscale) {
                kscale[j] = a->k_scales[scales + i];
                vscale[j] = a->v_scales[scales + i];
            }
        }
    }
}

/* t[i][j] <- t[j][i]: log2(VL) rounds, each exchanging blocks of h lanes between rows h apart. GCC only (clang has no
 * shuffle with a mask vector: a plain loop there). */
static inline void transpose(vf *t) {
#if defined(__clang__)
    vf c[VL];
    for (int i = 0; i < VL; i++)
        for (int j = 0; j < VL; j++) c[i][j] = t[j][i];
    for (int i = 0; i < VL; i++) t[i] = c[i];
#else
#if VL == 16
    static const vi lo[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                             {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                             {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                             {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
#elif VL == 8
    static const vi lo[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 8, 2, 10, 4, 12, 6, 14}};
#else
    static const vi lo[2] = {{0, 1, 4, 5}, {0, 4, 2, 6}};
#endif
    enum { ROUNDS = VL == 16 ? 4 : VL == 8 ? 3 : 2 };
#pragma GCC unroll 4
    for (int round = 0; round < ROUNDS; round++) {
        const int h = VL >> (round + 1);
#pragma GCC unroll 16
        for (int r = 0; r < VL; r++) {
            if (r & h) continue;
            const vf x = t[r], y = t[r + h];
            t[r] = __builtin_shuffle(x, y, lo[round]);
            t[r + h] = __builtin_shuffle(x, y, lo[round] + h);
        }
    }
#endif
}

static inline __attribute__((always_inline)) void unit_body(const prefill_t *a, const unit_t *u, work_t *w,
                                                           const int kv8) {
    const int hd = a->hd, hv = a->hd_v, bf16 = a->bf16, esz = bf16 ? 2 : 4;
    const int kesz = kv8 ? 1 : esz;
    const span_t sp = unit_span(a, u);
    const int n = sp.n, num_keys = sp.num_keys;

    for (int r = 0; r < n; r++) {
        const char *src = a->q + row_offset(a, u, r, a->q_s0, a->q_s1) * esz;
        for (int d = 0; d < hd; d += VL)
            *(vf *)(w->qs + (long)r * hd + d) = load_vec(bf16, src + (long)d * esz) * a->scale;
    }
    reset_rows(w, n, hv);

    for (int k0 = 0; k0 < num_keys; k0 += KT) {
        const int kn = num_keys - k0 < KT ? num_keys - k0 : KT;
        /* Pack the tile: K transposed to fp32, V row pointers. */
        const char **krow = w->krow;
        tile_rows(a, u, &sp, k0, kn, kesz, krow, w->vrow, kv8 ? w->kscale : NULL, w->vscale);
        for (int j0 = 0; j0 < KT; j0 += VL)
            for (int d0 = 0; d0 < hd; d0 += VL) {
                vf t[VL];
                if (j0 >= kn) {
                    for (int i = 0; i < VL; i++) *(vf *)(w->kt + (long)(d0 + i) * KT + j0) = splat(0.0f);
                    continue;
                }
                for (int i = 0; i < VL; i++) {
                    const int j = j0 + i;
                    if (j >= kn)
                        t[i] = splat(0.0f);
                    else if (kv8)
                        t[i] = load_i8_vec(krow[j] + d0) * w->kscale[j];
                    else
                        t[i] = load_vec(bf16, krow[j] + (long)d0 * esz);
                }
                transpose(t);
                for (int i = 0; i < VL; i++) *(vf *)(w->kt + (long)(d0 + i) * KT + j0) = t[i];
            }

        for (int r0 = 0; r0 < n; r0 += RB) {
            const int nr = n - r0 < RB ? n - r0 : RB;
            int vis[RB];
            const int max_vis = block_visibility(a, u, &sp, r0, nr, k0, kn, vis);
            if (max_vis == 0) continue; /* rows are token-major: later blocks see more */

            /* Scores: RB rows x KT keys. Rows past nr repeat the last row (their results are dropped). */
            vf s[RB][NV];
            for (int i = 0; i < RB; i++)
                for (int c = 0; c < NV; c++) s[i][c] = splat(0.0f);
            const float *qrow[RB];
            for (int i = 0; i < RB; i++) qrow[i] = w->qs + (long)(r0 + (i < nr ? i : nr - 1)) * hd;
            for (int d = 0; d < hd; d++) {
                const vf *kd = (const vf *)(w->kt + d * KT);
                vf k[NV];
                for (int c = 0; c < NV; c++) k[c] = kd[c];
                for (int i = 0; i < RB; i++) {
                    const vf b = splat(qrow[i][d]);
                    for (int c = 0; c < NV; c++) s[i][c] += b * k[c];
                }
            }

            /* Online softmax; probabilities of masked keys are 0 exactly. */
            float alpha[RB];
            vi lane;
            for (int x = 0; x < VL; x++) lane[x] = x;
            for (int i = 0; i < RB; i++) {
                float *p = w->p + i * KT;
                alpha[i] = 1.0f;
                if (i >= nr || vis[i] == 0) {
                    memset(p, 0, sizeof(float) * KT);
                    continue;
                }
                const int r = r0 + i;
                vi live[NV];
                vf vm = splat(-__builtin_inff());
                for (int c = 0; c < NV; c++) {
                    live[c] = lane + c * VL < vis[i];
                    s[i][c] = (vf)(((vi)s[i][c] & live[c]) | ((vi)splat(-__builtin_inff()) & ~live[c]));
                    vm = vmax(vm, s[i][c]);
                }
                const float mx = reduce_max(vm);
                const float m_new = mx > w->m[r] ? mx : w->m[r];
                alpha[i] = exp_vec(splat(w->m[r] - m_new))[0]; /* m = -inf at first: alpha = 0 (acc is 0) */
                vf sum = splat(0.0f);
                for (int c = 0; c < NV; c++) {
                    const vf e = (vf)((vi)exp_vec(s[i][c] - m_new) & live[c]);
                    sum += e;
                    *(vf *)(p + c * VL) = e;
                }
                w->l[r] = w->l[r] * alpha[i] + reduce_add(sum);
                w->m[r] = m_new;
            }

            /* acc = acc * alpha + P.V, DC dims at a time. */
            for (int d0 = 0; d0 < hv; d0 += DC) {
                vf o[RB][NV];
                for (int i = 0; i < RB; i++) {
                    const float *ar = w->acc + (long)(r0 + (i < nr ? i : nr - 1)) * hv + d0;
                    for (int c = 0; c < NV; c++) o[i][c] = *(const vf *)(ar + c * VL) * alpha[i];
                }
                for (int j = 0; j < max_vis; j++) {
                    const char *vr = w->vrow[j] + (long)d0 * kesz;
                    vf v[NV];
                    if (kv8) { /* the row's scale goes into the weights below */
                        for (int c = 0; c < NV; c++) v[c] = load_i8_vec(vr + (long)c * VL);
                    } else {
                        for (int c = 0; c < NV; c++) v[c] = load_vec(bf16, vr + (long)c * VL * esz);
                    }
                    const float vs = kv8 ? w->vscale[j] : 1.0f;
                    for (int i = 0; i < RB; i++) {
                        const vf b = splat(w->p[i * KT + j] * vs);
                        for (int c = 0; c < NV; c++) o[i][c] += b * v[c];
                    }
                }
                for (int i = 0; i < nr; i++) {
                    float *ar = w->acc + (long)(r0 + i) * hv + d0;
                    for (int c = 0; c < NV; c++) *(vf *)(ar + c * VL) = o[i][c];
                }
            }
        }
    }

    store_rows(a, u, w, n);
}

static void run_unit(const prefill_t *a, const unit_t *u, work_t *w) {
    if (a->k_scales)
        unit_body(a, u, w, 1);
    else
        unit_body(a, u, w, 0);
}

static int paged_prefill_attention(const int bf16, const hf_attention_t *at, const hf_seqs_t *seqs, const void *q,
                                   long q_s0, long q_s1, void *out, long o_s0, long o_s1, int num_threads) {
    const int S = seqs->num_seqs, H = at->H, KVH = at->KVH, hd = at->hd, block_size = at->block_size;
    const int hd_v = at->hd_v > 0 ? at->hd_v : hd;
    const int32_t *q_lens = seqs->q_lens, *kv_lens = seqs->kv_lens;
    const float *k_scales = at->key_scales;
    if (S <= 0) return 0;
    if (H <= 0 || KVH <= 0 || H % KVH || hd <= 0 || hd % DC || hd_v % DC || block_size <= 0) return 1;
    if (at->window > 0 || at->chunk > 0 || at->softcap > 0.0f || !k_scales != !at->value_scales) return 1;
    const prefill_t a = {(const char *)q, (const char *)at->key_cache, (const char *)at->value_cache, (char *)out,
                         seqs->block_tables, seqs->q_starts, q_lens, kv_lens, q_s0, q_s1, o_s0, o_s1,
                         seqs->bt_stride, H, KVH, H / KVH, hd, block_size, bf16, at->scale, k_scales,
                         at->value_scales, hd_v, at->sinks};
    int qt = UNIT_ROWS / a.G; /* tokens per unit: longer units pack each key tile for more rows */
    qt = qt > UNIT_MAX_TOKENS ? UNIT_MAX_TOKENS : (qt < 8 ? 8 : qt);
    long n_units = 0;
    for (int s = 0; s < S; s++) {
        if (q_lens[s] < 0 || kv_lens[s] < q_lens[s]) return 2;
        n_units += (long)KVH * ((q_lens[s] + qt - 1) / qt);
    }
    if (n_units == 0) return 0;
    unit_t *units = malloc(sizeof(unit_t) * n_units);
    if (!units) return 3;
    long u = 0;
    for (int s = 0; s < S; s++)
        for (int t0 = 0; t0 < q_lens[s]; t0 += qt)
            for (int h = 0; h < KVH; h++) {
                const int t1 = t0 + qt < q_lens[s] ? t0 + qt : q_lens[s];
                units[u++] = (unit_t){s, h, t0, t1, (long)(kv_lens[s] - q_lens[s] + t1) * (t1 - t0)};
            }
    qsort(units, n_units, sizeof(unit_t), by_keys_desc);
    if (num_threads < 1) num_threads = 1;
    if (num_threads > n_units) num_threads = (int)n_units;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const long rows = (long)qt * a.G;
        work_t w = {0}; /* {0}: the unit loop skips its body when an allocation failed, which gcc cannot see */
        const size_t bytes =
            sizeof(float) * (rows * (hd + hd_v) + 2 * rows + (long)hd * KT + RB * KT + 2 * KT);
        float *mem = aligned_alloc(64, (bytes + 63) / 64 * 64);
        const char **vrow = malloc(sizeof(char *) * 2 * KT);
        if (!mem || !vrow) {
#pragma omp atomic write
            failed = 1;
        } else {
            w.qs = mem;
            w.acc = w.qs + rows * hd;
            w.kt = w.acc + rows * hd_v;
            w.p = w.kt + (long)hd * KT;
            w.m = w.p + RB * KT;
            w.l = w.m + rows;
            w.vscale = w.l + rows;
            w.kscale = w.vscale + KT;
            w.vrow = vrow;
            w.krow = vrow + KT;
        }
#pragma omp for schedule(dynamic, 1)
        for (long i = 0; i < n_units; i++) {
            if (!mem || !vrow) continue;
            run_unit(&a, &units[i], &w);
        }
        free(mem);
        free(vrow);
    }
    free(units);
    return failed ? 3 : 0;
}

/* Returns 0, or 1 on bad arguments (a head dim that is not a multiple of DC, a window, chunk or softcap, a scale table
 * without the other), 2 on bad lengths, 3 without memory. The caches are int8 where they come with scales; q and out
 * fp32 or bf16 as attn->bf16 says. */
int hf_paged_prefill_attention(const hf_attention_t *attn, const hf_seqs_t *seqs, const void *q, long q_s0,
                               long q_s1, void *out, long o_s0, long o_s1, int num_threads) {
    return attn->bf16 ? paged_prefill_attention(1, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads)
                      : paged_prefill_attention(0, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads);
}
