/* Paged decode attention on the CPU: one query token per sequence, K/V read straight from the blocks.
 *
 * Built by hf_paged/execution/kernels/cpu_library.py with the system C compiler (plain C11 + GNU vector extensions +
 * OpenMP, no torch headers) and called through ctypes (cpu_decode_attention.py) and by llama_decode_layer.c with raw
 * data pointers and the argument structs of hf_paged_kernels.h (hf_attention_t: the layer's caches, heads, scale,
 * window, softcap; hf_seqs_t: the step's block tables and lengths).
 *
 * Layouts (strides in elements):
 *   q            [D, H, hd]            row strides q_s0 (sequence), q_s1 (head); head_dim contiguous
 *   key/value    [num_blocks, block_size, KVH, hd] contiguous (one layer's cache)
 *   block_tables [D, >= ceil(kv_len / block_size)] int64, row stride bt_stride
 *   kv_lens      [D] int32: the number of cached tokens of each sequence, the query being the last one
 *   out          [D, H, hd]            row strides o_s0, o_s1; head_dim contiguous
 * window > 0: the query (position kv_len - 1) sees keys j >= kv_len - window only.
 * chunk > 0: the query sees keys j >= (kv_len - 1) / chunk * chunk only (chunked attention).
 * softcap > 0: scores = tanh(scores / softcap) * softcap before the softmax.
 * sinks: one fp32 logit per query head that joins the softmax's denominator (exp(sink - max)) and weighs no value.
 * hd_v != hd (values of another width than the keys, out [D, H, hd_v]): the plain scalar path (unit_scalar).
 * GQA: query head h reads KV head h / (H / KVH).
 *
 * A unit of work is one (sequence, KV head) and the G = H / KVH query heads that read it: two passes over
 * the visible keys, each K/V row slice read once for all G heads. Pass 1 computes the scores into a
 * per-thread buffer (VL keys at a time, the heads' dot products of a key interleaved (independent chains): the VL
 * dot products of a head are reduced together by a shuffle tree, no horizontal sum per dot); then the softmax (max,
 * exp, sum); pass 2 accumulates the weighted V rows in registers, up to three heads at a time, in chunks of the row
 * that fit the register file (AVX2's 16). Everything accumulates in fp32; bf16 inputs (uint16 bit
 * patterns) are widened on load and the output rounded to nearest even. Except with AVX512-BF16, for bf16
 * and head dims that are multiples of 32 (unit_dp): vdpbf16ps dot products on the rows as stored, q.k over key
 * pairs sharing a vector (scale applied to the fp32 scores), and sum p v over pairs of V rows interleaved
 * against their probabilities rounded to bf16, as vLLM's and IPEX's CPU attention do.
 *
 * An OpenMP task is a whole sequence (its KV heads one after the other) when there are at least 4
 * sequences per thread, else one unit. Threads claim tasks from a shared counter one ahead, so that the
 * next task's first rows are prefetched while the current one ends; within a pass, the rows PF_TILES
 * tiles ahead are prefetched, one row per key computed (walking all KV heads of a row together computes a little
 * faster but streams from memory slower).
 *
 * paged_write_kv, beside it, scatters a step's new K/V rows into their slots (the cache write of every layer).
 *
 * int8 K/V (kv_cache_dtype="int8": caches that come with scales): each cached row is hd int8 values q with one
 * fp32 scale s per (slot, KV head), x = q * s, the scales in [num_blocks, KVH, block_size] beside each cache. The
 * scales are applied outside the dot products: pass 1 multiplies a tile's VL scores by its VL key scales, pass 2
 * weighs each V row by its probability times its scale. With AVX512-VNNI and head dims that are multiples of 32
 * (unit_i8_vnni) the dot products are integer (vpdpwssd): the scaled query and each tile's weights rounded to int16,
 * the rows widened to int16, int32 sums; otherwise (unit_vec, unit_scalar) the rows are widened to fp32 in
 * registers. The query and the output keep the model's dtype (fp32 or bf16). paged_write_kv_i8 quantizes as
 * cache_ops.quantize_int8 does (scale = max|x| / 127, x / scale rounded half to even: the same bits).
 *
 * No -ffast-math: exp is a polynomial written here and no loop needs reassociation permission. Head dims
 * that are not a multiple of VL take a plain scalar path.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "cpu_vec.h"
#include "hf_paged_kernels.h"

/* P[0..VL) -> the vector whose lane i is the sum of P[i]'s lanes (P is clobbered). With GCC: a tree of two-source
 * shuffles, each level halving the number of vectors and the number of lanes summed per key. Clang has no shuffle
 * with a runtime mask (__builtin_shuffle): there each lane is summed on its own. */
#if defined(__clang__)
static inline vf reduce_tile(vf *P) {
    vf out;
    for (int i = 0; i < VL; i++) {
        float s = 0.0f;
        for (int j = 0; j < VL; j++)
            s += P[i][j];
        out[i] = s;
    }
    return out;
}
#else
static inline vf reduce_tile(vf *P) {
#if VL == 16
    static const vi lo[4] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
        {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
        {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
    static const int half[4] = {8, 4, 2, 1};
    enum { LEVELS = 4 };
#elif VL == 8
    static const vi lo[3] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 4, 5, 8, 9, 12, 13}, {0, 2, 4, 6, 8, 10, 12, 14}};
    static const int half[3] = {4, 2, 1};
    enum { LEVELS = 3 };
#else
    static const vi lo[2] = {{0, 1, 4, 5}, {0, 2, 4, 6}};
    static const int half[2] = {2, 1};
    enum { LEVELS = 2 };
#endif
    int n = VL;
    for (int lev = 0; lev < LEVELS; lev++) {
        n /= 2;
        for (int i = 0; i < n; i++)
            P[i] = __builtin_shuffle(P[2 * i], P[2 * i + 1], lo[lev]) +
                   __builtin_shuffle(P[2 * i], P[2 * i + 1], lo[lev] + half[lev]);
    }
    return P[0];
}
#endif

typedef struct {
    const char *q, *key_cache, *value_cache;
    char *out;
    const int64_t *block_tables;
    const int32_t *kv_lens;
    long q_s0, q_s1, o_s0, o_s1, bt_stride;
    long row; /* elements between consecutive slots: KVH * hd */
    int H, KVH, G, hd, block_size, window;
    float scale, softcap;
    int ldsc; /* score row length of the workspace (max visible length rounded up to VL) */
    const float *k_scales, *v_scales; /* int8 K/V: [num_blocks, KVH, block_size] row scales (else NULL) */
    int hd_v, chunk;   /* the values' width (= hd unless it differs); chunk size or 0 */
    long row_v;        /* KVH * hd_v */
    const float *sinks; /* [H] or NULL */
} params_t;

/* Per-thread workspace for the G query heads of one unit. */
typedef struct {
    vf *qv;         /* [G, C] scaled query */
    vf *acc;        /* [G, C] output accumulators */
    vf *tile;       /* [G, VL] partial dot products of one tile of keys */
    float *sc;      /* [G, ldsc] scores, then probabilities */
    float *inv_sum; /* [G] */
    uint32_t *pw;   /* [G, ldsc / 2] bf16 probability pairs (the AVX512-BF16 path) */
    vf *kp;         /* [VL / 2, C] K rows of a tile's key pairs (the AVX512-BF16 path) */
    const char *rows[VL];  /* the rows of the current tile */
    const char *ahead[VL]; /* rows to prefetch while computing it */
    int n_ahead;
    float rs[VL]; /* int8 K/V: the current tile's row scales (0 past its rows) */
    float *hs;    /* [2 G] the int8 VNNI path's per-head scales of q and of a tile's weights */
    float *sink_w; /* [G] the heads' sink weights exp(sink - max) (0 without sinks) */
} work_t;

/* The first key a query at the end of `len` keys sees. */
static inline int first_key(const params_t *p, int len) {
    if (p->chunk > 0) return len > 0 ? (len - 1) / p->chunk * p->chunk : 0;
    return (p->window > 0 && len > p->window) ? len - p->window : 0;
}

/* The rows (KV head kh's slice, hd of row elements a slot) of positions [pos, pos + cnt) of one sequence. */
static inline void tile_rows_of(const params_t *p, const char *cache, long row, int hd, const int64_t *bt, int kh,
                                long esz, int pos, int cnt, const char **rows) {
    const int bs = p->block_size;
    int blk = pos / bs, off = pos % bs;
    const char *base = cache + (bt[blk] * bs * row + (long)kh * hd) * esz;
    if (off + cnt <= bs) { /* all in one block (the common case): no per-row test */
        const long stride = row * esz;
        base += off * stride;
        for (int jj = 0; jj < cnt; jj++) rows[jj] = base + jj * stride;
        return;
    }
    for (int jj = 0; jj < cnt; jj++) {
        rows[jj] = base + off * row * esz;
        if (++off == bs && jj + 1 < cnt) {
            off = 0;
            base = cache + (bt[++blk] * bs * row + (long)kh * hd) * esz;
        }
    }
}

/* The K rows (and V rows where their width is the keys') of positions [pos, pos + cnt). */
static inline void tile_rows(const params_t *p, const char *cache, const int64_t *bt, int kh, long esz, int pos,
                             int cnt, const char **rows) {
    tile_rows_of(p, cache, p->row, p->hd, bt, kh, esz, pos, cnt, rows);
}

/* The scale of position pos's row (scales [num_blocks, KVH, block_size]). */
static inline const float *scale_at(const params_t *p, const float *scales, const int64_t *bt, int kh, int pos) {
    const int bs = p->block_size;
    return scales + (bt[pos / bs] * p->KVH + kh) * bs + pos % bs;
}

/* The scales of positions [pos, pos + cnt) into out[VL], 0 past cnt (one block's are contiguous). */
static inline void tile_scales(const params_t *p, const float *scales, const int64_t *bt, int kh, int pos, int cnt,
                               float *out) {
    const int bs = p->block_size;
    int blk = pos / bs, off = pos % bs;
    const float *base = scales + (bt[blk] * p->KVH + kh) * bs;
    if (off + cnt <= bs) {
        memcpy(out, base + off, sizeof(float) * (size_t)cnt);
    } else {
        for (int jj = 0; jj < cnt; jj++) {
            out[jj] = base[off];
            if (++off == bs && jj + 1 < cnt) {
                off = 0;
                base = scales + (bt[++blk] * p->KVH + kh) * bs;
            }
        }
    }
    for (int jj = cnt; jj < VL; jj++) out[jj] = 0.0f;
}

/* A row of K or V as fp32: int8 (kv8) or the query's dtype. */
static inline vf load_kv(const int bf16, const int kv8, const char *p) {
    return kv8 ? load_i8_vec(p) : load_vec(bf16, p);
}

static inline float load_kv_scalar(const int bf16, const int kv8, const char *p, long i) {
    return kv8 ? (float)((const int8_t *)p)[i] : load_scalar(bf16, p, i);
}

#ifndef PF_TILES
#define PF_TILES 2
#endif
/* int8 rows are one cache line: a tile's work is shorter, so the prefetch runs further ahead. */
#ifndef PF_TILES_I8
#define PF_TILES_I8 4
#endif

/* A software prefetch gcc cannot drop (it deletes __builtin_prefetch loops it deems useless, as it did
 * here). */
static inline void prefetch_line(const char *p) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p));
#elif defined(__aarch64__)
    __asm__ volatile("prfm pldl1keep, [%0]" : : "r"(p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

/* Where a pass over one unit's rows goes next, for the prefetch at its end. */
typedef struct {
    const char *cache; /* NULL: nothing to prefetch */
    const int64_t *bt;
    int kh, pos, end;
    const float *scales; /* int8 K/V: that pass's row scales (else NULL) */
} next_pass_t;

/* Positions [pos, pos + VL) (clipped to end) of a pass: their rows into w->rows (with int8 K/V, their scales
 * into w->rs), and the rows PF_TILES tiles ahead into w->ahead (past the end of the pass, those of the pass that
 * comes next; their first scale is prefetched here). */
static inline void pass_tile(const params_t *p, work_t *w, const char *cache, const float *scales,
                             const int64_t *bt, int kh, long esz, int pos, int end, const next_pass_t *next) {
    const int cnt = end - pos < VL ? end - pos : VL;
    tile_rows(p, cache, bt, kh, esz, pos, cnt, w->rows);
    if (scales) tile_scales(p, scales, bt, kh, pos, cnt, w->rs);
    w->n_ahead = 0;
    const int tiles_ahead = scales ? PF_TILES_I8 : PF_TILES;
    if (tiles_ahead == 0) return;
    const int ahead = pos + tiles_ahead * VL;
    if (ahead < end) {
        w->n_ahead = end - ahead < VL ? end - ahead : VL;
        tile_rows(p, cache, bt, kh, esz, ahead, w->n_ahead, w->ahead);
        if (scales) prefetch_line((const char *)scale_at(p, scales, bt, kh, ahead));
    } else if (next->cache) {
        const int np = next->pos + (ahead - end) / VL * VL;
        if (np < next->end) {
            w->n_ahead = next->end - np < VL ? next->end - np : VL;
            tile_rows(p, next->cache, next->bt, next->kh, esz, np, w->n_ahead, w->ahead);
            if (next->scales) prefetch_line((const char *)scale_at(p, next->scales, next->bt, next->kh, np));
        }
    }
}

/* Prefetch ahead row jj (one per key computed: a burst of prefetches would stall on the fill buffers). */
static inline void prefetch_ahead(const work_t *w, int jj, long nbytes) {
    if (jj < w->n_ahead)
        for (long b = 0; b < nbytes; b += 64) prefetch_line(w->ahead[jj] + b);
}

/* Softmax of each head's scores over [0, n), unnormalized; 1 / sum per head into inv_sum. With sinks (p->sinks) the
 * G heads' sink logits of KV head kh join the max and the sum; their weights exp(sink - max) go to sink_w. */
static inline void softmax_rows(const params_t *p, int kh, float *sc, int n, float *inv_sum, float *sink_w) {
    const float *sink = p->sinks ? p->sinks + (long)kh * p->G : NULL;
    const int nv = (n + VL - 1) / VL;
    for (int g = 0; g < p->G; g++) {
        float *s = sc + (long)g * p->ldsc;
        if (p->softcap > 0.0f) {
            const float inv_cap = 1.0f / p->softcap;
            for (int i = 0; i < n; i++) s[i] = tanhf(s[i] * inv_cap) * p->softcap;
        }
        for (int i = n; i < nv * VL; i++) s[i] = -INFINITY;
        vf m = ((vf *)s)[0];
        for (int v = 1; v < nv; v++) {
            vf x = ((vf *)s)[v];
            vi gt = x > m;
            m = (vf)(((vi)x & gt) | ((vi)m & ~gt));
        }
        float mx = hmax(m);
        if (sink && sink[g] > mx) mx = sink[g];
        for (int v = 0; v < nv; v++) ((vf *)s)[v] = exp_vec(((vf *)s)[v] - mx);
        for (int i = n; i < nv * VL; i++) s[i] = 0.0f;
        vf sum = splat(0.0f);
        for (int v = 0; v < nv; v++) sum += ((vf *)s)[v];
        sink_w[g] = sink ? exp_vec(splat(sink[g] - mx))[0] : 0.0f;
        inv_sum[g] = 1.0f / (hsum(sum) + sink_w[g]);
    }
}

/* What a unit (sequence s, KV head kh) reads and writes: its visible keys [start, len), block table and output
 * rows. With no visible key the output rows are zeroed and 0 returned. */
typedef struct {
    int len, start, n;
    const int64_t *bt;
    char *o;
} unit_span_t;

static inline int unit_span(const params_t *p, int s, int kh, long esz, unit_span_t *u) {
    u->len = p->kv_lens[s];
    u->start = first_key(p, u->len);
    u->n = u->len - u->start;
    u->bt = p->block_tables + (long)s * p->bt_stride;
    u->o = p->out + ((long)s * p->o_s0 + (long)kh * p->G * p->o_s1) * esz;
    if (u->n > 0) return 1;
    for (int g = 0; g < p->G; g++) memset(u->o + g * p->o_s1 * esz, 0, (size_t)(p->hd_v * esz));
    return 0;
}

/* Heads whose int8 pass-2 accumulators (C vectors each) fit in registers beside one widened row. */
static inline int pv_heads_i8(const int C) {
    const int regs = VL == 16 ? 32 : 16, n = (regs - 4 - C) / (C > 0 ? C : 1);
    return n < 1 ? 1 : (n > 4 ? 4 : n);
}

/* Pass 2 over one tile's cnt int8 V rows for heads [g0, g0 + NG) (their probabilities pr, row stride ldsc): each
 * row widened once for all NG heads, weighed by probability times row scale, accumulators in registers. */
static inline __attribute__((always_inline)) void pv_tile_i8(const int NG, const int C, const params_t *p, work_t *w,
                                                            int g0, const float *pr, int cnt, long nbytes,
                                                            int prefetch) {
    vf *src = w->acc + (long)g0 * C;
    vf a[4][C];
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < C; c++) a[h][c] = src[h * C + c];
    for (int jj = 0; jj < cnt; jj++) {
        if (prefetch) prefetch_ahead(w, jj, nbytes);
        vf v[C];
        for (int c = 0; c < C; c++) v[c] = load_i8_vec(w->rows[jj] + c * VL);
        const float s = w->rs[jj];
        for (int h = 0; h < NG; h++) {
            const float wt = pr[h * p->ldsc + jj] * s;
            for (int c = 0; c < C; c++) a[h][c] += wt * v[c];
        }
    }
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < C; c++) src[h * C + c] = a[h][c];
}

/* One unit: sequence s, KV head kh, its G query heads; head dim = C * VL (C is a compile-time constant
 * in the common cases). `next` is the unit this thread runs after this one (s < 0: none). kv8: int8 K/V. */
/* Pass 1 for one key row k (C vectors) and NG heads from g0: their dot products with the scaled queries, the
 * heads' sums interleaved (NG independent chains; each head's own order of additions as one head alone). */
static inline __attribute__((always_inline)) void dot_heads(const int NG, const int C, const work_t *w, int g0,
                                                            const vf *k, int jj) {
    vf a[NG];
    for (int h = 0; h < NG; h++) a[h] = w->qv[(g0 + h) * C] * k[0];
    for (int c = 1; c < C; c++)
        for (int h = 0; h < NG; h++) a[h] += w->qv[(g0 + h) * C + c] * k[c];
    for (int h = 0; h < NG; h++) w->tile[(g0 + h) * VL + jj] = a[h];
}

/* Accumulator vectors pass 2 keeps in registers (beside a row vector and the heads' weights): AVX-512 and AArch64
 * have 32 vector registers, AVX2 16. */
#define PV_ACC_REGS (VL == 8 ? 12 : 24)

/* Vectors of a row pass 2 takes at a time for NH heads: the largest divisor of C with NH of them in registers. */
static inline int pv_chunk(const int NH, const int C) {
    int cc = C;
    while (cc > 1 && (NH * cc > PV_ACC_REGS || C % cc)) cc--;
    return cc;
}

/* Pass 2 of one tile for heads [g, g + NH): acc += p * V over its cnt rows, CC vectors of each row at a time (each
 * row vector loaded, and widened, once for the NH heads). pr: head g's probabilities of the tile (the next head's
 * ldsc further). */
static inline __attribute__((always_inline)) void pv_tile(const int bf16, const int NH, const int C, const params_t *p,
                                                          work_t *w, int g, const float *pr, int cnt, long nbytes,
                                                          int prefetch) {
    const long esz = bf16 ? 2 : 4;
    const int CC = pv_chunk(NH, C);
    for (int c0 = 0; c0 < C; c0 += CC) {
        vf a[NH][CC];
        for (int h = 0; h < NH; h++)
            for (int c = 0; c < CC; c++) a[h][c] = w->acc[(g + h) * C + c0 + c];
        for (int jj = 0; jj < cnt; jj++) {
            if (prefetch && c0 == 0) prefetch_ahead(w, jj, nbytes);
            float wt[NH];
            for (int h = 0; h < NH; h++) wt[h] = pr[(long)h * p->ldsc + jj];
            for (int c = 0; c < CC; c++) {
                const vf v = load_vec(bf16, w->rows[jj] + (long)(c0 + c) * VL * esz);
                for (int h = 0; h < NH; h++) a[h][c] += wt[h] * v;
            }
        }
        for (int h = 0; h < NH; h++)
            for (int c = 0; c < CC; c++) w->acc[(g + h) * C + c0 + c] = a[h][c];
    }
}

static inline __attribute__((always_inline)) void unit_vec(const int bf16, const int kv8, const int C,
                                                          const params_t *p, work_t *w, int s, int kh, int next_s,
                                                          int next_kh) {
    const long esz = bf16 ? 2 : 4, kesz = kv8 ? 1 : esz;
    const float *ks = kv8 ? p->k_scales : NULL, *vs = kv8 ? p->v_scales : NULL;
    const int G = p->G;
    const long o_head = p->o_s1 * esz, nbytes = (long)p->hd * kesz;
    unit_span_t u;
    if (!unit_span(p, s, kh, esz, &u)) return;
    const int len = u.len, start = u.start, n = u.n;
    const int64_t *bt = u.bt;
    char *o = u.o;
    /* The scale folds into q (the softcap divides the scaled score). */
    for (int g = 0; g < G; g++) {
        const char *qs = p->q + ((long)s * p->q_s0 + (long)(kh * G + g) * p->q_s1) * esz;
        for (int c = 0; c < C; c++) w->qv[g * C + c] = load_vec(bf16, qs + c * VL * esz) * p->scale;
    }
    /* Pass 1, scores: a tile of VL keys at a time; each key row is loaded once for the G heads. */
    const next_pass_t to_v = {p->value_cache, bt, kh, start, len, vs};
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->key_cache, ks, bt, kh, kesz, t, len, &to_v);
        for (int jj = 0; jj < cnt; jj++) {
            prefetch_ahead(w, jj, nbytes);
            vf k[C];
            for (int c = 0; c < C; c++) k[c] = load_kv(bf16, kv8, w->rows[jj] + c * VL * kesz);
            for (int g0 = 0; g0 < G; g0 += 4) {
                switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: dot_heads(1, C, w, g0, k, jj); break;
                case 2: dot_heads(2, C, w, g0, k, jj); break;
                case 3: dot_heads(3, C, w, g0, k, jj); break;
                default: dot_heads(4, C, w, g0, k, jj); break;
                }
            }
        }
        for (int g = 0; g < G; g++) {
            for (int jj = cnt; jj < VL; jj++) w->tile[g * VL + jj] = splat(0.0f);
            vf scores = reduce_tile(w->tile + g * VL);
            if (kv8) scores *= *(const vf_unaligned *)w->rs;
            *(vf *)(w->sc + (long)g * p->ldsc + (t - start)) = scores;
        }
    }
    softmax_rows(p, kh, w->sc, n, w->inv_sum, w->sink_w);
    /* Pass 2, weighted sum of V rows: a tile of keys at a time, up to three heads at a time in registers. */
    next_pass_t to_next = {NULL, NULL, 0, 0, 0, NULL};
    if (next_s >= 0) {
        const int next_len = p->kv_lens[next_s];
        to_next = (next_pass_t){p->key_cache, p->block_tables + (long)next_s * p->bt_stride, next_kh,
                                first_key(p, next_len), next_len, ks};
    }
    for (int i = 0; i < G * C; i++) w->acc[i] = splat(0.0f);
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->value_cache, vs, bt, kh, kesz, t, len, &to_next);
        if (kv8) {
            const int hmax = pv_heads_i8(C);
            for (int g0 = 0; g0 < G; g0 += hmax) {
                const float *pr = w->sc + (long)g0 * p->ldsc + (t - start);
                switch (G - g0 < hmax ? G - g0 : hmax) {
                case 1: pv_tile_i8(1, C, p, w, g0, pr, cnt, nbytes, g0 == 0); break;
                case 2: pv_tile_i8(2, C, p, w, g0, pr, cnt, nbytes, g0 == 0); break;
                case 3: pv_tile_i8(3, C, p, w, g0, pr, cnt, nbytes, g0 == 0); break;
                default: pv_tile_i8(4, C, p, w, g0, pr, cnt, nbytes, g0 == 0); break;
                }
            }
            continue;
        }
        /* Three heads at a time: a GQA group's heads share each V row load (G = 3, 4, 6, 8 ... in use). */
        for (int g = 0; g < G; g += 3) {
            const float *pr = w->sc + (long)g * p->ldsc + (t - start);
            switch (G - g < 3 ? G - g : 3) {
            case 1: pv_tile(bf16, 1, C, p, w, g, pr, cnt, nbytes, g == 0); break;
            case 2: pv_tile(bf16, 2, C, p, w, g, pr, cnt, nbytes, g == 0); break;
            default: pv_tile(bf16, 3, C, p, w, g, pr, cnt, nbytes, g == 0); break;
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++)
            store_vec(bf16, o + g * o_head + c * VL * esz, w->acc[g * C + c] * w->inv_sum[g]);
}

#if defined(__AVX512BF16__) && VL == 16
#define HAVE_DPBF16 1
/* The AVX512-BF16 path (bf16, head dim = C * 16 with C even): vdpbf16ps, fp32 lane i += a[2i] * b[2i] +
 * a[2i+1] * b[2i+1] (exact products, fp32 sums, DAZ/FTZ, RNE). */

/* Lanes [0, 8) of R[i] hold partial sums of key 2i, lanes [8, 16) of key 2i + 1 -> lane j = key j's sum
 * (the last three levels of reduce_tile's tree). */
static inline __attribute__((always_inline)) __m512 dp_reduce8(__m512 *R) {
    const __m512i l1 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i l2 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
    const __m512i l3 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i h1 = _mm512_add_epi32(l1, _mm512_set1_epi32(4)), h2 = _mm512_add_epi32(l2, _mm512_set1_epi32(2)),
                  h3 = _mm512_add_epi32(l3, _mm512_set1_epi32(1));
    for (int i = 0; i < 4; i++)
        R[i] = _mm512_add_ps(_mm512_permutex2var_ps(R[2 * i], l1, R[2 * i + 1]),
                             _mm512_permutex2var_ps(R[2 * i], h1, R[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        R[i] = _mm512_add_ps(_mm512_permutex2var_ps(R[2 * i], l2, R[2 * i + 1]),
                             _mm512_permutex2var_ps(R[2 * i], h2, R[2 * i + 1]));
    return _mm512_add_ps(_mm512_permutex2var_ps(R[0], l3, R[1]), _mm512_permutex2var_ps(R[0], h3, R[1]));
}

/* Pass 1 over one tile of VL keys (rows past the visible ones repeat the last row: their scores are
 * overwritten by the softmax): keys 2i and 2i + 1 share a vector, m-th of C: dims [16m, 16m + 16) of key 2i in
 * the low half, of key 2i + 1 in the high half; q's pair vectors hold the same 16 dims twice. C dot products
 * per key pair and head leave 8 partial sums per key; dp_reduce8 finishes them, the scale goes on after. */
static inline __attribute__((always_inline)) void dp_k_tile(const int C, const params_t *p, work_t *w, int cnt,
                                                            float *sc, long nbytes) {
    __m512i *kp = (__m512i *)w->kp;
    for (int i = 0; i < VL / 2; i++) {
        const char *r0 = w->rows[2 * i < cnt ? 2 * i : cnt - 1], *r1 = w->rows[2 * i + 1 < cnt ? 2 * i + 1 : cnt - 1];
        for (int m = 0; m < C; m++)
            kp[i * C + m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r0 + 32 * m))),
                                               _mm256_loadu_si256((const __m256i *)(r1 + 32 * m)), 1);
    }
    const __m512 scale = _mm512_set1_ps(p->scale);
    for (int g = 0; g < p->G; g++) {
        const __m512i *qg = (const __m512i *)w->qv + g * C;
        __m512 R[VL / 2];
        for (int i = 0; i < VL / 2; i++) {
            /* The prefetches spread over the first two heads' work (one head: two per key pair). */
            if (g * (VL / 2) + i < VL) prefetch_ahead(w, g * (VL / 2) + i, nbytes);
            if (p->G == 1) prefetch_ahead(w, VL / 2 + i, nbytes);
            __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qg[0], (__m512bh)kp[i * C]);
            for (int m = 1; m < C; m++) a = _mm512_dpbf16_ps(a, (__m512bh)qg[m], (__m512bh)kp[i * C + m]);
            R[i] = a;
        }
        _mm512_store_ps(sc + (long)g * p->ldsc, _mm512_mul_ps(dp_reduce8(R), scale));
    }
}

/* Pass 2 over one tile's cnt rows, output dims [32 * cb0, 32 * (cb0 + CW / 2)) of heads [g0, g0 + NG): keys in
 * pairs, their V rows interleaved 16-bit-wise within 128-bit lanes (unpacklo / unpackhi), each pair against the
 * broadcast bf16 pair of its probabilities; an odd last key pairs with a zero row. Accumulator 2b (lo) of 32-dim
 * block b holds, in 128-bit lane l, dims 32b + 8l + [0, 4); 2b + 1 (hi) dims 32b + 8l + [4, 8). */
static inline __attribute__((always_inline)) void dp_v_tile(const int CW, const int NG, const int C, work_t *w,
                                                            int g0, int cb0, int cnt, const uint32_t *pw, long ldpw,
                                                            long nbytes, int prefetch) {
    __m512 acc[4][4];
    __m512 *src = (__m512 *)w->acc + (long)g0 * C + 2 * cb0;
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < CW; c++) acc[h][c] = src[h * C + c];
    pw += (long)g0 * ldpw;
    for (int jj = 0; jj < cnt; jj += 2) {
        const int odd = jj + 1 == cnt;
        if (prefetch) {
            prefetch_ahead(w, jj, nbytes);
            if (!odd) prefetch_ahead(w, jj + 1, nbytes);
        }
        const char *r0 = w->rows[jj] + 64 * cb0, *r1 = w->rows[odd ? jj : jj + 1] + 64 * cb0;
        __m512bh wp[4];
        for (int h = 0; h < NG; h++) wp[h] = (__m512bh)_mm512_set1_epi32((int)pw[h * ldpw + jj / 2]);
        for (int b = 0; b < CW / 2; b++) {
            const __m512i v0 = _mm512_loadu_si512(r0 + 64 * b);
            const __m512i v1 = odd ? _mm512_setzero_si512() : _mm512_loadu_si512(r1 + 64 * b);
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1), hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
            for (int h = 0; h < NG; h++) {
                acc[h][2 * b] = _mm512_dpbf16_ps(acc[h][2 * b], lo, wp[h]);
                acc[h][2 * b + 1] = _mm512_dpbf16_ps(acc[h][2 * b + 1], hi, wp[h]);
            }
        }
    }
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < CW; c++) src[h * C + c] = acc[h][c];
}

/* unit_vec on the dot products: pass 1 takes q and the K rows as they are (no widening) and scales the fp32
 * scores; the softmax is unit_vec's; pass 2 weighs V by the probabilities rounded to bf16 (1 / the sum of the
 * rounded ones normalizes). */
static inline __attribute__((always_inline)) void unit_dp(const int C, const params_t *p, work_t *w, int s, int kh,
                                                          int next_s, int next_kh) {
    const long esz = 2;
    const int G = p->G;
    const long o_head = p->o_s1 * esz, nbytes = (long)p->hd * esz;
    unit_span_t u;
    if (!unit_span(p, s, kh, esz, &u)) return;
    const int len = u.len, start = u.start, n = u.n;
    const int64_t *bt = u.bt;
    char *o = u.o;
    /* q's pair vectors: [G, C], the m-th holding dims [16m, 16m + 16) in both halves. */
    for (int g = 0; g < G; g++) {
        const char *qs = p->q + ((long)s * p->q_s0 + (long)(kh * G + g) * p->q_s1) * esz;
        for (int m = 0; m < C; m++)
            ((__m512i *)w->qv)[g * C + m] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * m)));
    }
    /* Pass 1, scores. */
    const next_pass_t to_v = {p->value_cache, bt, kh, start, len, NULL};
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->key_cache, NULL, bt, kh, esz, t, len, &to_v);
        dp_k_tile(C, p, w, cnt, w->sc + (t - start), nbytes);
    }
    softmax_rows(p, kh, w->sc, n, w->inv_sum, w->sink_w);
    /* The probabilities to bf16 pairs (keys 2i, 2i + 1 -> pw[i]; past n they are 0), 1 / their sum. */
    const long ldpw = p->ldsc / 2;
    const int nv = (n + VL - 1) / VL;
    for (int g = 0; g < G; g++) {
        const float *sg = w->sc + (long)g * p->ldsc;
        uint32_t *pg = w->pw + g * ldpw;
        __m512 sum = _mm512_setzero_ps();
        for (int v = 0; v < nv; v++) {
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_load_ps(sg + v * VL));
            _mm256_storeu_si256((__m256i *)(pg + v * (VL / 2)), (__m256i)b);
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(b));
        }
        w->inv_sum[g] = 1.0f / (_mm512_reduce_add_ps(sum) + w->sink_w[g]);
    }
    /* Pass 2, weighted sum of V rows: 128 output dims (4 accumulators) of up to 4 heads at a time, else 64. */
    next_pass_t to_next = {NULL, NULL, 0, 0, 0, NULL};
    if (next_s >= 0) {
        const int next_len = p->kv_lens[next_s];
        to_next = (next_pass_t){p->key_cache, p->block_tables + (long)next_s * p->bt_stride, next_kh,
                                first_key(p, next_len), next_len, NULL};
    }
    for (int i = 0; i < G * C; i++) w->acc[i] = splat(0.0f);
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->value_cache, NULL, bt, kh, esz, t, len, &to_next);
        const uint32_t *pw = w->pw + (t - start) / 2;
        if (C % 4 == 0) {
            for (int cb = 0; cb < C / 2; cb += 2)
                for (int g0 = 0; g0 < G; g0 += 4) {
                    const int pf = g0 == 0 && cb == 0;
                    switch (G - g0) {
                    case 1: dp_v_tile(4, 1, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    case 2: dp_v_tile(4, 2, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    case 3: dp_v_tile(4, 3, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    default: dp_v_tile(4, 4, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    }
                }
        } else {
            for (int cb = 0; cb < C / 2; cb++)
                for (int g0 = 0; g0 < G; g0 += 4) {
                    const int pf = g0 == 0 && cb == 0;
                    switch (G - g0) {
                    case 1: dp_v_tile(2, 1, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    case 2: dp_v_tile(2, 2, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    case 3: dp_v_tile(2, 3, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    default: dp_v_tile(2, 4, C, w, g0, cb, cnt, pw, ldpw, nbytes, pf); break;
                    }
                }
        }
    }
    /* Undo the interleave (see dp_v_tile), normalize, round. */
    const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < G; g++) {
        const __m512 *a = (const __m512 *)w->acc + g * C;
        const __m512 inv = _mm512_set1_ps(w->inv_sum[g]);
        for (int b = 0; b < C / 2; b++) {
            const __m512 d0 = _mm512_permutex2var_ps(a[2 * b], idx0, a[2 * b + 1]);
            const __m512 d1 = _mm512_permutex2var_ps(a[2 * b], idx1, a[2 * b + 1]);
            store_vec(1, o + g * o_head + 64 * b, (vf)_mm512_mul_ps(d0, inv));
            store_vec(1, o + g * o_head + 64 * b + 32, (vf)_mm512_mul_ps(d1, inv));
        }
    }
}
#else
#define HAVE_DPBF16 0
#endif

#if defined(__AVX512VNNI__) && VL == 16
#define HAVE_VNNI_I8 1
/* int8 K/V with AVX512-VNNI (head dim = C * 16, C even): integer dot products instead of widening every element to
 * fp32. The scaled query of each head is rounded to int16 (its own scale: max|q| / 32767), so pass 1 is vpdpwssd
 * of q against the K rows widened to int16, exact in int32; each tile's weights p_j * s_j of each head likewise
 * (scale: their max / 32767), so pass 2 is vpdpwssd of weight pairs against pairs of V rows interleaved as in
 * dp_v_tile, exact in int32 per tile, then scaled into fp32 accumulators. Both roundings are relative 2**-16 of
 * the largest element, far below the int8 rounding of K/V. */

/* reduce_tile on int32 lanes (P clobbered): lane i of the result is the sum of P[i]'s lanes. */
static inline __m512i reduce_tile_i32(__m512i *P) {
    const __m512i lo[4] = {_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                           _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                           _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                           _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)};
    int n = 16;
    for (int lev = 0; lev < 4; lev++) {
        n /= 2;
        const __m512i hi = _mm512_add_epi32(lo[lev], _mm512_set1_epi32(n));
        for (int i = 0; i < n; i++)
            P[i] = _mm512_add_epi32(_mm512_permutex2var_epi32(P[2 * i], lo[lev], P[2 * i + 1]),
                                    _mm512_permutex2var_epi32(P[2 * i], hi, P[2 * i + 1]));
    }
    return P[0];
}

/* 16 fp32 -> 16 int16 x / div rounded to nearest even (|x / div| <= 32767). */
static inline __m256i round_i16(__m512 x, __m512 div) {
    return _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_div_ps(x, div)));
}

/* Pass 2 over one tile's cnt int8 V rows for heads [g0, g0 + NG): key pairs interleaved, int32 accumulation,
 * then added to the fp32 accumulators with each head's weight scale. */
static inline __attribute__((always_inline)) void pv_tile_vnni(const int NG, const int C, const params_t *p,
                                                              work_t *w, int g0, int cnt, long nbytes, int prefetch) {
    __m512i acc[4][8];
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < C; c++) acc[h][c] = _mm512_setzero_si512();
    const long ldpw = p->ldsc / 2;
    for (int jj = 0; jj < cnt; jj += 2) {
        const int odd = jj + 1 == cnt;
        if (prefetch) {
            prefetch_ahead(w, jj, nbytes);
            if (!odd) prefetch_ahead(w, jj + 1, nbytes);
        }
        __m512i wp[4];
        for (int h = 0; h < NG; h++) wp[h] = _mm512_set1_epi32((int)w->pw[(g0 + h) * ldpw + jj / 2]);
        const char *r0 = w->rows[jj], *r1 = w->rows[odd ? jj : jj + 1];
        for (int b = 0; b < C / 2; b++) {
            const __m512i v0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(r0 + 32 * b)));
            const __m512i v1 = odd ? _mm512_setzero_si512()
                                   : _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(r1 + 32 * b)));
            const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
            for (int h = 0; h < NG; h++) {
                acc[h][2 * b] = _mm512_dpwssd_epi32(acc[h][2 * b], lo, wp[h]);
                acc[h][2 * b + 1] = _mm512_dpwssd_epi32(acc[h][2 * b + 1], hi, wp[h]);
            }
        }
    }
    for (int h = 0; h < NG; h++) {
        __m512 *dst = (__m512 *)w->acc + (long)(g0 + h) * C;
        const __m512 sw = _mm512_set1_ps(w->hs[p->G + g0 + h]);
        for (int c = 0; c < C; c++) dst[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h][c]), sw, dst[c]);
    }
}

static inline __attribute__((always_inline)) void unit_i8_vnni(const int bf16, const int C, const params_t *p,
                                                              work_t *w, int s, int kh, int next_s, int next_kh) {
    const long esz = bf16 ? 2 : 4, nbytes = p->hd;
    const int G = p->G;
    const long o_head = p->o_s1 * esz;
    unit_span_t u;
    if (!unit_span(p, s, kh, esz, &u)) return;
    const int len = u.len, start = u.start, n = u.n;
    const int64_t *bt = u.bt;
    char *o = u.o;
    /* q * scale rounded to int16 per head: w->qv holds [G, C / 2] vectors of 32 int16, dims in order. */
    for (int g = 0; g < G; g++) {
        const char *qs = p->q + ((long)s * p->q_s0 + (long)(kh * G + g) * p->q_s1) * esz;
        vf qf[C], m = splat(0.0f);
        for (int c = 0; c < C; c++) {
            qf[c] = load_vec(bf16, qs + c * VL * esz) * p->scale;
            const vf a = (vf)((vu)qf[c] & 0x7fffffffu);
            const vi gt = a > m;
            m = (vf)(((vi)a & gt) | ((vi)m & ~gt));
        }
        const float sq = hmax(m) / 32767.0f;
        const __m512 div = _mm512_set1_ps(sq > 0.0f ? sq : 1.0f);
        w->hs[g] = sq;
        for (int b = 0; b < C / 2; b++)
            ((__m512i *)w->qv)[g * (C / 2) + b] = _mm512_inserti64x4(
                _mm512_castsi256_si512(round_i16((__m512)qf[2 * b], div)), round_i16((__m512)qf[2 * b + 1], div), 1);
    }
    /* Pass 1, scores: each K row widened to int16 once for the G heads. */
    const next_pass_t to_v = {p->value_cache, bt, kh, start, len, p->v_scales};
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->key_cache, p->k_scales, bt, kh, 1, t, len, &to_v);
        for (int jj = 0; jj < cnt; jj++) {
            prefetch_ahead(w, jj, nbytes);
            __m512i k[C / 2];
            for (int b = 0; b < C / 2; b++)
                k[b] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w->rows[jj] + 32 * b)));
            for (int g = 0; g < G; g++) {
                const __m512i *qg = (const __m512i *)w->qv + g * (C / 2);
                __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), qg[0], k[0]);
                for (int b = 1; b < C / 2; b++) a = _mm512_dpwssd_epi32(a, qg[b], k[b]);
                ((__m512i *)w->tile)[g * VL + jj] = a;
            }
        }
        const vf rs = *(const vf_unaligned *)w->rs;
        for (int g = 0; g < G; g++) {
            __m512i *tile = (__m512i *)w->tile + g * VL;
            for (int jj = cnt; jj < VL; jj++) tile[jj] = _mm512_setzero_si512();
            /* Exact in int32: a key's sum is at most hd * 32767 * 127. */
            *(vf *)(w->sc + (long)g * p->ldsc + (t - start)) =
                (vf)_mm512_cvtepi32_ps(reduce_tile_i32(tile)) * (rs * w->hs[g]);
        }
    }
    softmax_rows(p, kh, w->sc, n, w->inv_sum, w->sink_w);
    /* Pass 2, weighted sum of V rows, a tile at a time: the tile's weights p_j * s_j to int16 pairs per head. */
    next_pass_t to_next = {NULL, NULL, 0, 0, 0, NULL};
    if (next_s >= 0) {
        const int next_len = p->kv_lens[next_s];
        to_next = (next_pass_t){p->key_cache, p->block_tables + (long)next_s * p->bt_stride, next_kh,
                                first_key(p, next_len), next_len, p->k_scales};
    }
    for (int i = 0; i < G * C; i++) w->acc[i] = splat(0.0f);
    const long ldpw = p->ldsc / 2;
    const int hmax_heads = C <= 4 ? 4 : 2;
    for (int t = start; t < len; t += VL) {
        const int cnt = len - t < VL ? len - t : VL;
        pass_tile(p, w, p->value_cache, p->v_scales, bt, kh, 1, t, len, &to_next);
        const __m512 rs = _mm512_loadu_ps(w->rs);
        for (int g = 0; g < G; g++) {
            const __m512 wt = _mm512_mul_ps(_mm512_load_ps(w->sc + (long)g * p->ldsc + (t - start)), rs);
            const float sw = _mm512_reduce_max_ps(wt) / 32767.0f; /* weights are >= 0 */
            w->hs[G + g] = sw;
            _mm256_storeu_si256((__m256i *)(w->pw + g * ldpw), round_i16(wt, _mm512_set1_ps(sw > 0.0f ? sw : 1.0f)));
        }
        for (int g0 = 0; g0 < G; g0 += hmax_heads) {
            const int pf = g0 == 0;
            switch (G - g0 < hmax_heads ? G - g0 : hmax_heads) {
            case 1: pv_tile_vnni(1, C, p, w, g0, cnt, nbytes, pf); break;
            case 2: pv_tile_vnni(2, C, p, w, g0, cnt, nbytes, pf); break;
            case 3: pv_tile_vnni(3, C, p, w, g0, cnt, nbytes, pf); break;
            default: pv_tile_vnni(4, C, p, w, g0, cnt, nbytes, pf); break;
            }
        }
    }
    /* Undo the interleave (see dp_v_tile), normalize, round. */
    const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < G; g++) {
        const __m512 *a = (const __m512 *)w->acc + g * C;
        const __m512 inv = _mm512_set1_ps(w->inv_sum[g]);
        for (int b = 0; b < C / 2; b++) {
            const __m512 d0 = _mm512_permutex2var_ps(a[2 * b], idx0, a[2 * b + 1]);
            const __m512 d1 = _mm512_permutex2var_ps(a[2 * b], idx1, a[2 * b + 1]);
            store_vec(bf16, o + g * o_head + (32 * b) * esz, (vf)_mm512_mul_ps(d0, inv));
            store_vec(bf16, o + g * o_head + (32 * b + 16) * esz, (vf)_mm512_mul_ps(d1, inv));
        }
    }
}
#else
#define HAVE_VNNI_I8 0
#endif

/* The same for any head dim with plain scalar loops (head dims that are not a multiple of VL). */
static inline __attribute__((always_inline)) void unit_scalar(const int bf16, const int kv8, const params_t *p,
                                                             work_t *w, int s, int kh) {
    const long esz = bf16 ? 2 : 4, kesz = kv8 ? 1 : esz;
    const int G = p->G, hd = p->hd, hv = p->hd_v;
    unit_span_t u;
    if (!unit_span(p, s, kh, esz, &u)) return;
    const int start = u.start, n = u.n;
    const int64_t *bt = u.bt;
    char *o = u.o;
    float *qf = (float *)w->qv, *acc = (float *)w->acc;
    for (int g = 0; g < G; g++) {
        const char *qs = p->q + ((long)s * p->q_s0 + (long)(kh * G + g) * p->q_s1) * esz;
        for (int d = 0; d < hd; d++) qf[g * hd + d] = load_scalar(bf16, qs, d) * p->scale;
    }
    for (int t = 0; t < n; t += VL) {
        const int cnt = n - t < VL ? n - t : VL;
        tile_rows(p, p->key_cache, bt, kh, kesz, start + t, cnt, w->rows);
        if (kv8) tile_scales(p, p->k_scales, bt, kh, start + t, cnt, w->rs);
        for (int jj = 0; jj < cnt; jj++)
            for (int g = 0; g < G; g++) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++)
                    dot += qf[g * hd + d] * load_kv_scalar(bf16, kv8, w->rows[jj], d);
                w->sc[(long)g * p->ldsc + t + jj] = kv8 ? dot * w->rs[jj] : dot;
            }
    }
    softmax_rows(p, kh, w->sc, n, w->inv_sum, w->sink_w);
    for (int i = 0; i < G * hv; i++) acc[i] = 0.0f;
    for (int t = 0; t < n; t += VL) {
        const int cnt = n - t < VL ? n - t : VL;
        tile_rows_of(p, p->value_cache, p->row_v, hv, bt, kh, kesz, start + t, cnt, w->rows);
        if (kv8) tile_scales(p, p->v_scales, bt, kh, start + t, cnt, w->rs);
        for (int jj = 0; jj < cnt; jj++)
            for (int g = 0; g < G; g++) {
                const float pr = w->sc[(long)g * p->ldsc + t + jj] * (kv8 ? w->rs[jj] : 1.0f);
                for (int d = 0; d < hv; d++) acc[g * hv + d] += pr * load_kv_scalar(bf16, kv8, w->rows[jj], d);
            }
    }
    for (int g = 0; g < G; g++) {
        char *og = o + g * p->o_s1 * esz;
        for (int d = 0; d < hv; d++) {
            const float x = acc[g * hv + d] * w->inv_sum[g];
            if (bf16)
                ((uint16_t *)og)[d] = f32_to_bf16(x);
            else
                ((float *)og)[d] = x;
        }
    }
}

static inline __attribute__((always_inline)) int paged_decode_attention(
    const int bf16, const int kv8, const hf_attention_t *a, const hf_seqs_t *seqs, const void *q, long q_s0,
    long q_s1, void *out, long o_s0, long o_s1, int num_threads) {
    const int D = seqs->num_seqs, H = a->H, KVH = a->KVH, hd = a->hd, block_size = a->block_size, window = a->window;
    const int hd_v = a->hd_v > 0 ? a->hd_v : hd, chunk = a->chunk > 0 ? a->chunk : 0;
    const int32_t *kv_lens = seqs->kv_lens;
    if (D <= 0) return 0;
    if (KVH <= 0 || H % KVH != 0 || hd <= 0 || block_size <= 0) return -1;
    params_t p = {(const char *)q, (const char *)a->key_cache, (const char *)a->value_cache, (char *)out,
                  seqs->block_tables, kv_lens, q_s0, q_s1, o_s0, o_s1, seqs->bt_stride, (long)KVH * hd,
                  H, KVH, H / KVH, hd, block_size, window, a->scale, a->softcap, 0, a->key_scales, a->value_scales,
                  hd_v, chunk, (long)KVH * hd_v, a->sinks};
    int max_len = 1;
    for (int s = 0; s < D; s++) {
        const int n = kv_lens[s] - first_key(&p, kv_lens[s]);
        if (n > max_len) max_len = n;
    }
    p.ldsc = (max_len + VL - 1) / VL * VL;
    /* Tiny steps are not worth waking the team. */
    if ((long)D * max_len * H * hd < 32768) num_threads = 1;
    if (num_threads < 1) num_threads = 1;
    const int per_task = D >= 4 * num_threads ? KVH : 1; /* units per task */
    const long n_tasks = (long)D * KVH / per_task;
    if (num_threads > n_tasks) num_threads = (int)n_tasks;
    const int C = hd % VL == 0 && hd_v == hd ? hd / VL : 0; /* 0: unit_scalar */
    const int G = p.G;
    const size_t per_head = (size_t)((hd > hd_v ? hd : hd_v) + VL - 1) / VL; /* vectors per head row */
    const size_t ws_bytes = sizeof(vf) * ((size_t)G * (2 * per_head + VL) + VL / 2 * per_head) +
                            sizeof(float) * (size_t)G * (p.ldsc + 4) + sizeof(uint32_t) * (size_t)G * (p.ldsc / 2);
    long counter = 0;
    int err = 0;
#pragma omp parallel num_threads(num_threads)
    {
        char *ws = (char *)aligned_alloc(64, (ws_bytes + 63) / 64 * 64);
        if (!ws) {
#pragma omp atomic write
            err = -2;
        } else {
            work_t w;
            w.qv = (vf *)ws;
            w.acc = w.qv + G * per_head;
            w.tile = w.acc + G * per_head;
            w.kp = w.tile + G * VL;
            w.sc = (float *)(w.kp + VL / 2 * per_head);
            w.inv_sum = w.sc + (size_t)G * p.ldsc;
            w.pw = (uint32_t *)(w.inv_sum + G);
            w.hs = (float *)(w.pw + (size_t)G * (p.ldsc / 2));
            w.sink_w = w.hs + 2 * G;
            /* Dynamic scheduling by hand: the next task is claimed before the current one runs, so that its
             * first rows can be prefetched while the current one ends. */
            long task, next;
#pragma omp atomic capture
            task = counter++;
            while (task < n_tasks) {
#pragma omp atomic capture
                next = counter++;
                const long first = task * per_task;
                for (long u = first; u < first + per_task; u++) {
                    const int s = (int)(u / KVH), kh = (int)(u % KVH);
                    const long nu = u + 1 < first + per_task ? u + 1 : (next < n_tasks ? next * per_task : -1);
                    const int ns = nu < 0 ? -1 : (int)(nu / KVH), nk = nu < 0 ? 0 : (int)(nu % KVH);
                    /* The switch sits inside the parallel region so that C is a constant in the outlined body. */
#if HAVE_VNNI_I8
                    if (kv8 && C > 0 && C % 2 == 0 && C <= 8) {
                        switch (C) {
                        case 2: unit_i8_vnni(bf16, 2, &p, &w, s, kh, ns, nk); break;
                        case 4: unit_i8_vnni(bf16, 4, &p, &w, s, kh, ns, nk); break;
                        case 6: unit_i8_vnni(bf16, 6, &p, &w, s, kh, ns, nk); break;
                        default: unit_i8_vnni(bf16, 8, &p, &w, s, kh, ns, nk); break;
                        }
                        continue;
                    }
#endif
                    if (kv8) {
                        switch (C) {
                        case 64 / VL: unit_vec(bf16, 1, 64 / VL, &p, &w, s, kh, ns, nk); break;
                        case 128 / VL: unit_vec(bf16, 1, 128 / VL, &p, &w, s, kh, ns, nk); break;
                        case 0: unit_scalar(bf16, 1, &p, &w, s, kh); break;
                        default: unit_vec(bf16, 1, C, &p, &w, s, kh, ns, nk); break;
                        }
                        continue;
                    }
#if HAVE_DPBF16
                    if (bf16 && C > 0 && C % 2 == 0) {
                        switch (C) {
                        case 4: unit_dp(4, &p, &w, s, kh, ns, nk); break;
                        case 8: unit_dp(8, &p, &w, s, kh, ns, nk); break;
                        default: unit_dp(C, &p, &w, s, kh, ns, nk); break;
                        }
                        continue;
                    }
#endif
                    switch (C) {
                    case 64 / VL: unit_vec(bf16, 0, 64 / VL, &p, &w, s, kh, ns, nk); break;
                    case 128 / VL: unit_vec(bf16, 0, 128 / VL, &p, &w, s, kh, ns, nk); break;
                    case 0: unit_scalar(bf16, 0, &p, &w, s, kh); break;
                    default: unit_vec(bf16, 0, C, &p, &w, s, kh, ns, nk); break;
                    }
                }
                task = next;
            }
            free(ws);
        }
    }
    return err;
}

/* Returns 0, or < 0 on bad arguments (a scale table without the other) or no memory. The int8 kernels where the
 * caches come with scales; fp32 or bf16 as attn->bf16 says. */
int hf_paged_decode_attention(const hf_attention_t *attn, const hf_seqs_t *seqs, const void *q, long q_s0, long q_s1,
                              void *out, long o_s0, long o_s1, int num_threads) {
    if (!attn->key_scales != !attn->value_scales) return -1;
    if (attn->key_scales)
        return attn->bf16 ? paged_decode_attention(1, 1, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads)
                          : paged_decode_attention(0, 1, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads);
    return attn->bf16 ? paged_decode_attention(1, 0, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads)
                      : paged_decode_attention(0, 0, attn, seqs, q, q_s0, q_s1, out, o_s0, o_s1, num_threads);
}

/* Scatter the K and V rows of T new tokens into their slots: k/v [T, KVH, hd] with element strides k_s0 (token)
 * and k_s1 (head), head_dim contiguous; caches [num_blocks * block_size, KVH, hd] contiguous; esz bytes an
 * element. A few hundred bytes a row: plain copies, no threads. */
void paged_write_kv(const char *k, long k_s0, long k_s1, const char *v, long v_s0, long v_s1,
                    const int64_t *slots, long T, char *key_cache, char *value_cache, int KVH, int hd, int hd_v,
                    int esz) {
    const size_t row = (size_t)hd * esz, row_v = (size_t)hd_v * esz;
    for (long t = 0; t < T; t++) {
        const long base = slots[t] * KVH;
        for (int h = 0; h < KVH; h++) {
            memcpy(key_cache + (base + h) * row, k + (t * k_s0 + h * k_s1) * esz, row);
            memcpy(value_cache + (base + h) * row_v, v + (t * v_s0 + h * v_s1) * esz, row_v);
        }
    }
}

/* One row x[0, hd) (fp32 or bf16) -> int8 q and its scale: scale = max|x| / 127, q = x / scale rounded half to
 * even (an all-zero row: scale 0, q 0). Division, not a reciprocal: the bits of cache_ops.quantize_int8. */
static inline void quantize_row(const int bf16, const char *x, int hd, int8_t *q, float *scale) {
    const long esz = bf16 ? 2 : 4;
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: (y + magic) - magic rounds |y| < 2^22 half to even */
    float amax = 0.0f;
    int d = 0;
    vf m = splat(0.0f);
    for (; d + VL <= hd; d += VL) {
        const vf a = (vf)((vu)load_vec(bf16, x + d * esz) & 0x7fffffffu);
        const vi gt = a > m;
        m = (vf)(((vi)a & gt) | ((vi)m & ~gt));
    }
    if (d) amax = hmax(m);
    for (; d < hd; d++) {
        const float a = fabsf(load_scalar(bf16, x, d));
        amax = a > amax ? a : amax;
    }
    const float s = amax / 127.0f, div = s > 0.0f ? s : 1.0f;
    *scale = s;
    d = 0;
    for (; d + VL <= hd; d += VL) {
        vf y = (load_vec(bf16, x + d * esz) / div + magic) - magic;
        const vi hi = y > 127.0f, lo = y < -127.0f;
        y = (vf)(((vi)y & ~(hi | lo)) | ((vi)splat(127.0f) & hi) | ((vi)splat(-127.0f) & lo));
        *(vb_unaligned *)(q + d) = __builtin_convertvector(__builtin_convertvector(y, vi), vb);
    }
    for (; d < hd; d++) {
        float y = (load_scalar(bf16, x, d) / div + 12582912.0f) - 12582912.0f;
        y = y > 127.0f ? 127.0f : (y < -127.0f ? -127.0f : y);
        q[d] = (int8_t)y;
    }
}

/* paged_write_kv into int8 caches [num_blocks, block_size, KVH, hd (hd_v)] with their scales [num_blocks, KVH,
 * block_size]: each (token, head) row of k/v (fp32, or bf16 when bf16) quantized on its own. */
void paged_write_kv_i8(const char *k, long k_s0, long k_s1, const char *v, long v_s0, long v_s1,
                       const int64_t *slots, long T, int8_t *key_cache, int8_t *value_cache, float *key_scales,
                       float *value_scales, int KVH, int hd, int hd_v, int block_size, int bf16) {
    const long esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (T * KVH * (hd + hd_v) >= 131072)
    for (long t = 0; t < T; t++) {
        const long slot = slots[t], blk = slot / block_size, off = slot % block_size;
        for (int h = 0; h < KVH; h++) {
            const long row = (slot * KVH + h) * hd, row_v = (slot * KVH + h) * hd_v;
            const long sc = (blk * KVH + h) * block_size + off;
            if (bf16) {
                quantize_row(1, k + (t * k_s0 + h * k_s1) * esz, hd, key_cache + row, key_scales + sc);
                quantize_row(1, v + (t * v_s0 + h * v_s1) * esz, hd_v, value_cache + row_v, value_scales + sc);
            } else {
                quantize_row(0, k + (t * k_s0 + h * k_s1) * esz, hd, key_cache + row, key_scales + sc);
                quantize_row(0, v + (t * v_s0 + h * v_s1) * esz, hd_v, value_cache + row_v, value_scales + sc);
            }
        }
    }
}

/* The vector width in floats this library was built for. */
int paged_decode_attention_vector_width(void) { return VL; }
