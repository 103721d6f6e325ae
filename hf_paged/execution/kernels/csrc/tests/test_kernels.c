/* Tests of the CPU kernels' C library (the .c files above) against naive oracles in this file, in plain C: no
 * Python, so the same harness runs natively on every x86-64 tier and on AArch64 under qemu-user
 * (tests/test_c_kernels_cross.py builds and runs it).
 *
 *   cc -O3 -fopenmp -fno-strict-aliasing -std=gnu11 -march=... -Wall -Wextra test_kernels.c ../[a-z]*.c -o t -lm
 *   OMP_NUM_THREADS=2 ./t [substring...]    (only the cases whose name contains one of the substrings)
 *
 * Every exported kernel family on random data: paged decode attention (fp32, bf16, int8 K/V with fp32 or bf16 queries;
 * GQA groups 1 and 4; head dims 34 (the scalar path on every target), 40 (a run-time vector count where the vector
 * width divides it), 64, 128; block sizes 8 and 16; sequence lengths 0, 1, 2 and lengths that are and are not multiples
 * of the block; sliding window; chunked attention; softcap; attention sinks; values of another width than the keys),
 * the cache writes (fp32, bf16, int8; values of another width), paged prefill attention (chunks after a cached prefix,
 * query rows with gaps between sequences; sinks; values of another width), the fused ops (rms_norm, add_rms_norm, rope,
 * rope_write_kv, silu_mul, argmax_rows), the small linear and AMX kernels where the target has
 * them (their probes must report 0 elsewhere), and the argument checks; of hf_llama_decode_layer, which chains the
 * others through the linear kernels, only the workspace size. The prototypes and argument structs are the library's
 * header's (hf_paged_kernels.h), as cpu_library reads them. Caches hold NaN (or NaN scales) everywhere no
 * visible key is, block tables are shuffled and point past their used entries at a NaN block, and outputs are
 * padded with sentinels that must survive: a kernel that reads or writes where it should not fails. The oracles
 * compute in double (rope and the int8 quantization in float, as the kernels promise the same bits). One line per
 * case; exit status 1 on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../hf_paged_kernels.h" /* the library's exported functions and their argument structs */

/* ---- helpers ------------------------------------------------------------------------------------------------ */
static char **filters; /* run the cases whose name contains one of these (all when there are none) */
static int n_filters, n_cases, n_failed;

static int selected(const char *name) {
    for (int i = 0; i < n_filters; i++)
        if (strstr(name, filters[i])) return 1;
    return n_filters == 0;
}

static void report(const char *name, int ok, double err, double tol) {
    n_cases++;
    if (!ok) n_failed++;
    printf("%s %s  err=%.3g tol=%.3g\n", ok ? "ok  " : "FAIL", name, err, tol);
    fflush(stdout);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static uint64_t rng = 0x243F6A8885A308D3ull;
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float urand(float lo, float hi) { return lo + (hi - lo) * (float)(next_u64() >> 40) * (1.0f / 16777216.0f); }
static int irand(int lo, int hi) { return lo + (int)(next_u64() % (uint64_t)(hi - lo + 1)); } /* [lo, hi] */

static void shuffle(int *a, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = irand(0, i), t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static uint16_t to_bf16(float f) { /* nearest even; NaN stays a quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float rnd(int bf16, float x) { return bf16 ? from_bf16(to_bf16(x)) : x; }

/* Element i of a buffer of fp32 or bf16. */
static void put(void *buf, int bf16, long i, float x) {
    if (bf16)
        ((uint16_t *)buf)[i] = to_bf16(x);
    else
        ((float *)buf)[i] = x;
}
static float get(const void *buf, int bf16, long i) {
    return bf16 ? from_bf16(((const uint16_t *)buf)[i]) : ((const float *)buf)[i];
}
static int same_bits(const void *buf, int bf16, long i, float x) { /* element i holds exactly x's bits */
    if (bf16) return ((const uint16_t *)buf)[i] == to_bf16(x);
    return memcmp((const float *)buf + i, &x, 4) == 0;
}

/* Products the compiler may not fuse into a multiply-add (the oracles of the bit-exact ops round each product). */
static float mulf(float a, float b) {
    volatile float r = a * b;
    return r;
}

#define SENTINEL (-777.0f)

/* ---- paged caches shared by decode and prefill ------------------------------------------------------------ */
typedef struct {
    int bf16, kv8, KVH, hd, bs, num_blocks, hd_v;
    void *k, *v;       /* [num_blocks, bs, KVH, hd] ([..., hd_v] for v): fp32, bf16 or int8 */
    float *ks, *vs;    /* int8: [num_blocks, KVH, bs] */
    int64_t *bt;       /* [S, bt_stride] */
    long bt_stride;
} caches_t;

/* Caches for S sequences of lens[s] keys: NaN (NaN scales for int8) everywhere, then random values at the
 * sequences' positions through shuffled block tables whose unused entries point at a block left NaN. */
static caches_t make_caches(int bf16, int kv8, int KVH, int hd, int hd_v, int bs, int S, const int *lens) {
    caches_t c = {bf16, kv8, KVH, hd, bs, 0, hd_v, NULL, NULL, NULL, NULL, NULL, 0};
    int used = 0, max_blocks = 0;
    for (int s = 0; s < S; s++) {
        const int nb = (lens[s] + bs - 1) / bs;
        used += nb;
        if (nb > max_blocks) max_blocks = nb;
    }
    c.num_blocks = used + 3;
    c.bt_stride = max_blocks + 2;
    int *perm = xmalloc(sizeof(int) * c.num_blocks);
    for (int i = 0; i < c.num_blocks; i++) perm[i] = i;
    shuffle(perm, c.num_blocks);
    const int poison = perm[c.num_blocks - 1];
    c.bt = xmalloc(sizeof(int64_t) * S * c.bt_stride);
    int next = 0;
    for (int s = 0; s < S; s++)
        for (long b = 0; b < c.bt_stride; b++)
            c.bt[s * c.bt_stride + b] = b < (lens[s] + bs - 1) / bs ? perm[next++] : poison;
    free(perm);
    const long slots = (long)c.num_blocks * bs * KVH, esz = kv8 ? 1 : (bf16 ? 2 : 4);
    c.k = xmalloc(slots * hd * esz);
    c.v = xmalloc(slots * hd_v * esz);
    for (int value = 0; value < 2; value++)
        for (long i = 0; i < slots * (value ? hd_v : hd); i++) {
            if (kv8)
                ((int8_t *)(value ? c.v : c.k))[i] = (int8_t)irand(-127, 127);
            else
                put(value ? c.v : c.k, bf16, i, NAN);
        }
    if (kv8) {
        const long n = (long)c.num_blocks * KVH * bs;
        c.ks = xmalloc(sizeof(float) * n);
        c.vs = xmalloc(sizeof(float) * n);
        for (long i = 0; i < n; i++) c.ks[i] = c.vs[i] = NAN;
    }
    for (int s = 0; s < S; s++)
        for (int pos = 0; pos < lens[s]; pos++) {
            const long blk = c.bt[s * c.bt_stride + pos / bs], slot = blk * bs + pos % bs;
            for (int h = 0; h < KVH; h++) {
                if (kv8) {
                    c.ks[(blk * KVH + h) * bs + pos % bs] = urand(0.005f, 0.02f);
                    c.vs[(blk * KVH + h) * bs + pos % bs] = urand(0.004f, 0.008f);
                } else {
                    for (int d = 0; d < hd; d++) put(c.k, bf16, (slot * KVH + h) * hd + d, urand(-2.0f, 2.0f));
                    for (int d = 0; d < hd_v; d++) put(c.v, bf16, (slot * KVH + h) * hd_v + d, urand(-1.0f, 1.0f));
                }
            }
        }
    return c;
}

static void free_caches(caches_t *c) {
    free(c->k);
    free(c->v);
    free(c->ks);
    free(c->vs);
    free(c->bt);
}

/* K or V element d of (sequence s, position pos, KV head h), dequantized. */
static double cache_at(const caches_t *c, int value, int s, int pos, int h, int d) {
    const long blk = c->bt[s * c->bt_stride + pos / c->bs], slot = blk * c->bs + pos % c->bs;
    const long i = (slot * c->KVH + h) * (value ? c->hd_v : c->hd) + d;
    const void *buf = value ? c->v : c->k;
    if (c->kv8) {
        const float *sc = value ? c->vs : c->ks;
        return (double)((const int8_t *)buf)[i] * sc[(blk * c->KVH + h) * c->bs + pos % c->bs];
    }
    return get(buf, c->bf16, i);
}

/* Keys and values [0, n) of sequence s, KV head h, dequantized into dense [n, hd] / [n, hd_v] rows. */
static void gather(const caches_t *c, int s, int h, int n, double *K, double *V) {
    for (int j = 0; j < n; j++) {
        for (int d = 0; d < c->hd; d++) K[(long)j * c->hd + d] = cache_at(c, 0, s, j, h, d);
        for (int d = 0; d < c->hd_v; d++) V[(long)j * c->hd_v + d] = cache_at(c, 1, s, j, h, d);
    }
}

/* Attention of one query row q[hd] (already scaled) over dense keys [start, end) -> out[hd_v]; a sink logit (NAN:
 * none) joins the softmax's denominator. */
static void attend(const double *K, const double *V, int hd, int hd_v, const double *q, int start, int end,
                   double softcap, double sink, double *out, double *scores) {
    for (int d = 0; d < hd_v; d++) out[d] = 0.0;
    if (end <= start) return;
    double m = sink == sink ? sink : -INFINITY, sum = 0.0;
    for (int j = start; j < end; j++) {
        double x = 0.0;
        for (int d = 0; d < hd; d++) x += q[d] * K[(long)j * hd + d];
        if (softcap > 0.0) x = tanh(x / softcap) * softcap;
        scores[j - start] = x;
        if (x > m) m = x;
    }
    if (sink == sink) sum = exp(sink - m);
    for (int j = start; j < end; j++) {
        const double p = exp(scores[j - start] - m);
        sum += p;
        for (int d = 0; d < hd_v; d++) out[d] += p * V[(long)j * hd_v + d];
    }
    for (int d = 0; d < hd_v; d++) out[d] /= sum;
}

/* Sink logits for H heads, large enough to take a share of each row's weight (NULL when off). */
static float *make_sinks(int on, int H) {
    if (!on) return NULL;
    float *sinks = xmalloc(sizeof(float) * H);
    for (int h = 0; h < H; h++) sinks[h] = urand(-1.0f, 3.0f);
    return sinks;
}

static const char *dtype_name(int bf16, int kv8) {
    return kv8 ? (bf16 ? "bf16_i8" : "f32_i8") : (bf16 ? "bf16" : "f32");
}

/* Tolerances (max abs error; |v| <= 1 so outputs are <= 1): fp32 accumulation; int8 K/V with VNNI rounds the
 * scaled query and the weights to int16 (relative 2**-16); bf16 rounds the output (2**-9) and, with AVX512-BF16,
 * the probabilities. */
static double attention_tol(int bf16, int kv8) { return bf16 ? 1e-2 : (kv8 ? 5e-4 : 1e-5); }

/* ---- paged decode attention ----------------------------------------------------------------------------- */
/* hd_v: the values' width (0: hd); chunk: chunked attention (0: off); sinks: attention sinks on. */
static void test_decode_x(int bf16, int kv8, int G, int hd, int bs, int window, float softcap, int threads, int hd_v,
                          int chunk, int sinks_on) {
    char name[200], extra[80] = "";
    if (hd_v || chunk || sinks_on) snprintf(extra, sizeof extra, " hd_v=%d chunk=%d sinks=%d", hd_v, chunk, sinks_on);
    snprintf(name, sizeof name, "decode %s G=%d hd=%d bs=%d window=%d softcap=%g threads=%d%s",
             dtype_name(bf16, kv8), G, hd, bs, window, softcap, threads, extra);
    if (!selected(name)) return;
    enum { D = 9 };
    const int KVH = 2, H = KVH * G, hv = hd_v ? hd_v : hd, wide = hd > hv ? hd : hv;
    const int lens[D] = {1, 5, bs, bs + 1, 33, 0, 4 * bs, 70, 2};
    int32_t kv_lens[D];
    for (int s = 0; s < D; s++) kv_lens[s] = lens[s];
    caches_t c = make_caches(bf16, kv8, KVH, hd, hv, bs, D, lens);
    float *sinks = make_sinks(sinks_on, H);
    const long q_s1 = hd + 3, q_s0 = H * q_s1 + 1, o_s1 = hv + 5, o_s0 = H * o_s1 + 2;
    void *q = xmalloc((size_t)D * q_s0 * 4), *out = xmalloc((size_t)D * o_s0 * 4);
    for (long i = 0; i < D * q_s0; i++) put(q, bf16, i, urand(-2.0f, 2.0f));
    for (long i = 0; i < D * o_s0; i++) put(out, bf16, i, SENTINEL);
    const float scale = 1.0f / sqrtf((float)hd);
    const hf_attention_t attn = {c.k, c.v, c.ks, c.vs, H, KVH, hd, bs, window, scale, softcap, bf16, hd_v, chunk,
                                 sinks};
    const hf_seqs_t seqs = {c.bt, c.bt_stride, kv_lens, NULL, NULL, D};
    const int rc = hf_paged_decode_attention(&attn, &seqs, q, q_s0, q_s1, out, o_s0, o_s1, threads);
    double err = rc == 0 ? 0.0 : INFINITY, qd[128], ref[256], scores[256];
    double *K = xmalloc(sizeof(double) * 256 * wide), *V = xmalloc(sizeof(double) * 256 * wide);
    int outside = 0;
    for (int s = 0; s < D && rc == 0; s++)
        for (int h = 0; h < H; h++) {
            const int len = lens[s];
            int start = window > 0 && len > window ? len - window : 0;
            if (chunk > 0 && len > 0) start = (len - 1) / chunk * chunk;
            if (h % G == 0) gather(&c, s, h / G, len, K, V);
            for (int d = 0; d < hd; d++) qd[d] = (double)(get(q, bf16, s * q_s0 + h * q_s1 + d) * scale);
            attend(K, V, hd, hv, qd, start, len, softcap, sinks ? sinks[h] : NAN, ref, scores);
            for (int d = 0; d < hv; d++) {
                const double e = fabs(get(out, bf16, s * o_s0 + h * o_s1 + d) - ref[d]);
                err = e > err || e != e ? e : err;
            }
        }
    free(K);
    free(V);
    for (long i = 0; i < D * o_s0; i++) { /* nothing written outside the rows */
        const long r = i % o_s0, h = r / o_s1, d = r % o_s1;
        if ((h >= H || d >= hv) && !same_bits(out, bf16, i, SENTINEL)) outside++;
    }
    const double tol = attention_tol(bf16, kv8);
    report(name, rc == 0 && err <= tol && !outside, outside ? INFINITY : err, tol);
    free(q);
    free(out);
    free(sinks);
    free_caches(&c);
}

static void test_decode(int bf16, int kv8, int G, int hd, int bs, int window, float softcap, int threads) {
    test_decode_x(bf16, kv8, G, hd, bs, window, softcap, threads, 0, 0, 0);
}

/* ---- paged prefill attention ---------------------------------------------------------------------------- */
static void test_prefill_x(int bf16, int kv8, int G, int hd, int bs, int big, int threads, int hd_v, int sinks_on) {
    char name[200], extra[80] = "";
    if (hd_v || sinks_on) snprintf(extra, sizeof extra, " hd_v=%d sinks=%d", hd_v, sinks_on);
    snprintf(name, sizeof name, "prefill %s G=%d hd=%d bs=%d%s threads=%d%s", dtype_name(bf16, kv8), G, hd, bs,
             big ? " long" : "", threads, extra);
    if (!selected(name)) return;
    enum { S = 5 };
    const int KVH = 2, H = KVH * G, hv = hd_v ? hd_v : hd, wide = hd > hv ? hd : hv;
    /* Query chunks after cached prefixes: none, not a multiple of the block, a multiple of it, an empty chunk;
     * "long": a chunk longer than a unit's 128 tokens. */
    const int q_lens[S] = {5, 9, 37, 0, big ? 130 : 3}, kv[S] = {5, 9 + bs + 3, 37 + 2 * bs, 10, big ? 141 : 3 + bs};
    int32_t qs32[S], ql32[S], kv32[S];
    int T = 1; /* a gap row before and between the sequences */
    for (int s = 0; s < S; s++) {
        qs32[s] = T;
        ql32[s] = q_lens[s];
        kv32[s] = kv[s];
        T += q_lens[s] + 1;
    }
    caches_t c = make_caches(bf16, kv8, KVH, hd, hv, bs, S, kv);
    float *sinks = make_sinks(sinks_on, H);
    const long q_s1 = hd + 8, q_s0 = H * q_s1 + 16, o_s1 = hv + 5, o_s0 = H * o_s1 + 2;
    void *q = xmalloc((size_t)T * q_s0 * 4), *out = xmalloc((size_t)T * o_s0 * 4);
    for (long i = 0; i < T * q_s0; i++) put(q, bf16, i, urand(-2.0f, 2.0f));
    for (long i = 0; i < T * o_s0; i++) put(out, bf16, i, SENTINEL);
    const float scale = 1.0f / sqrtf((float)hd);
    const hf_attention_t attn = {c.k, c.v, c.ks, c.vs, H, KVH, hd, bs, 0, scale, 0.0f, bf16, hd_v, 0, sinks};
    const hf_seqs_t seqs = {c.bt, c.bt_stride, kv32, qs32, ql32, S};
    const int rc = hf_paged_prefill_attention(&attn, &seqs, q, q_s0, q_s1, out, o_s0, o_s1, threads);
    double err = rc == 0 ? 0.0 : INFINITY, qd[128], ref[256], scores[256];
    double *K = xmalloc(sizeof(double) * 256 * wide), *V = xmalloc(sizeof(double) * 256 * wide);
    char *written = xmalloc((size_t)T);
    memset(written, 0, (size_t)T);
    for (int s = 0; s < S && rc == 0; s++)
        for (int h = 0; h < H; h++) {
            if (h % G == 0) gather(&c, s, h / G, kv[s], K, V);
            for (int t = 0; t < q_lens[s]; t++) {
                const long row = qs32[s] + t;
                written[row] = 1;
                for (int d = 0; d < hd; d++) qd[d] = (double)(get(q, bf16, row * q_s0 + h * q_s1 + d) * scale);
                attend(K, V, hd, hv, qd, 0, kv[s] - q_lens[s] + t + 1, 0.0, sinks ? sinks[h] : NAN, ref, scores);
                for (int d = 0; d < hv; d++) {
                    const double e = fabs(get(out, bf16, row * o_s0 + h * o_s1 + d) - ref[d]);
                    err = e > err || e != e ? e : err;
                }
            }
        }
    free(K);
    free(V);
    int outside = 0;
    for (long i = 0; i < T * o_s0; i++) {
        const long t = i / o_s0, r = i % o_s0, h = r / o_s1, d = r % o_s1;
        if ((!written[t] || h >= H || d >= hv) && !same_bits(out, bf16, i, SENTINEL)) outside++;
    }
    const double tol = attention_tol(bf16, kv8);
    report(name, rc == 0 && err <= tol && !outside, outside ? INFINITY : err, tol);
    free(written);
    free(q);
    free(out);
    free(sinks);
    free_caches(&c);
}

static void test_prefill(int bf16, int kv8, int G, int hd, int bs, int big, int threads) {
    test_prefill_x(bf16, kv8, G, hd, bs, big, threads, 0, 0);
}

/* ---- the cache writes -------------------------------------------------------------------------------------- */
/* T distinct random slots of num_slots. */
static int64_t *random_slots(long T, long num_slots) {
    int *all = xmalloc(sizeof(int) * num_slots);
    for (long i = 0; i < num_slots; i++) all[i] = (int)i;
    shuffle(all, (int)num_slots);
    int64_t *slots = xmalloc(sizeof(int64_t) * T);
    for (long t = 0; t < T; t++) slots[t] = all[t];
    free(all);
    return slots;
}

/* The slot of each cache row (-1: none written). */
static long *slot_owner(const int64_t *slots, long T, long num_slots) {
    long *owner = xmalloc(sizeof(long) * num_slots);
    for (long i = 0; i < num_slots; i++) owner[i] = -1;
    for (long t = 0; t < T; t++) owner[slots[t]] = t;
    return owner;
}

static void test_write_kv(int bf16, int KVH, int hd, long T, int hd_v) {
    char name[160];
    snprintf(name, sizeof name, "write_kv %s KVH=%d hd=%d T=%ld%s", bf16 ? "bf16" : "f32", KVH, hd, T,
             hd_v ? " hd_v" : "");
    if (!selected(name)) return;
    const int hv = hd_v ? hd_v : hd;
    const long num_slots = 2 * T + 7, k_s1 = hd + 2, k_s0 = KVH * k_s1 + 1, v_s1 = hv + 1, v_s0 = KVH * v_s1 + 3;
    const long esz = bf16 ? 2 : 4, k_elems = num_slots * KVH * hd, v_elems = num_slots * KVH * hv;
    void *k = xmalloc(T * k_s0 * esz), *v = xmalloc(T * v_s0 * esz);
    void *kc = xmalloc(k_elems * esz), *vc = xmalloc(v_elems * esz);
    for (long i = 0; i < T * k_s0; i++) put(k, bf16, i, urand(-3.0f, 3.0f));
    for (long i = 0; i < T * v_s0; i++) put(v, bf16, i, urand(-3.0f, 3.0f));
    for (long i = 0; i < k_elems; i++) put(kc, bf16, i, SENTINEL);
    for (long i = 0; i < v_elems; i++) put(vc, bf16, i, SENTINEL);
    int64_t *slots = random_slots(T, num_slots);
    long *owner = slot_owner(slots, T, num_slots);
    paged_write_kv(k, k_s0, k_s1, v, v_s0, v_s1, slots, T, kc, vc, KVH, hd, hv, (int)esz);
    long bad = 0;
    for (int value = 0; value < 2; value++) {
        const int w = value ? hv : hd;
        for (long i = 0; i < (value ? v_elems : k_elems); i++) {
            const long slot = i / ((long)KVH * w), h = i / w % KVH, d = i % w, t = owner[slot];
            const float e = t < 0 ? SENTINEL : value ? get(v, bf16, t * v_s0 + h * v_s1 + d)
                                                     : get(k, bf16, t * k_s0 + h * k_s1 + d);
            bad += !same_bits(value ? vc : kc, bf16, i, e);
        }
    }
    report(name, bad == 0, (double)bad, 0.0);
    free(k), free(v), free(kc), free(vc), free(slots), free(owner);
}

/* cache_ops.quantize_int8 of one row: scale = max|x| / 127, q = x / scale rounded half to even. */
static void quantize_ref(const float *x, int hd, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int d = 0; d < hd; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    const float s = amax / 127.0f, div = s > 0.0f ? s : 1.0f;
    *scale = s;
    for (int d = 0; d < hd; d++) {
        float y = nearbyintf(x[d] / div);
        q[d] = (int8_t)(y > 127.0f ? 127.0f : (y < -127.0f ? -127.0f : y));
    }
}

static void test_write_kv_i8(int bf16, int KVH, int hd, int bs, long T, int hd_v) {
    char name[160];
    snprintf(name, sizeof name, "write_kv_i8 %s KVH=%d hd=%d bs=%d T=%ld%s", bf16 ? "bf16" : "f32", KVH, hd, bs, T,
             hd_v ? " hd_v" : "");
    if (!selected(name)) return;
    const int hv = hd_v ? hd_v : hd;
    const long num_blocks = (2 * T + bs - 1) / bs + 2, num_slots = num_blocks * bs;
    const long k_s1 = hd + 2, k_s0 = KVH * k_s1 + 1, v_s1 = hv + 1, v_s0 = KVH * v_s1 + 3;
    const long esz = bf16 ? 2 : 4, k_elems = num_slots * KVH * hd, v_elems = num_slots * KVH * hv;
    const long nsc = num_blocks * KVH * bs;
    void *k = xmalloc(T * k_s0 * esz), *v = xmalloc(T * v_s0 * esz);
    for (long i = 0; i < T * k_s0; i++) put(k, bf16, i, urand(-3.0f, 3.0f));
    for (long i = 0; i < T * v_s0; i++) put(v, bf16, i, urand(-3.0f, 3.0f));
    for (int d = 0; d < hd; d++) put(k, bf16, d, 0.0f); /* an all-zero row (scale 0), and a row of ties (scale 1) */
    for (int d = 0; d < hv && T > 1; d++) put(v, bf16, v_s0 + d, d == 0 ? 127.0f : (float)((d % 7) - 3) + 0.5f);
    int8_t *kc = xmalloc(k_elems), *vc = xmalloc(v_elems);
    memset(kc, 0x5a, k_elems);
    memset(vc, 0x5a, v_elems);
    float *ks = xmalloc(sizeof(float) * nsc), *vs = xmalloc(sizeof(float) * nsc);
    for (long i = 0; i < nsc; i++) ks[i] = vs[i] = SENTINEL;
    int64_t *slots = random_slots(T, num_slots);
    long *owner = slot_owner(slots, T, num_slots);
    paged_write_kv_i8(k, k_s0, k_s1, v, v_s0, v_s1, slots, T, kc, vc, ks, vs, KVH, hd, hv, bs, bf16);
    long bad = 0;
    float xr[256];
    int8_t qr[256];
    float sr;
    for (long slot = 0; slot < num_slots; slot++)
        for (int h = 0; h < KVH; h++)
            for (int which = 0; which < 2; which++) {
                const int w = which ? hv : hd;
                const long t = owner[slot], sc = (slot / bs * KVH + h) * bs + slot % bs, row = (slot * KVH + h) * w;
                const int8_t *cq = (which ? vc : kc) + row;
                const float got_scale = (which ? vs : ks)[sc];
                if (t < 0) {
                    for (int d = 0; d < w; d++) bad += cq[d] != 0x5a;
                    bad += got_scale != SENTINEL;
                    continue;
                }
                for (int d = 0; d < w; d++)
                    xr[d] = which ? get(v, bf16, t * v_s0 + h * v_s1 + d) : get(k, bf16, t * k_s0 + h * k_s1 + d);
                quantize_ref(xr, w, qr, &sr);
                for (int d = 0; d < w; d++) bad += cq[d] != qr[d];
                bad += memcmp(&got_scale, &sr, 4) != 0;
            }
    report(name, bad == 0, (double)bad, 0.0);
    free(k), free(v), free(kc), free(vc), free(ks), free(vs), free(slots), free(owner);
}

/* ---- fused ops ------------------------------------------------------------------------------------------ */
/* max over i of |got - ref| / max(|ref|, floor). */
static double rel_err(double got, double ref, double floor_) {
    const double den = fabs(ref) > floor_ ? fabs(ref) : floor_;
    return fabs(got - ref) / den;
}
#define TRACK(err, e)                          \
    do {                                       \
        const double e_ = (e);                 \
        if (e_ > (err) || e_ != e_) (err) = e_; \
    } while (0)

/* RMSNorm of one row, as the kernel computes it save for the order of the sum of squares. */
static void rms_ref(int bf16, const float *x, const float *w, int dim, float eps, double *out) {
    double ss = 0.0;
    for (int i = 0; i < dim; i++) ss += (double)x[i] * x[i];
    const float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
    for (int i = 0; i < dim; i++) out[i] = rnd(bf16, w[i] * rnd(bf16, x[i] * inv));
}

/* The norms' tolerance: fp32 a few ulps; bf16 one rounding flip (the sum's order moves inv by an ulp). */
static double norm_tol(int bf16) { return bf16 ? 1.0 / 64 : 2e-6; }

static void test_rms_norm(int bf16, long rows, int dim) {
    char name[160];
    snprintf(name, sizeof name, "rms_norm %s rows=%ld dim=%d", bf16 ? "bf16" : "f32", rows, dim);
    if (!selected(name)) return;
    const long xs = dim + 3, os = dim + 1;
    void *x = xmalloc(rows * xs * 4), *w = xmalloc(dim * 4), *out = xmalloc(rows * os * 4);
    for (long i = 0; i < rows * xs; i++) put(x, bf16, i, urand(-2.0f, 2.0f));
    for (int i = 0; i < dim; i++) put(w, bf16, i, urand(0.5f, 1.5f));
    for (long i = 0; i < rows * os; i++) put(out, bf16, i, SENTINEL);
    hf_rms_norm(x, xs, w, out, os, rows, dim, 1e-5f, bf16);
    double err = 0.0, ref[512];
    float xr[512], wr[512];
    int outside = 0;
    for (int i = 0; i < dim; i++) wr[i] = get(w, bf16, i);
    for (long r = 0; r < rows; r++) {
        for (int i = 0; i < dim; i++) xr[i] = get(x, bf16, r * xs + i);
        rms_ref(bf16, xr, wr, dim, 1e-5f, ref);
        for (int i = 0; i < dim; i++) TRACK(err, rel_err(get(out, bf16, r * os + i), ref[i], 1e-3));
        outside += !same_bits(out, bf16, r * os + dim, SENTINEL);
    }
    report(name, err <= norm_tol(bf16) && !outside, outside ? INFINITY : err, norm_tol(bf16));
    free(x), free(w), free(out);
}

static void test_add_rms_norm(int bf16, long rows, int dim) {
    char name[160];
    snprintf(name, sizeof name, "add_rms_norm %s rows=%ld dim=%d", bf16 ? "bf16" : "f32", rows, dim);
    if (!selected(name)) return;
    const long n = rows * dim;
    void *x = xmalloc(n * 4), *a = xmalloc(n * 4), *w = xmalloc(dim * 4), *res = xmalloc(n * 4),
         *out = xmalloc(n * 4);
    for (long i = 0; i < n; i++) put(x, bf16, i, urand(-2.0f, 2.0f)), put(a, bf16, i, urand(-2.0f, 2.0f));
    for (int i = 0; i < dim; i++) put(w, bf16, i, urand(0.5f, 1.5f));
    hf_add_rms_norm(x, a, w, res, out, rows, dim, 1e-6f, bf16);
    double err = 0.0, ref[512];
    float rr[512], wr[512];
    long bad_res = 0;
    for (int i = 0; i < dim; i++) wr[i] = get(w, bf16, i);
    for (long r = 0; r < rows; r++) {
        for (int i = 0; i < dim; i++) {
            rr[i] = rnd(bf16, get(x, bf16, r * dim + i) + get(a, bf16, r * dim + i)); /* exact: one rounding */
            bad_res += !same_bits(res, bf16, r * dim + i, rr[i]);
        }
        rms_ref(bf16, rr, wr, dim, 1e-6f, ref);
        for (int i = 0; i < dim; i++) TRACK(err, rel_err(get(out, bf16, r * dim + i), ref[i], 1e-3));
    }
    report(name, err <= norm_tol(bf16) && !bad_res, bad_res ? INFINITY : err, norm_tol(bf16));
    free(x), free(a), free(w), free(res), free(out);
}

/* One rotated head row as transformers computes it: each product rounded to the dtype, then their sum. */
static float rope_ref(int bf16, const void *x, long xo, const void *cs, const void *sn, long co, int hd, int i) {
    const int half = hd / 2;
    const float xi = get(x, bf16, xo + i), rot = i < half ? -get(x, bf16, xo + i + half) : get(x, bf16, xo + i - half);
    const float a = rnd(bf16, mulf(xi, get(cs, bf16, co + i))), b = rnd(bf16, mulf(rot, get(sn, bf16, co + i)));
    return rnd(bf16, a + b);
}

/* hf_rope (write_kv = 0) or hf_rope_write_kv: bit-exact against transformers' rounding. */
static void test_rope(int bf16, int write_kv, long T, int Hq, int Hk, int hd) {
    char name[160];
    snprintf(name, sizeof name, "%s %s T=%ld Hq=%d Hk=%d hd=%d", write_kv ? "rope_write_kv" : "rope",
             bf16 ? "bf16" : "f32", T, Hq, Hk, hd);
    if (!selected(name)) return;
    /* q, k, v as views into one fused qkv row per token (as the layer passes them) */
    const long s0 = (long)(Hq + 2 * Hk) * hd + 2, s1 = hd, ko = (long)Hq * hd, vo = ko + (long)Hk * hd;
    const long num_slots = 2 * T + 3, row = (long)Hk * hd;
    void *qkv = xmalloc(T * s0 * 4), *cs = xmalloc(T * hd * 4), *sn = xmalloc(T * hd * 4);
    void *qo = xmalloc(T * Hq * hd * 4), *ko_ = xmalloc(num_slots * row * 4), *vc = xmalloc(num_slots * row * 4);
    for (long i = 0; i < T * s0; i++) put(qkv, bf16, i, urand(-3.0f, 3.0f));
    for (long t = 0; t < T; t++)
        for (int i = 0; i < hd; i++) {
            const float ang = (float)(t + 1) * powf(10000.0f, -(float)(2 * (i % (hd / 2))) / (float)hd);
            put(cs, bf16, t * hd + i, cosf(ang));
            put(sn, bf16, t * hd + i, sinf(ang));
        }
    for (long i = 0; i < num_slots * row; i++) put(ko_, bf16, i, SENTINEL), put(vc, bf16, i, SENTINEL);
    int64_t *slots = random_slots(T, num_slots);
    const char *q = qkv, *k = (const char *)qkv + ko * (bf16 ? 2 : 4), *v = (const char *)qkv + vo * (bf16 ? 2 : 4);
    if (write_kv)
        hf_rope_write_kv(q, s0, s1, Hq, k, s0, s1, Hk, v, s0, s1, qo, cs, sn, slots, ko_, vc, T, hd, bf16);
    else
        hf_rope(q, s0, s1, Hq, k, s0, s1, Hk, qo, ko_, cs, sn, T, hd, bf16);
    long bad = 0;
    for (long t = 0; t < T; t++) {
        for (int h = 0; h < Hq; h++)
            for (int i = 0; i < hd; i++)
                bad += !same_bits(qo, bf16, (t * Hq + h) * hd + i,
                                  rope_ref(bf16, qkv, t * s0 + h * s1, cs, sn, t * hd, hd, i));
        const long kdst = write_kv ? slots[t] * row : t * row;
        for (int h = 0; h < Hk; h++)
            for (int i = 0; i < hd; i++) {
                bad += !same_bits(ko_, bf16, kdst + (long)h * hd + i,
                                  rope_ref(bf16, qkv, t * s0 + ko + h * s1, cs, sn, t * hd, hd, i));
                if (write_kv)
                    bad += !same_bits(vc, bf16, kdst + (long)h * hd + i, get(qkv, bf16, t * s0 + vo + h * s1 + i));
            }
    }
    if (write_kv) { /* the other slots untouched */
        long *owner = slot_owner(slots, T, num_slots);
        for (long sl = 0; sl < num_slots; sl++)
            if (owner[sl] < 0)
                for (long i = 0; i < row; i++)
                    bad += !same_bits(ko_, bf16, sl * row + i, SENTINEL) + !same_bits(vc, bf16, sl * row + i, SENTINEL);
        free(owner);
    }
    report(name, bad == 0, (double)bad, 0.0);
    free(qkv), free(cs), free(sn), free(qo), free(ko_), free(vc), free(slots);
}

static void test_silu_mul(int bf16, long rows, int inter) {
    char name[160];
    snprintf(name, sizeof name, "silu_mul %s rows=%ld inter=%d", bf16 ? "bf16" : "f32", rows, inter);
    if (!selected(name)) return;
    const long gs = 2L * inter + 3, os = inter + 2;
    void *gu = xmalloc(rows * gs * 4), *out = xmalloc(rows * os * 4);
    for (long i = 0; i < rows * gs; i++) put(gu, bf16, i, urand(-6.0f, 6.0f));
    put(gu, bf16, 0, -100.0f); /* exp's argument clamped */
    if (inter > 1) put(gu, bf16, 1, 100.0f);
    for (long i = 0; i < rows * os; i++) put(out, bf16, i, SENTINEL);
    hf_silu_mul(gu, gs, out, os, rows, inter, bf16);
    double err = 0.0;
    int outside = 0;
    for (long r = 0; r < rows; r++) {
        for (int i = 0; i < inter; i++) {
            const double x = get(gu, bf16, r * gs + i), u = get(gu, bf16, r * gs + inter + i);
            const double ref = rnd(bf16, rnd(bf16, (float)(x / (1.0 + exp(-x)))) * (float)u);
            TRACK(err, rel_err(get(out, bf16, r * os + i), ref, 1e-2));
        }
        outside += !same_bits(out, bf16, r * os + inter, SENTINEL);
    }
    const double tol = bf16 ? 1.0 / 64 : 5e-6;
    report(name, err <= tol && !outside, outside ? INFINITY : err, tol);
    free(gu), free(out);
}

static void test_argmax(long rows, long n) {
    char name[160];
    snprintf(name, sizeof name, "argmax_rows rows=%ld n=%ld", rows, n);
    if (!selected(name)) return;
    const long stride = n + 5;
    float *x = xmalloc(sizeof(float) * rows * stride);
    for (long i = 0; i < rows * stride; i++) x[i] = urand(-10.0f, 10.0f);
    for (long r = 0; r < rows; r++) { /* ties, NaN, -inf, a maximum in the tail */
        float *row = x + r * stride;
        switch (r % 6) {
        case 1: row[n / 3] = row[n - 1] = row[n / 2] = 50.0f; break;
        case 2: row[n / 2] = NAN; row[n - 1] = NAN; row[0] = 60.0f; break;
        case 3: for (long i = 0; i < n; i++) row[i] = -INFINITY; break;
        case 4: row[n - 1] = 70.0f; break;
        case 5: row[0] = NAN; break;
        default: break;
        }
    }
    int64_t *out = xmalloc(sizeof(int64_t) * rows);
    hf_argmax_rows(x, stride, rows, n, out);
    long bad = 0;
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        long best = 0;
        for (long i = 0; i < n; i++) {
            if (row[i] != row[i]) {
                best = i;
                break;
            }
            if (row[i] > row[best]) best = i;
        }
        bad += out[r] != best;
    }
    report(name, bad == 0, (double)bad, 0.0);
    free(x), free(out);
}

/* ---- linear kernels (x86-64 AVX2 / AVX-512 / AMX only; elsewhere their probes must say 0) -------------------- */
static void test_small_linear(int bf16, long M, long N, long K, int with_bias) {
    char name[160];
    snprintf(name, sizeof name, "small_linear %s M=%ld N=%ld K=%ld bias=%d", bf16 ? "bf16" : "f32", M, N, K, with_bias);
    if (!selected(name)) return;
    const long xs = K + 2, ws = K + 4, os = N + 3, packed_elems = (N + 63) / 64 * 64 * K;
    void *x = xmalloc(M * xs * 4), *w = xmalloc(N * ws * 4), *b = xmalloc(N * 4), *out = xmalloc(M * os * 4);
    void *packed = xmalloc(packed_elems * 4);
    for (long i = 0; i < M * xs; i++) put(x, bf16, i, urand(-1.0f, 1.0f));
    for (long i = 0; i < N * ws; i++) put(w, bf16, i, urand(-1.0f, 1.0f));
    for (long i = 0; i < N; i++) put(b, bf16, i, urand(-1.0f, 1.0f));
    for (long i = 0; i < M * os; i++) put(out, bf16, i, SENTINEL);
    int rc;
    if (bf16) {
        hf_small_linear_pack_bf16(w, ws, N, K, packed);
        rc = hf_small_linear_bf16(x, xs, M, packed, with_bias ? b : NULL, N, K, out, os, 2);
    } else {
        hf_small_linear_pack_f32(w, ws, N, K, packed);
        rc = hf_small_linear_f32(x, xs, M, packed, with_bias ? b : NULL, N, K, out, os, 2);
    }
    double err = rc == 0 ? 0.0 : INFINITY;
    int outside = 0;
    for (long m = 0; m < M && rc == 0; m++) {
        for (long nn = 0; nn < N; nn++) {
            double ref = with_bias ? get(b, bf16, nn) : 0.0;
            for (long k = 0; k < K; k++) ref += (double)get(x, bf16, m * xs + k) * get(w, bf16, nn * ws + k);
            TRACK(err, rel_err(get(out, bf16, m * os + nn), ref, 1.0));
        }
        outside += !same_bits(out, bf16, m * os + N, SENTINEL);
    }
    const double tol = bf16 ? 1.0 / 128 : 1e-5;
    report(name, rc == 0 && err <= tol && !outside, outside ? INFINITY : err, tol);
    free(x), free(w), free(b), free(out), free(packed);
}

static void test_amx_linear(long M, long N, long K) {
    char name[160];
    snprintf(name, sizeof name, "amx_linear bf16 M=%ld N=%ld K=%ld", M, N, K);
    if (!selected(name)) return;
    const long xs = K + 32, ws = K + 2, os = N + 3;
    uint16_t *x = xmalloc(M * xs * 2), *w = xmalloc(N * ws * 2), *b = xmalloc(N * 2), *out = xmalloc(M * os * 2);
    uint16_t *packed = xmalloc(N * K * 2);
    for (long i = 0; i < M * xs; i++) x[i] = to_bf16(urand(-1.0f, 1.0f));
    for (long i = 0; i < N * ws; i++) w[i] = to_bf16(urand(-1.0f, 1.0f));
    for (long i = 0; i < N; i++) b[i] = to_bf16(urand(-1.0f, 1.0f));
    for (long i = 0; i < M * os; i++) out[i] = to_bf16(SENTINEL);
    hf_amx_pack(w, ws, N, K, packed);
    const int rc = hf_amx_linear(x, xs, M, packed, b, N, K, out, os, 2);
    double err = rc == 0 ? 0.0 : INFINITY;
    int outside = 0;
    for (long m = 0; m < M && rc == 0; m++) {
        for (long nn = 0; nn < N; nn++) {
            double ref = from_bf16(b[nn]);
            for (long k = 0; k < K; k++) ref += (double)from_bf16(x[m * xs + k]) * from_bf16(w[nn * ws + k]);
            TRACK(err, rel_err(from_bf16(out[m * os + nn]), ref, 1.0));
        }
        outside += out[m * os + N] != to_bf16(SENTINEL);
    }
    report(name, rc == 0 && err <= 1.0 / 128 && !outside, outside ? INFINITY : err, 1.0 / 128);
    free(x), free(w), free(b), free(out), free(packed);
}

/* ---- argument checks and the target's probes ------------------------------------------------------------------ */
static void test_probes(void) {
    if (!selected("probes")) return;
    const int vw = paged_decode_attention_vector_width();
#if defined(__AVX512F__)
    const int want_vw = 16;
#elif defined(__AVX__)
    const int want_vw = 8;
#else
    const int want_vw = 4; /* NEON (AArch64, SVE included: GNU vectors are fixed-size) and plain SSE2 */
#endif
    int ok = vw == want_vw;
#if !(defined(__x86_64__) || defined(__i386__))
    /* The x86-only kernels are stubs here: their probes report 0 and the stubs refuse. */
    ok = ok && !hf_small_linear_available() && !hf_small_linear_bf16_available() && !hf_amx_available();
    ok = ok && hf_small_linear_f32(NULL, 0, 0, NULL, NULL, 0, 0, NULL, 0, 1) == -1;
    ok = ok && hf_small_linear_bf16(NULL, 0, 0, NULL, NULL, 0, 0, NULL, 0, 1) == -1;
    ok = ok && hf_amx_linear(NULL, 0, 1, NULL, NULL, 32, 32, NULL, 0, 1) == -1;
#endif
    /* Bad arguments are refused, not run. */
    int32_t len = 4;
    int64_t bt = 0;
    float scales = 1.0f;
    const hf_seqs_t seqs = {&bt, 1, &len, &len, &len, 1};
    hf_attention_t attn = {NULL, NULL, NULL, NULL, 3, 2, 64, 16, 0, 1.0f, 0.0f, 0, 0, 0, NULL};
    ok = ok && hf_paged_decode_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == -1; /* H % KVH != 0 */
    attn.H = 2, attn.key_scales = &scales;
    ok = ok && hf_paged_decode_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == -1; /* one scale table */
    ok = ok && hf_paged_prefill_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == 1;
    attn.key_scales = NULL, attn.hd = 4 * want_vw + 1;
    ok = ok && hf_paged_prefill_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == 1; /* hd not a multiple of 4 VL */
    attn.hd = 4 * want_vw, attn.window = 8;
    ok = ok && hf_paged_prefill_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == 1; /* no window in prefill */
    attn.window = 0, attn.chunk = 8;
    ok = ok && hf_paged_prefill_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == 1; /* nor chunks */
    attn.chunk = 0, attn.hd_v = 4 * want_vw + 2;
    ok = ok && hf_paged_prefill_attention(&attn, &seqs, NULL, 0, 0, NULL, 0, 0, 1) == 1; /* hd_v likewise */
    const hf_llama_layer_t layer = {.attn = {.H = 4, .KVH = 2, .hd = 16}, .D = 64, .I = 128};
    ok = ok && hf_llama_decode_layer_workspace(&layer, 3) == 3 * (4 * 64 + 10 * 16 + 2 * 64 + 3 * 128);
    char name[200];
    snprintf(name, sizeof name, "probes vector_width=%d small_linear=%d small_linear_bf16=%d amx=%d", vw,
             hf_small_linear_available(), hf_small_linear_bf16_available(), hf_amx_available());
    report(name, ok, !ok, 0.0);
}

int main(int argc, char **argv) {
    filters = argv + 1;
    n_filters = argc - 1;
    test_probes();

    int threads = 1;
    for (int kv8 = 0; kv8 < 2; kv8++)
        for (int bf16 = 0; bf16 < 2; bf16++)
            for (int G = 1; G <= 4; G += 3)
                for (int hdi = 0; hdi < 3; hdi++)
                    for (int bs = 8; bs <= 16; bs += 8) {
                        const int hd = (int[]){40, 64, 128}[hdi];
                        test_decode(bf16, kv8, G, hd, bs, 0, 0.0f, threads = 3 - threads);
                        test_decode(bf16, kv8, G, hd, bs, 20, 0.0f, threads = 3 - threads);
                        test_decode(bf16, kv8, G, hd, bs, 0, 1.5f, threads = 3 - threads);
                        test_decode(bf16, kv8, G, hd, bs, 24, 1.5f, threads = 3 - threads);
                    }
    for (int kv8 = 0; kv8 < 2; kv8++) /* the scalar path (hd not a multiple of any vector width) */
        for (int bf16 = 0; bf16 < 2; bf16++) test_decode(bf16, kv8, 4, 34, 8, 20, 1.5f, 2);
    /* Attention sinks on every path (vector, AVX512-BF16, int8 VNNI, scalar); chunked attention; values narrower
     * and wider than the keys (the scalar path), with sinks, a window or a chunk. */
    for (int kv8 = 0; kv8 < 2; kv8++)
        for (int bf16 = 0; bf16 < 2; bf16++) {
            test_decode_x(bf16, kv8, 4, 64, 16, 0, 0.0f, 2, 0, 0, 1);
            test_decode_x(bf16, kv8, 1, 128, 8, 20, 0.0f, 1, 0, 0, 1);
            test_decode_x(bf16, kv8, 4, 34, 8, 0, 1.5f, 2, 0, 0, 1);
            test_decode_x(bf16, kv8, 4, 64, 8, 0, 0.0f, 2, 0, 16, 0);
            test_decode_x(bf16, kv8, 1, 40, 16, 0, 0.0f, 1, 0, 24, 1);
            test_decode_x(bf16, kv8, 4, 48, 8, 0, 0.0f, 2, 32, 0, 0);
            test_decode_x(bf16, kv8, 1, 24, 16, 0, 0.0f, 1, 40, 0, 1);
            test_decode_x(bf16, kv8, 4, 64, 8, 20, 0.0f, 2, 32, 0, 1);
            test_decode_x(bf16, kv8, 4, 64, 8, 0, 0.0f, 1, 128, 16, 0);
        }

    for (int kv8 = 0; kv8 < 2; kv8++)
        for (int bf16 = 0; bf16 < 2; bf16++)
            for (int G = 1; G <= 4; G += 3)
                for (int hd = 64; hd <= 128; hd *= 2)
                    for (int bs = 8; bs <= 16; bs += 8) test_prefill(bf16, kv8, G, hd, bs, 0, threads = 3 - threads);
    test_prefill(0, 0, 1, 64, 16, 1, 2);
    test_prefill(1, 0, 4, 64, 8, 1, 2);
    test_prefill(1, 1, 1, 64, 16, 1, 2);
    for (int kv8 = 0; kv8 < 2; kv8++) /* sinks; values narrower (hd 128, hd_v 64) and wider (64, 128) */
        for (int bf16 = 0; bf16 < 2; bf16++) {
            test_prefill_x(bf16, kv8, 4, 64, 8, 0, 2, 0, 1);
            test_prefill_x(bf16, kv8, 1, 128, 16, 1, 2, 0, 1);
            test_prefill_x(bf16, kv8, 4, 128, 8, 0, 1, 64, 0);
            test_prefill_x(bf16, kv8, 1, 64, 16, 0, 2, 128, 1);
        }

    for (int bf16 = 0; bf16 < 2; bf16++) {
        test_write_kv(bf16, 2, 64, 5, 0);
        test_write_kv(bf16, 3, 34, 17, 0);
        test_write_kv(bf16, 3, 48, 9, 32);
        test_write_kv_i8(bf16, 2, 64, 16, 5, 0);
        test_write_kv_i8(bf16, 3, 34, 8, 9, 0);
        test_write_kv_i8(bf16, 2, 24, 8, 9, 40);
        test_write_kv_i8(bf16, 4, 128, 16, 128, 0); /* threaded */
    }

    for (int bf16 = 0; bf16 < 2; bf16++) {
        test_rms_norm(bf16, 3, 64);
        test_rms_norm(bf16, 3, 70);
        test_rms_norm(bf16, 40, 128); /* threaded */
        test_add_rms_norm(bf16, 3, 64);
        test_add_rms_norm(bf16, 3, 70);
        test_add_rms_norm(bf16, 40, 128);
        for (int write_kv = 0; write_kv < 2; write_kv++) {
            test_rope(bf16, write_kv, 3, 4, 2, 64);
            test_rope(bf16, write_kv, 3, 4, 2, 40);
            test_rope(bf16, write_kv, 2, 3, 1, 34);
            test_rope(bf16, write_kv, 24, 8, 4, 64); /* threaded */
        }
        test_silu_mul(bf16, 3, 64);
        test_silu_mul(bf16, 3, 70);
        test_silu_mul(bf16, 40, 256); /* threaded */
    }
    test_argmax(12, 3);
    test_argmax(12, 37);
    test_argmax(12, 1000);
    test_argmax(6, 1);

    /* Partial row blocks (33 = 5 x 6 + 3), partial column groups (100, 40), one row, and (bf16 on AVX2: rows widened
     * 128 at a time) more rows than one widening pass. */
    if (hf_small_linear_available()) {
        test_small_linear(0, 8, 100, 96, 1);
        test_small_linear(0, 3, 64, 200, 0);
        test_small_linear(0, 33, 40, 130, 1);
        test_small_linear(0, 1, 100, 64, 1);
    }
    if (hf_small_linear_bf16_available()) {
        test_small_linear(1, 8, 100, 96, 1);
        test_small_linear(1, 3, 64, 200, 0);
        test_small_linear(1, 33, 40, 130, 1);
        test_small_linear(1, 1, 100, 64, 1);
        test_small_linear(1, 200, 72, 64, 1);
    }
    if (hf_amx_available()) {
        test_amx_linear(5, 64, 96);
        test_amx_linear(33, 96, 64);
        test_amx_linear(32, 64, 64); /* rows as stored, no padded copy */
    }

    printf("%d cases, %d failed\n", n_cases, n_failed);
    return n_failed ? 1 : 0;
}
