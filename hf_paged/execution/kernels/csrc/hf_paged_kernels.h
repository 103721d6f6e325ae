/* Every function the CPU kernels' library exports, and the argument structs they take: declared here once,
 * included by every source and by the C test harness. The library is built with -Werror=missing-prototypes, so an
 * exported function missing here fails the build; hf_paged/execution/kernels/cpu_library.py reads this file for its
 * ctypes declarations (argument types, return types, struct layouts), so nothing is declared twice.
 *
 * What cpu_library understands here: structs as `typedef struct { ... } name;` (fields of int, long, float, a
 * pointer, or a struct declared above), prototypes on their own lines returning int, long or void, and named
 * `enum { NAME = value, ... };` constants. Tensors are raw pointers to contiguous rows; strides count elements.
 */
#pragma once

#include <stdint.h>

/* A step's sequences as the attention kernels read their caches. Built once per step, shared by every layer.
 * Decode: sequence s has one query token, row s of q and out, the last of its kv_lens[s] cached tokens (q_starts and
 * q_lens unused). Prefill: sequence s owns query rows q_starts[s] .. + q_lens[s], the last q_lens[s] of its
 * kv_lens[s] tokens. */
typedef struct {
    const int64_t *block_tables; /* [S, >= ceil(kv_len / block_size)] */
    long bt_stride;              /* elements between two rows of block_tables */
    const int32_t *kv_lens;      /* [S] */
    const int32_t *q_starts;     /* [S], prefill only */
    const int32_t *q_lens;       /* [S], prefill only */
    int num_seqs;                /* S */
} hf_seqs_t;

/* One layer's paged attention: its caches and how it scores. Built once per layer (for its cache pool).
 * GQA: query head h reads KV head h / (H / KVH). The fields after bf16 are optional (0 / NULL: off). */
typedef struct {
    void *key_cache;     /* [num_blocks, block_size, KVH, hd] contiguous: the query's dtype, or int8 */
    void *value_cache;   /* likewise, [num_blocks, block_size, KVH, hd_v] */
    float *key_scales;   /* int8 caches: fp32 [num_blocks, KVH, block_size] (x = q * s); else NULL */
    float *value_scales; /* likewise */
    int H, KVH, hd, block_size;
    int window;    /* > 0 (decode only): a query at the end of kv_len keys sees keys >= kv_len - window */
    float scale;   /* on q.k */
    float softcap; /* > 0 (decode only): scores = tanh(scores / softcap) * softcap before the softmax */
    int bf16;      /* q and out (and non-int8 caches) hold bfloat16 bit patterns, else float32 */
    int hd_v;      /* > 0: the values' width (and the output's), else hd */
    int chunk;     /* > 0 (decode only): chunked attention, a query at position p sees keys >= p / chunk * chunk */
    const float *sinks; /* [H] fp32 attention-sink logits (in the softmax's denominator, no value), or NULL */
} hf_attention_t;

enum { HF_LINEAR_AMX = 0, HF_LINEAR_SMALL = 1 }; /* hf_llama_layer_t.linear_kind: how its weights were packed */

/* What hf_llama_decode_layer needs of a layer that no step changes: weights (packed for linear_kind), biases (NULL
 * for none), norms, geometry and the layer's attention with its caches. Built once per layer forward. */
typedef struct {
    hf_attention_t attn; /* window 0, softcap 0 */
    const void *norm1_w;
    const void *norm2_w;
    float eps1, eps2;
    const void *qkv_w;     /* [(H + 2 KVH) hd, D]: q, k, v stacked */
    const void *qkv_b;
    const void *o_w;       /* [D, H hd] */
    const void *o_b;
    const void *gate_up_w; /* [2 I, D]: gate, up stacked */
    const void *gate_up_b;
    const void *down_w;    /* [D, I] */
    const void *down_b;
    int D, I;
    int linear_kind;
} hf_llama_layer_t;

/* What a step of decodes (and chunks short enough for the same linears, such as drafts being verified) gives every
 * layer. Built once per step. */
typedef struct {
    hf_seqs_t seqs;        /* the decode sequences: rows 0 .. seqs.num_seqs - 1 */
    hf_seqs_t chunks;      /* the chunk sequences (prefill layout, their rows after the decodes'); num_seqs 0: none */
    const int64_t *slots;  /* [T] the cache slot of each new token */
    const void *cos;       /* [T, hd] rotary tables, the activations' dtype */
    const void *sin;
    long T;
    void *work;            /* hf_llama_decode_layer_workspace(layer, T) elements, reused by the step's layers */
    int num_threads;
} hf_decode_step_t;

/* ---- paged_decode_attention.c ---------------------------------------------------------------------------------- */
int hf_paged_decode_attention(const hf_attention_t *attn, const hf_seqs_t *seqs, const void *q, long q_s0, long q_s1,
                              void *out, long o_s0, long o_s1, int num_threads);
void paged_write_kv(const char *k, long k_s0, long k_s1, const char *v, long v_s0, long v_s1, const int64_t *slots,
                    long T, char *key_cache, char *value_cache, int KVH, int hd, int hd_v, int esz);
void paged_write_kv_i8(const char *k, long k_s0, long k_s1, const char *v, long v_s0, long v_s1,
                       const int64_t *slots, long T, int8_t *key_cache, int8_t *value_cache, float *key_scales,
                       float *value_scales, int KVH, int hd, int hd_v, int block_size, int bf16);
int paged_decode_attention_vector_width(void);

/* ---- paged_prefill_attention.c --------------------------------------------------------------------------------- */
int hf_paged_prefill_attention(const hf_attention_t *attn, const hf_seqs_t *seqs, const void *q, long q_s0,
                               long q_s1, void *out, long o_s0, long o_s1, int num_threads);

/* ---- fused_layer_ops.c ------------------------------------------------------------------------------------------ */
void hf_rms_norm(const char *x, long x_stride, const char *w, char *out, long out_stride, long rows, int dim,
                 float eps, int bf16);
void hf_add_rms_norm(const char *x, const char *a, const char *w, char *residual_out, char *out, long rows, int dim,
                     float eps, int bf16);
void hf_rope(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk, char *q_out,
             char *k_out, const char *cos, const char *sin, long T, int hd, int bf16);
void hf_rope_write_kv(const char *q, long q_s0, long q_s1, int Hq, const char *k, long k_s0, long k_s1, int Hk,
                      const char *v, long v_s0, long v_s1, char *q_out, const char *cos, const char *sin,
                      const int64_t *slots, char *key_cache, char *value_cache, long T, int hd, int bf16);
void hf_silu_mul(const char *gate_up, long gu_stride, char *out, long out_stride, long rows, int inter, int bf16);
void hf_argmax_rows(const float *x, long stride, long rows, long n, int64_t *out);

/* ---- amx_linear.c ----------------------------------------------------------------------------------------------- */
int hf_amx_available(void);
void hf_amx_pack(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed);
int hf_amx_linear(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias, long N,
                  long K, uint16_t *out, long out_stride, int num_threads);

/* ---- small_linear.c --------------------------------------------------------------------------------------------- */
int hf_small_linear_available(void);
int hf_small_linear_bf16_available(void);
void hf_small_linear_pack_f32(const float *w, long w_stride, long N, long K, float *packed);
void hf_small_linear_pack_bf16(const uint16_t *w, long w_stride, long N, long K, uint16_t *packed);
int hf_small_linear_f32(const float *x, long x_stride, long M, const float *packed, const float *bias, long N,
                        long K, float *out, long out_stride, int num_threads);
int hf_small_linear_bf16(const uint16_t *x, long x_stride, long M, const uint16_t *packed, const uint16_t *bias,
                         long N, long K, uint16_t *out, long out_stride, int num_threads);

/* ---- llama_decode_layer.c --------------------------------------------------------------------------------------- */
long hf_llama_decode_layer_workspace(const hf_llama_layer_t *layer, long T);
int hf_llama_decode_layer(const hf_llama_layer_t *layer, const hf_decode_step_t *step, const void *x, void *out);
