"""Paged attention: the KV-cache write and the attention that reads keys and values
through block tables, three ways: plain-PyTorch references, a batched PyTorch CPU
path and Triton kernels.

minillm calls the Triton kernels on CUDA and, on the CPU, write_kv_cache_cpu and
paged_attention_cpu (batched PyTorch: one SDPA call for the decoding sequences, one
per prefilling sequence). The *_ref functions are plain PyTorch (attention a loop over
sequences), the tests' oracle: the tests check the kernels (on the CPU too, under
TRITON_INTERPRET=1) and the _cpu functions against them.

Dimension legend
    N           new tokens in the batch, all sequences packed together (varlen)
    B           sequences in the batch
    H, KVH      query heads and key/value heads (H % KVH == 0; GROUP = H // KVH)
    D           head_dim
    num_blocks  physical blocks in the cache, each holding block_size positions

The cache (one pair of tensors per layer) is a pool of fixed-size blocks.
A sequence owns a list of blocks, in any order; its row of the block table
names them, and position p of the sequence lives in block table[p // block_size]
at offset p % block_size:

    block_tables[b] = [ 7,  2,  5, .. ]      k_cache: (num_blocks, block_size, KVH, D)
                        |   |   |            +---------+
    positions  0..15 ---+   |   |            | block 0 |
    positions 16..31 -------+   |            |   ...   |
    positions 32..47 -----------+            | block 2 | <- positions 16..31 of b
                                             |   ...   |
    slot = block * block_size + offset       | block 5 | <- positions 32..47 of b
    (what slot_mapping holds per new token)  | block 7 | <- positions 0..15 of b
                                             +---------+

Contract (index tensors int32 on q's device; slot_mapping may also be int64)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        k, v (N, KVH, D) are copied to k_cache/v_cache (num_blocks, block_size, KVH, D)
        at slot_mapping (N,); a negative slot means "padding: skip this row".
    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    scale, max_query_len, max_seq_len, out=None) -> out (N, H, D)
        Sequence b's queries are q[query_start_loc[b]:query_start_loc[b+1]] and sit
        at the last q_len positions of its seq_lens[b] tokens, whose K/V are already
        in the cache. Each query attends causally to positions 0..its own.
        A sequence with seq_len 0 (padding) gets zeros and reads nothing.
        max_query_len/max_seq_len are Python upper bounds, used only to size the
        grid and choose the decode path, so a call can be captured in a CUDA graph.
    Kernels: fp16, bf16, fp32 (fp32 dots in exact "ieee" mode, not tf32), any head_dim
    and GQA ratio (padded to powers of two and masked). Under TRITON_INTERPRET=1 they also
    run on CPU tensors, but only in fp16/fp32: the interpreter has no bf16 arithmetic.

References: vLLM's PagedAttention paper (Kwon et al., 2023); FlashAttention-2
(Dao, 2023); flash-decoding (Dao et al., 2023); Triton's fused-attention tutorial.
"""

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ----------------------------------------------------------------------------
# references: plain PyTorch, the oracle for the kernels and the _cpu functions
# ----------------------------------------------------------------------------


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0  # padding rows carry slot -1
    slots = slot_mapping[keep].long()  # (n,)
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)  # (n, KVH, D)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        scale, max_query_len, max_seq_len, out=None):
    out = torch.empty_like(q) if out is None else out
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = q.shape[1] // num_kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len, q_len = int(seq_lens[b]), end - start
        if q_len == 0:
            continue
        if seq_len == 0:  # padding row
            out[start:end] = 0
            continue
        # -- gather this sequence's keys and values through its block table --
        blocks = block_tables[b, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # (seq_len, KVH, D)
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        k = k.repeat_interleave(group, dim=1).to(compute_dtype)  # (seq_len, H, D)
        v = v.repeat_interleave(group, dim=1).to(compute_dtype)
        # -- causal softmax(q k^T) v; queries sit at the last q_len positions --
        scores = torch.einsum("qhd,khd->hqk", q[start:end].to(compute_dtype), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = scores.softmax(dim=-1)  # (H, q_len, seq_len)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


# ----------------------------------------------------------------------------
# the CPU path: the decoding sequences in one scaled_dot_product_attention call
# ----------------------------------------------------------------------------
# The reference above loops over the sequences in Python: a dozen small ops per
# sequence per layer, which on a CPU cost more than the arithmetic of a decode step.
# Here all decoding sequences (one new token each) are attended at once: their keys
# and values gathered into padded (b, KVH, L, D) tensors (L = the longest sequence),
# a mask that keeps each query to its own sequence's positions, and one SDPA call.
# Grouped-query attention costs no copy: the GROUP query heads that share a KV head
# are rows of one attention over that head. A prefilling sequence (a prompt or a
# chunk of one) gets a call of its own: its queries are many, so the call's overhead
# is small next to its work, and padding them to one length would multiply it.

def write_kv_cache_cpu(k, v, k_cache, v_cache, slot_mapping):
    """write_kv_cache_ref's contract in two copies: slots as rows of the flattened caches."""
    N, KVH, D = k.shape
    slots = slot_mapping.long()
    if (slots < 0).any():  # padding rows (only CUDA-graph batches have them): drop them first
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    k_cache.view(-1, KVH * D).index_copy_(0, slots, k.reshape(-1, KVH * D).to(k_cache.dtype))
    v_cache.view(-1, KVH * D).index_copy_(0, slots, v.reshape(-1, KVH * D).to(v_cache.dtype))


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        scale, max_query_len, max_seq_len, out=None):
    """paged_attention_ref's contract: one SDPA call for the decodes, one per prefilling sequence."""
    out = torch.empty_like(q) if out is None else out
    q_lens = query_start_loc.diff()                                         # (B,)
    decoding = (q_lens == 1).nonzero()[:, 0]                                # (b,)
    if len(decoding) == len(q_lens):  # a pure decode step, the common case: the batch as it is
        out.copy_(_attend(q, k_cache, v_cache, block_tables, seq_lens, 1, scale))
    elif len(decoding):
        rows = query_start_loc[decoding].long()                             # (b,) their tokens
        out[rows] = _attend(q[rows], k_cache, v_cache, block_tables[decoding], seq_lens[decoding], 1, scale)
    for b in (q_lens > 1).nonzero()[:, 0].tolist():
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        out[start:end] = _attend(q[start:end], k_cache, v_cache, block_tables[b:b + 1], seq_lens[b:b + 1],
                                 end - start, scale)
    return out


def _attend(q, k_cache, v_cache, block_tables, seq_lens, q_len, scale):
    """q (b * q_len, H, D): the last q_len tokens of each of b sequences -> (b * q_len, H, D).
    Positions past a sequence's end read its last position rather than whatever its block
    table holds there: masked-out keys must still be finite, or 0 * NaN would spoil the sum."""
    (n, H, D), (_, block_size, KVH, _), b = q.shape, k_cache.shape, seq_lens.shape[0]
    G, Q, L = H // KVH, q_len, max(int(seq_lens.max()), 1)
    arange = functools.partial(torch.arange, device=q.device)
    seq_lens = seq_lens.long()
    # -- gather K/V of positions 0..L-1 through the block tables, clamped to each sequence --
    pos = torch.minimum(arange(L)[None, :], (seq_lens[:, None] - 1).clamp(min=0))  # (b, L)
    blocks = block_tables.long().gather(1, pos // block_size)                    # (b, L)
    blocks = torch.where(seq_lens[:, None] > 0, blocks, 0)  # padding rows: any real block
    slots = (blocks * block_size + pos % block_size).view(-1)                    # (b*L,)
    gather = lambda cache: cache.view(-1, KVH * D).index_select(0, slots).view(b, L, KVH, D)
    k, v = gather(k_cache).transpose(1, 2), gather(v_cache).transpose(1, 2)      # (b, KVH, L, D) each
    # -- the GROUP heads of a KV head become rows of one attention: row r*G + g is query r, head g --
    q = q.view(b, Q, KVH, G, D).transpose(1, 2).reshape(b, KVH, Q * G, D)        # (b, KVH, Q*G, D)
    # -- causal mask: query r of a sequence sits at position seq_len - Q + r --
    q_pos = seq_lens[:, None] - Q + arange(Q)[None, :]                           # (b, Q)
    mask = arange(L)[None, None, :] <= q_pos[:, :, None]                         # (b, Q, L)
    mask = mask[:, None, :, None].expand(b, 1, Q, G, L).reshape(b, 1, Q * G, L)  # a view when Q == 1
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    o = o.view(b, KVH, Q, G, D).transpose(1, 2)                                  # (b, Q, KVH, G, D)
    o = torch.where(seq_lens[:, None, None, None, None] > 0, o, 0)  # padding rows get zeros
    return o.reshape(n, H, D)


# ----------------------------------------------------------------------------
# kernel 1: write new keys and values into the cache
# ----------------------------------------------------------------------------


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program copies one token's (KVH, D) keys and values
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding row
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    # -- slot -> (physical block, offset in block) --
    cache_offs = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_slot
                  + offs_h[:, None] * stride_cache_head + offs_d[None, :])
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# kernel 2: attention over the paged cache (prefill, chunked prefill, decode)
# ----------------------------------------------------------------------------
# One program owns a tile of BLOCK_M rows = BLOCK_Q query tokens x BLOCK_G heads of
# one KV-head group, so every K/V tile it loads serves all heads of the group:
#
#   row m of the tile = (token m // BLOCK_G, head kv_head * GROUP + m % BLOCK_G)
#
#       q tile (BLOCK_M, D) @ K tile^T (D, BLOCK_N) -> scores (BLOCK_M, BLOCK_N)
#
# and walks the keys in tiles of BLOCK_N positions with an online softmax
# (FlashAttention-2). Grid: (query tiles, B * KVH, num_splits). With num_splits > 1
# (decode, flash-decoding) each program takes a contiguous share of the key tiles
# and writes an unnormalised partial result; _merge_splits_kernel combines them.


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
    stride_cache_block, stride_cache_slot, offs_d, seq_len, qk_scale,
    tile_lo, tile_hi,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
        mask_n = offs_n < seq_len
        # -- look up each position's physical block (entries past seq_len are garbage) --
        block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        kv_offs = (block.to(tl.int64)[:, None] * stride_cache_block  # int64: caches exceed 2**31 elements
                   + (offs_n % BLOCK_SIZE)[:, None] * stride_cache_slot + kv_head_offset + offs_d[None, :])
        kv_mask = mask_n[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        # -- compute qk (in log2 units, so exp2 below is the softmax's exp) --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if CAUSAL_MASK:
            qk = tl.where(offs_n[None, :] <= q_pos[:, None], qk, float("-inf"))
        # -- online softmax: rescale what we have so far to the new running max --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- accumulate p @ v --
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# stride_bt (the width of the step's block-table rows) changes from step to step; Triton would compile a variant
# for each of "1", "a multiple of 16" and "other" of it, the first time it meets one: mid-generate, seconds each.
# num_splits stays specialised: unspecialised, the decode kernel ran 7-27% slower at some shapes on an H200.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,  # (N, H, num_splits[, D]) float32; used if num_splits > 1
    qk_scale, num_splits,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # latest (costliest) causal tiles first
    seq = tl.program_id(1) // NUM_KV_HEADS
    kv_head = tl.program_id(1) % NUM_KV_HEADS
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid is sized for the longest query
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # positions cached before this step's tokens

    # -- the tile's rows: (query token, head in group) pairs --
    offs_m = tl.arange(0, BLOCK_M)
    offs_t = q_tile * BLOCK_Q + offs_m // BLOCK_G  # token within the sequence's queries
    offs_g = offs_m % BLOCK_G
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = (offs_t < q_len) & (offs_g < GROUP)
    offs_h = kv_head * GROUP + offs_g  # query head
    q_pos = tl.where(row_valid, context_len + offs_t, -1)  # -1: the row sees no key
    rows_n = (q_start + offs_t).to(tl.int64)
    mask_qd = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows_n[:, None] * stride_qn + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_qd, other=0.0)

    # -- which key tiles this program visits --
    first_pos = context_len + q_tile * BLOCK_Q  # position of the tile's first query
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)  # keys past the tile's last query: never visited
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    full_tiles = (first_pos + 1) // BLOCK_N  # tiles every row sees whole: no mask needed

    # m starts at a large finite negative instead of -inf so that a row that sees no
    # key at all (padding, or an empty split) gives exp2(-inf - m) = 0, never NaN
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head * stride_cache_head
    # -- stage 1: tiles wholly before the first query, no mask --
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
        stride_cache_block, stride_cache_slot, offs_d, seq_len, qk_scale,
        tile_lo, tl.minimum(tile_hi, full_tiles),
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, False, DOT_PRECISION)
    # -- stage 2: tiles on the causal diagonal, masked --
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
        stride_cache_block, stride_cache_slot, offs_d, seq_len, qk_scale,
        tl.maximum(tile_lo, full_tiles), tile_hi,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, DOT_PRECISION)

    # -- epilogue: normalise and store, or store the split's partial result --
    if num_splits == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l == 0: padding row -> zeros
        tl.store(out_ptr + rows_n[:, None] * stride_on + offs_h[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_qd)
    else:
        part_row = (rows_n * (NUM_KV_HEADS * GROUP) + offs_h) * num_splits + split  # (BLOCK_M,)
        tl.store(part_m_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_l_ptr + part_row, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_qd)


# One variant for every batch size: num_splits unspecialised and BLOCK_S the most splits (a tile sized to each
# batch's split count makes five while the CUDA graphs are captured, each ~0.3 s of a fresh machine's start-up).
@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_on, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program merges the num_splits partial results of one (token, head)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    part_row = (token * NUM_HEADS + head) * num_splits + offs_s  # (BLOCK_S,)
    m = tl.load(part_m_ptr + part_row, mask=mask_s, other=-1.0e30)
    l = tl.load(part_l_ptr + part_row, mask=mask_s, other=0.0)
    acc = tl.load(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # -- log-sum-exp merge: rescale each split to the global max (log2 units) --
    weight = tl.math.exp2(m - tl.max(m, 0))  # (BLOCK_S,)
    l_total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(l_total > 0.0, l_total, 1.0)
    tl.store(out_ptr + token * stride_on + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------
# Python wrappers: check, choose tile sizes, launch
# ----------------------------------------------------------------------------

LOG2E = 1.44269504  # 1/ln(2): exp(x) == exp2(x * LOG2E)
MAX_SPLITS = 64  # flash-decoding's most splits of one sequence's keys
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _check_cache(name, fn, k_cache, v_cache, device):
    _check(k_cache.dim() == 4, f"{fn}: {name[0]} must be (num_blocks, block_size, num_kv_heads, head_dim), "
                               f"got shape {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
           and v_cache.dtype == k_cache.dtype,
           f"{fn}: {name[1]} must match {name[0]} in shape, strides and dtype")
    _check(k_cache.stride(3) == 1, f"{fn}: {name[0]} must be contiguous in head_dim")
    _check(k_cache.device == device and v_cache.device == device, f"{fn}: {name[0]}/{name[1]} must be on {device}")


def _check_index(fn, name, t, shape, device, dtypes=(torch.int32,)):
    _check(t.dtype in dtypes and t.device == device and tuple(t.shape) == shape,
           f"{fn}: {name} must be {'/'.join(str(d) for d in dtypes)} of shape {shape} on {device}, "
           f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    fn = "write_kv_cache"
    _check(k.dim() == 3, f"{fn}: k must be (N, num_kv_heads, head_dim), got shape {tuple(k.shape)}")
    _check(v.shape == k.shape and v.dtype == k.dtype, f"{fn}: v must match k in shape and dtype")
    _check(k.stride(2) == 1 and v.stride(2) == 1, f"{fn}: k and v must be contiguous in head_dim")
    _check_cache(("k_cache", "v_cache"), fn, k_cache, v_cache, k.device)
    _check(k_cache.shape[2:] == k.shape[1:], f"{fn}: k_cache is {tuple(k_cache.shape)}, "
                                             f"which does not hold k of shape {tuple(k.shape)}")
    _check_index(fn, "slot_mapping", slot_mapping, (k.shape[0],), k.device, (torch.int32, torch.int64))
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@functools.lru_cache
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few splits, so the CPU tests exercise the merge


def _default_config(q, num_kv_heads, num_seqs, max_query_len, max_seq_len):
    """Tile sizes and launch options; depend on Python ints only (graph capture).
    The GPU numbers were tuned on an H100 (benchmarks/NOTES-attention.md)."""
    head_dim, block_g = q.shape[2], triton.next_power_of_2(q.shape[1] // num_kv_heads)
    on_gpu = q.device.type == "cuda"
    if max_query_len <= 1:  # decode: rows are just the group's heads, padded to tl.dot's minimum 16
        block_n = 64 if on_gpu else 16
        # flash-decoding: split the keys until there are ~2 programs per SM (about what fits
        # at once: more splits add a second, partial wave), keeping >= 4 key tiles per split
        want = triton.cdiv(2 * _num_sms(q.device), num_seqs * num_kv_heads)
        num_splits = max(1, min(want, triton.cdiv(max_seq_len, 4 * block_n), MAX_SPLITS))
        return dict(block_m=max(16, block_g), block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=3)
    if not on_gpu:
        return dict(block_m=max(32, block_g), block_n=16, num_splits=1, num_warps=4, num_stages=3)
    # prefill: 128 (token, head) rows; the key tile as large as 3 stages of K and V allow in
    # shared memory (fp32 or head_dim > 128 take smaller tiles)
    kv_row_bytes = triton.next_power_of_2(head_dim) * q.element_size()
    block_n = 64 if head_dim <= 64 else 128 if kv_row_bytes <= 256 else 32
    return dict(block_m=max(128, block_g), block_n=block_n, num_splits=1, num_warps=8, num_stages=3)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    scale, max_query_len, max_seq_len, out=None):
    fn = "paged_attention"
    _check(q.dim() == 3, f"{fn}: q must be (N, num_heads, head_dim), got shape {tuple(q.shape)}")
    _check(q.dtype in _DTYPES, f"{fn}: q must be float16, bfloat16 or float32, got {q.dtype}")
    _check(q.stride(2) == 1, f"{fn}: q must be contiguous in head_dim")
    _check_cache(("k_cache", "v_cache"), fn, k_cache, v_cache, q.device)
    _check(k_cache.dtype == q.dtype, f"{fn}: k_cache dtype {k_cache.dtype} differs from q's {q.dtype}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check(k_cache.shape[3] == head_dim, f"{fn}: k_cache head_dim {k_cache.shape[3]} != q's {head_dim}")
    _check(num_heads % num_kv_heads == 0, f"{fn}: q's {num_heads} heads are not a multiple of "
                                          f"k_cache's {num_kv_heads} kv heads")
    _check(block_tables.dim() == 2, f"{fn}: block_tables must be (B, max_blocks_per_seq)")
    num_seqs = block_tables.shape[0]
    _check_index(fn, "block_tables", block_tables, tuple(block_tables.shape), q.device)
    _check(block_tables.stride(1) == 1, f"{fn}: block_tables must be contiguous along each row")
    _check_index(fn, "seq_lens", seq_lens, (num_seqs,), q.device)
    _check_index(fn, "query_start_loc", query_start_loc, (num_seqs + 1,), q.device)
    _check(isinstance(max_query_len, int) and isinstance(max_seq_len, int),
           f"{fn}: max_query_len and max_seq_len must be Python ints")
    if out is None:
        out = torch.empty_like(q)
    _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.stride(2) == 1,
           f"{fn}: out must match q in shape, dtype and device and be contiguous in head_dim")
    cfg = _default_config(q, num_kv_heads, num_seqs, max_query_len, max_seq_len)
    return _launch_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                             scale, max_query_len, out, **cfg)


def _launch_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                      max_query_len, out, block_m, block_n, num_splits, num_warps, num_stages):
    """Launch with explicit tile sizes (the benchmark's tuning sweep calls this)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(1, block_m // block_g)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16; extra lanes masked
    if num_splits > 1:  # flash-decoding scratch: one partial result per split
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_m = torch.empty(num_tokens, num_heads, num_splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    grid = (triton.cdiv(max(max_query_len, 1), block_q), num_seqs * num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        part_acc, part_m, part_l,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        # fp32 inputs: exact products, not tf32 (Triton's default), so fp32 matches the reference
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_m, part_l, out, out.stride(0), out.stride(1), num_splits,
            # BLOCK_S covers the most splits _default_config chooses, so one variant serves every batch size
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=max(MAX_SPLITS, triton.next_power_of_2(num_splits)),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out
