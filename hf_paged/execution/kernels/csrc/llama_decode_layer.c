/* A whole Llama decoder layer for a step of few rows (fp32 or bf16: decodes, and chunks such as drafts being
 * verified), in one call: the same kernels the fused Python path calls one by one
 * (hf_paged/execution/patches/fused_layers.py), in the same order, so the results are the same bits.
 *
 *   normed   = rms_norm(x)                                      hf_rms_norm
 *   qkv      = normed @ [Wq; Wk; Wv]^T                          linear
 *   q_rot    = rope(q); cache[slots] = rope(k), v               hf_rope_write_kv
 *   attn     = paged attention(q_rot)                           hf_paged_decode_attention, hf_paged_prefill_attention
 *   residual = x + attn @ Wo^T; normed = rms_norm(residual)     linear, hf_add_rms_norm
 *   act      = silu(gate) * up, [gate, up] = normed @ [Wg; Wu]^T   linear, hf_silu_mul
 *   out      = residual + act @ Wd^T                            linear, then the add (rounded to bf16 in bf16)
 *
 * `linear` is hf_amx_linear (HF_LINEAR_AMX, bf16 only) or hf_small_linear_{f32,bf16} (HF_LINEAR_SMALL), as the
 * weights were packed. With int8 K/V (the caches come with scales) the cache write is hf_rope then
 * paged_write_kv_i8, as the fused Python path calls them. What it saves is the Python between those calls; its
 * arguments come in two structs (hf_paged_kernels.h) that the caller builds once: the layer's (weights, geometry,
 * caches) and the step's (sequences, slots, rotary tables, workspace), so a call passes four pointers.
 * Tensors are contiguous rows of the layer's dtype; the caller checks shapes and how every weight is packed.
 */
#include <stdint.h>

#include "cpu_vec.h"
#include "hf_paged_kernels.h"

/* out [M, N] = x [M, K] @ W^T + bias, rows contiguous, with the kernel the weight was packed for. */
static int linear(int kind, int bf16, const char *x, long M, const void *packed, const void *bias, long N, long K,
                  char *out, int num_threads) {
    if (kind == HF_LINEAR_AMX)
        return bf16 ? hf_amx_linear((const uint16_t *)x, K, M, (const uint16_t *)packed, (const uint16_t *)bias, N, K,
                                    (uint16_t *)out, N, num_threads)
                    : -1;
    if (bf16)
        return hf_small_linear_bf16((const uint16_t *)x, K, M, (const uint16_t *)packed, (const uint16_t *)bias, N,
                                    K, (uint16_t *)out, N, num_threads);
    return hf_small_linear_f32((const float *)x, K, M, (const float *)packed, (const float *)bias, N, K, (float *)out,
                               N, num_threads);
}

/* Elements of scratch space hf_llama_decode_layer needs for T tokens (the last D per token: the rotated K of int8
 * caches). */
long hf_llama_decode_layer_workspace(const hf_llama_layer_t *l, long T) {
    const long H = l->attn.H, KVH = l->attn.KVH, hd = l->attn.hd;
    return T * (4L * l->D + (H + 3 * KVH) * hd + 2L * H * hd + 3L * l->I);
}

int hf_llama_decode_layer(const hf_llama_layer_t *l, const hf_decode_step_t *st, const void *x_, void *out_) {
    const hf_attention_t *at = &l->attn;
    const int bf16 = at->bf16, H = at->H, KVH = at->KVH, hd = at->hd, D = l->D, I = l->I, kind = l->linear_kind;
    const int num_threads = st->num_threads;
    const long T = st->T, es = bf16 ? 2 : 4, nqkv = (long)(H + 2 * KVH) * hd, nq = (long)H * hd;
    const char *x = x_, *cos = st->cos, *sin = st->sin;
    char *out = out_, *normed = st->work, *qkv = normed + T * D * es, *q_rot = qkv + T * nqkv * es,
         *attn = q_rot + T * nq * es, *o = attn + T * nq * es, *residual = o + T * D * es,
         *gate_up = residual + T * D * es, *act = gate_up + T * 2L * I * es, *down = act + T * I * es;
    int rc;
    long rows = st->seqs.num_seqs;
    for (int s = 0; s < st->chunks.num_seqs; s++) rows += st->chunks.q_lens[s];
    if (rows != T) return -1; /* the decodes' and the chunks' rows are the step's */
    hf_rms_norm(x, D, l->norm1_w, normed, D, T, D, l->eps1, bf16);
    if ((rc = linear(kind, bf16, normed, T, l->qkv_w, l->qkv_b, nqkv, D, qkv, num_threads))) return rc;
    const char *v = qkv + (nq + (long)KVH * hd) * es;
    if (at->key_scales) {
        char *k_rot = down + T * D * es;
        hf_rope(qkv, nqkv, hd, H, qkv + nq * es, nqkv, hd, KVH, q_rot, k_rot, cos, sin, T, hd, bf16);
        paged_write_kv_i8(k_rot, (long)KVH * hd, hd, v, nqkv, hd, st->slots, T, at->key_cache, at->value_cache,
                          at->key_scales, at->value_scales, KVH, hd, hd, at->block_size, bf16);
    } else {
        hf_rope_write_kv(qkv, nqkv, hd, H, qkv + nq * es, nqkv, hd, KVH, v, nqkv, hd, q_rot, cos, sin, st->slots,
                         at->key_cache, at->value_cache, T, hd, bf16);
    }
    if (st->seqs.num_seqs &&
        (rc = hf_paged_decode_attention(at, &st->seqs, q_rot, nq, hd, attn, nq, hd, num_threads)))
        return rc;
    if (st->chunks.num_seqs &&
        (rc = hf_paged_prefill_attention(at, &st->chunks, q_rot, nq, hd, attn, nq, hd, num_threads)))
        return rc;
    if ((rc = linear(kind, bf16, attn, T, l->o_w, l->o_b, D, nq, o, num_threads))) return rc;
    hf_add_rms_norm(x, o, l->norm2_w, residual, normed, T, D, l->eps2, bf16);
    if ((rc = linear(kind, bf16, normed, T, l->gate_up_w, l->gate_up_b, 2L * I, D, gate_up, num_threads))) return rc;
    hf_silu_mul(gate_up, 2L * I, act, I, T, I, bf16);
    if ((rc = linear(kind, bf16, act, T, l->down_w, l->down_b, D, I, down, num_threads))) return rc;
    const long n = T * D;
    long i = 0;
    for (; i + VL <= n; i += VL)
        store_vec(bf16, out + i * es, load_vec(bf16, residual + i * es) + load_vec(bf16, down + i * es));
    for (; i < n; i++) {
        const float sum = load_scalar(bf16, residual, i) + load_scalar(bf16, down, i);
        if (bf16)
            ((uint16_t *)out)[i] = f32_to_bf16(sum);
        else
            ((float *)out)[i] = sum;
    }
    return 0;
}
