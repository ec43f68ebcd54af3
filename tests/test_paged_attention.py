"""Paged-attention kernels vs their PyTorch references, and the references vs dense attention.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small. The interpreter has no bfloat16 arithmetic (its tl.dot multiplies the bf16
bit patterns: triton-lang/triton#11584), so attention is tested here in fp32 and fp16; bf16 is
checked on the GPU by benchmarks/attention.py --check.
"""

import math

import pytest
import torch

import paged_attention as pa

TOLERANCES = {  # dtype -> (rtol, atol) against the float32 reference
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
}


def make_batch(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size,
               dtype=torch.float32, seed=0):
    """A random batch: cache filled with random K/V, shuffled block tables with garbage
    past each sequence's blocks. A context_len of None makes a padding row (seq_len 0)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [0 if c is None else c + n for n, c in zip(q_lens, context_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.randint(10**6, 10**7, (len(q_lens), max_blocks), generator=g)  # garbage
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used:used + n]
        used += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables.int(),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=query_start_loc,
                scale=head_dim ** -0.5, max_query_len=max(q_lens), max_seq_len=max(seq_lens))


def run_kernel(batch, **overrides):
    args = {**batch, **overrides}
    out = torch.full_like(args["q"], float("nan"))  # poison: every element must be written
    result = pa.paged_attention(**args, out=out)
    assert result is out
    assert not out.isnan().any()
    return out


# -- the reference against dense attention in float64 --------------------------------------

def test_reference_matches_dense_attention():
    batch = make_batch([1, 7, 12], [20, 9, 0], num_heads=4, num_kv_heads=2, head_dim=16,
                       block_size=4, dtype=torch.float64)
    out = pa.paged_attention_ref(**batch)
    block_size, group = batch["k_cache"].shape[1], 2
    for b in range(3):
        start, end = batch["query_start_loc"][b:b + 2].tolist()
        seq_len = int(batch["seq_lens"][b])
        # contiguous K/V, read position by position through the block table
        rows = [(int(batch["block_tables"][b, p // block_size]), p % block_size) for p in range(seq_len)]
        k = torch.stack([batch["k_cache"][blk, off] for blk, off in rows])  # (seq_len, KVH, D)
        v = torch.stack([batch["v_cache"][blk, off] for blk, off in rows])
        for h in range(4):
            q = batch["q"][start:end, h]  # (q_len, D)
            scores = q @ k[:, h // group].T * batch["scale"]  # (q_len, seq_len)
            q_pos = torch.arange(seq_len - (end - start), seq_len)[:, None]
            scores[torch.arange(seq_len)[None, :] > q_pos] = float("-inf")
            expected = torch.softmax(scores, dim=-1) @ v[:, h // group]
            torch.testing.assert_close(out[start:end, h], expected, rtol=1e-12, atol=1e-12)


# -- write_kv_cache ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim, n = 6, 16, 2, 80, 20
    qkv = torch.randn(n, 3, num_kv_heads, head_dim, generator=g).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as after a fused qkv projection
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[[3, 11]] = -1  # padding rows: skipped
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
              for _ in range(2)]
    expected_k, expected_v = caches[0].clone(), caches[1].clone()
    pa.write_kv_cache_ref(k, v, expected_k, expected_v, slots.int())
    assert (expected_k.flatten(0, 1)[slots[0]] == k[0]).all()  # the reference did write
    pa.write_kv_cache(k, v, caches[0], caches[1], slots.int())
    assert torch.equal(caches[0], expected_k) and torch.equal(caches[1], expected_v)


# -- paged_attention vs the reference --------------------------------------------------------

MIXED = dict(  # decodes, chunks with context, fresh prompts and a padding row
    q_lens=[1, 9, 1, 40, 23, 1],
    context_lens=[45, 30, 70, 0, 17, None],
)


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype", [
    (16, 4, 4, 64, torch.float32),   # MHA
    (32, 4, 2, 64, torch.float32),   # GQA 2
    (16, 8, 2, 80, torch.float32),   # GQA 4, head_dim padded to 128
    (32, 6, 2, 64, torch.float16),   # GQA 3: group padded to 4
    (16, 4, 1, 96, torch.float16),   # GQA 4, head_dim padded to 128
])
def test_mixed_batch(block_size, num_heads, num_kv_heads, head_dim, dtype):
    batch = make_batch(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=block_size + head_dim)
    expected = pa.paged_attention_ref(**batch)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(run_kernel(batch), expected, rtol=rtol, atol=atol)
    assert (expected[-1] == 0).all()  # the padding row


@pytest.mark.parametrize("block_size,dtype", [(16, torch.float32), (32, torch.float16)])
def test_decode_with_splits(block_size, dtype):
    batch = make_batch([1] * 4, [250, 1, 130, None], num_heads=8, num_kv_heads=2, head_dim=64,
                       block_size=block_size, dtype=dtype, seed=3)
    cfg = pa._default_config(batch["q"], 2, 4, batch["max_query_len"], batch["max_seq_len"])
    assert cfg["num_splits"] > 1  # the flash-decoding path is the one under test
    expected = pa.paged_attention_ref(**batch)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(run_kernel(batch), expected, rtol=rtol, atol=atol)
    # upper bounds larger than the truth (as under CUDA-graph capture) change nothing
    torch.testing.assert_close(run_kernel(batch, max_seq_len=1024), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("block_m,block_n,num_splits", [(128, 64, 1), (16, 64, 3), (32, 32, 2)])
def test_explicit_tile_sizes(block_m, block_n, num_splits):
    """The GPU's tile sizes (key tiles spanning several cache blocks) and splits of a mixed batch."""
    batch = make_batch(**MIXED, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, seed=5)
    expected = pa.paged_attention_ref(**batch)
    args = {k: v for k, v in batch.items() if k != "max_seq_len"}
    out = torch.full_like(batch["q"], float("nan"))
    pa._launch_attention(**args, out=out, block_m=block_m, block_n=block_n, num_splits=num_splits,
                         num_warps=4, num_stages=2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_prefill_grid_upper_bound():
    batch = make_batch([3, 1], [5, 12], num_heads=2, num_kv_heads=1, head_dim=32, block_size=16)
    expected = pa.paged_attention_ref(**batch)
    torch.testing.assert_close(run_kernel(batch, max_query_len=70, max_seq_len=500), expected,
                               rtol=1e-4, atol=1e-5)


# -- argument checks -------------------------------------------------------------------------

def test_bad_arguments_raise():
    batch = make_batch([2, 1], [3, 4], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16)
    bad = {
        "q": batch["q"][0],  # 2-D
        "k_cache": batch["k_cache"][..., :8],  # head_dim mismatch
        "v_cache": batch["v_cache"].half(),  # dtype mismatch
        "block_tables": batch["block_tables"].long(),  # int64
        "seq_lens": batch["seq_lens"][:1],  # wrong length
        "query_start_loc": batch["query_start_loc"].float(),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            pa.paged_attention(**{**batch, name: value})
    with pytest.raises(ValueError, match="out"):
        pa.paged_attention(**batch, out=batch["q"][:1])
    with pytest.raises(ValueError, match="heads"):
        pa.paged_attention(**{**batch, "q": torch.randn(3, 3, 16)})
    k = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.write_kv_cache(k, k, batch["k_cache"], batch["v_cache"], torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache"):
        pa.write_kv_cache(k, k, batch["k_cache"][..., :8], batch["v_cache"][..., :8],
                          torch.zeros(3, dtype=torch.int32))
