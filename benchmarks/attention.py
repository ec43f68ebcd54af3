"""Paged-attention kernels on the GPU: correctness at real sizes, tuning sweep, benchmark table.

    python benchmarks/attention.py            # the table (decode grid + prefill)
    python benchmarks/attention.py --check    # first: errors vs a float64 reference, graph capture
    python benchmarks/attention.py --tune     # first: sweep tile sizes on a few representative cases

Times are medians of triton.testing.do_bench over CUDA-graph replays of one call (so Python launch
overhead is out, as in minillm's captured decode), with do_bench's L2 flush before each replay.
Bandwidth counts bytes read + written once each: K and V of every context token, q, out and the
block table; 'copy' is a large device-to-device copy measured the same way in the same run.
The SDPA column is torch's flash backend on the same K/V laid out contiguously, bf16; for decode
the group's query heads are folded into its query length (q: (B, KVH, GROUP, D)), which is exact
without a causal mask and lets flash read each K/V head once.
"""

import argparse
import math
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import paged_attention as pa  # noqa: E402

MODELS = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}  # (H, KVH, D)
BLOCK_SIZE = 16
DEV = "cuda"


def bench_graph(fn):
    """Median ms of one fn() replayed from a CUDA graph (fn warmed up / compiled first)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def copy_bandwidth():
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def paged_case(num_seqs, q_len, context_len, num_heads, num_kv_heads, head_dim, dtype=torch.bfloat16,
               block_size=BLOCK_SIZE, seed=0):
    """Contiguous K/V (B, KVH, S, D) and the same data in a shuffled paged cache."""
    torch.manual_seed(seed)
    seq_len = context_len + q_len
    blocks_per_seq = triton.cdiv(seq_len, block_size)
    k = torch.randn(num_seqs, num_kv_heads, blocks_per_seq * block_size, head_dim, device=DEV, dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(num_seqs * blocks_per_seq, device=DEV)
    block_tables = perm.view(num_seqs, blocks_per_seq).int()

    def to_cache(x):  # (B, KVH, S, D) -> (num_blocks, block_size, KVH, D) in table order
        x = x.view(num_seqs, num_kv_heads, blocks_per_seq, block_size, head_dim).permute(0, 2, 3, 1, 4)
        cache = torch.empty(num_seqs * blocks_per_seq, block_size, num_kv_heads, head_dim, device=DEV, dtype=dtype)
        cache[perm] = x.reshape(-1, block_size, num_kv_heads, head_dim)
        return cache

    k_cache, v_cache = to_cache(k), to_cache(v)
    q = torch.randn(num_seqs * q_len, num_heads, head_dim, device=DEV, dtype=dtype)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=torch.full((num_seqs,), seq_len, device=DEV, dtype=torch.int32),
                query_start_loc=torch.arange(0, num_seqs * q_len + 1, q_len, device=DEV, dtype=torch.int32),
                scale=head_dim ** -0.5, max_query_len=q_len, max_seq_len=seq_len)
    return args, k[:, :, :seq_len], v[:, :, :seq_len]


def sdpa_fn(q, k, v, num_seqs, q_len, causal):
    """torch SDPA, flash backend, on contiguous K/V (B, KVH, S, D)."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    if q_len == 1:  # fold the group into the query length: (B, KVH, GROUP, D)
        qs = q.view(num_seqs, num_kv_heads, group, head_dim)
        return lambda: scaled_dot_product_attention(qs, k, v)
    qs = q.view(num_seqs, q_len, num_heads, head_dim).transpose(1, 2).contiguous()  # (B, H, S, D)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            scaled_dot_product_attention(qs, k, v, is_causal=causal, enable_gqa=True)
        return lambda: scaled_dot_product_attention(qs, k, v, is_causal=causal, enable_gqa=True)
    except RuntimeError:  # flash without GQA support: repeat K/V heads
        print("note: flash SDPA refused enable_gqa; repeating K/V heads for it")
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return lambda: scaled_dot_product_attention(qs, kr, vr, is_causal=causal)


def time_ours(args, cfg=None):
    """Median ms of our kernel; cfg: explicit tile sizes for _launch_attention, else the defaults."""
    out = torch.empty_like(args["q"])
    if cfg is None:
        return bench_graph(lambda: pa.paged_attention(**args, out=out))
    launch_args = {a: b for a, b in args.items() if a != "max_seq_len"}
    return bench_graph(lambda: pa._launch_attention(**launch_args, out=out, **cfg))


def time_case(num_seqs, q_len, context_len, heads):
    """(our ms, SDPA ms, bytes, flops) for one case."""
    num_heads, num_kv_heads, head_dim = heads
    args, k, v = paged_case(num_seqs, q_len, context_len, *heads)
    ms = time_ours(args)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa_ms = bench_graph(sdpa_fn(args["q"], k, v, num_seqs, q_len, causal=q_len > 1))
    seq_len = context_len + q_len
    elt = args["q"].element_size()
    nbytes = (2 * num_seqs * seq_len * num_kv_heads * head_dim * elt  # K and V
              + 2 * args["q"].numel() * elt  # q and out
              + args["block_tables"].numel() * 4)
    causal_pairs = num_seqs * (q_len * context_len + q_len * (q_len + 1) // 2)
    flops = 4 * causal_pairs * num_heads * head_dim  # two matmuls, 2 flops per multiply-add
    del args, k, v
    torch.cuda.empty_cache()
    return ms, sdpa_ms, nbytes, flops


# ---------------------------------------------------------------------------------------------

def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check():
    """Kernels vs the float64 reference at real sizes; CUDA-graph replay equals eager."""
    print("== check: ||out - ref|| / ||ref|| vs float64 reference ==")
    worst = {}
    seed = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, block_size in (((32, 8, 64), 16), ((32, 8, 128), 32), ((12, 4, 80), 16), ((16, 16, 64), 64)):
            seed += 1
            torch.manual_seed(seed)
            num_heads, num_kv_heads, head_dim = heads
            # mixed batch: decodes, prefill chunks with context, a fresh prompt, a padding row
            q_lens = [1] * 6 + [512, 300, 1024, 1]
            ctx = [3000, 17, 900, 4000, 1, 2500, 1000, 2048, 0, None]
            seq_lens = [0 if c is None else c + n for n, c in zip(q_lens, ctx)]
            nblk = [triton.cdiv(s, block_size) for s in seq_lens]
            total = sum(nblk) + 10
            perm = torch.randperm(total, device=DEV)
            bt = torch.randint(10**6, 10**7, (len(q_lens), max(nblk) + 2), device=DEV)
            used = 0
            for b, n in enumerate(nblk):
                bt[b, :n] = perm[used:used + n]
                used += n
            kc = torch.randn(total, block_size, num_kv_heads, head_dim, device=DEV, dtype=dtype)
            vc = torch.randn_like(kc)
            q = torch.randn(sum(q_lens), num_heads, head_dim, device=DEV, dtype=dtype)
            qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0).int()
            sl = torch.tensor(seq_lens, device=DEV, dtype=torch.int32)
            base = dict(k_cache=kc, v_cache=vc, block_tables=bt.int(), seq_lens=sl, query_start_loc=qsl,
                        scale=head_dim ** -0.5, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
            ref = pa.paged_attention_ref(q.double(), **{**base, "k_cache": kc.double(), "v_cache": vc.double()})
            out = pa.paged_attention(q, **base, out=torch.full_like(q, float("nan")))
            e_mixed = rel_err(out, ref)
            # decode only (flash-decoding splits): the decode rows of the same batch
            dq = q[:6]
            dref = pa.paged_attention_ref(dq.double(), **{**base, "k_cache": kc.double(), "v_cache": vc.double(),
                                                         "block_tables": bt[:6].int(), "seq_lens": sl[:6],
                                                         "query_start_loc": qsl[:7], "max_query_len": 1})
            dargs = {**base, "block_tables": bt[:6].int(), "seq_lens": sl[:6], "query_start_loc": qsl[:7],
                     "max_query_len": 1}
            dout = pa.paged_attention(dq, **dargs, out=torch.full_like(dq, float("nan")))
            e_dec = rel_err(dout, dref)
            splits = pa._default_config(dq, num_kv_heads, 6, 1, max(seq_lens))["num_splits"]
            # graph capture at upper bounds (max_model_len), replayed
            gout = torch.full_like(dq, float("nan"))
            gargs = {**dargs, "max_seq_len": 8192}
            pa.paged_attention(dq, **gargs, out=gout)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                pa.paged_attention(dq, **gargs, out=gout)
            gout.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            e_graph = rel_err(gout, dref)
            pad_ok = bool((out[-1] == 0).all())
            print(f"{str(dtype):15s} H={num_heads:2d} KVH={num_kv_heads:2d} D={head_dim:3d} bs={block_size:2d}  "
                  f"mixed {e_mixed:.2e}  decode({splits} splits) {e_dec:.2e}  graph {e_graph:.2e}  pad-zero {pad_ok}")
            worst[dtype] = max(worst.get(dtype, 0.0), e_mixed, e_dec, e_graph)
            assert pad_ok
    check_write()
    limits = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-3}
    for dtype, e in worst.items():
        print(f"worst {dtype}: {e:.2e} (limit {limits[dtype]:.0e}) {'ok' if e < limits[dtype] else 'FAIL'}")
        assert e < limits[dtype] and not math.isnan(e)


def check_write():
    """write_kv_cache: an exact copy, padding slots skipped."""
    for dtype in (torch.bfloat16, torch.float32):
        k = torch.randn(4096, 8, 128, device=DEV, dtype=dtype)
        v = torch.randn_like(k)
        slots = torch.randperm(8192 * 16, device=DEV)[:4096].int()
        slots[::7] = -1
        caches = [torch.randn(8192, 16, 8, 128, device=DEV, dtype=dtype) for _ in range(2)]
        caches += [c.clone() for c in caches]
        pa.write_kv_cache(k, v, caches[0], caches[1], slots)
        pa.write_kv_cache_ref(k, v, caches[2], caches[3], slots)
        ok = torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        print(f"write_kv_cache {dtype}: {'exact' if ok else 'MISMATCH'}")
        assert ok


def tune():
    print("== tune: ms per config ==")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    decode_cfgs = [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 2, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 4, 2),
                   (32, 2, 4), (16, 2, 4), (64, 2, 5)]
    for name, b, ctx in [("llama-3.1-8b", 1, 8192), ("llama-3.1-8b", 16, 2048), ("llama-3.1-8b", 16, 8192),
                         ("llama-3.1-8b", 64, 2048), ("llama-3.1-8b", 256, 2048), ("llama-3.2-1b", 16, 2048),
                         ("llama-3.2-1b", 64, 8192),
                         # profile_step.py's decode step: batch 256 at context ~532
                         ("llama-3.1-8b", 256, 532), ("llama-3.2-1b", 256, 532)]:
        heads = MODELS[name]
        args, _, _ = paged_case(b, 1, ctx - 1, *heads)
        results, seen = [], set()
        for per_sm in (2, 4, 8):
            for bn, w, st in decode_cfgs:
                splits = max(1, min(triton.cdiv(per_sm * sms, b * heads[1]), triton.cdiv(ctx, 4 * bn), 64))
                if (bn, w, st, splits) in seen:
                    continue
                seen.add((bn, w, st, splits))
                cfg = dict(block_m=16, block_n=bn, num_splits=splits, num_warps=w, num_stages=st)
                results.append((time_ours(args, cfg), bn, w, st, splits))
        results.sort()
        print(f"decode {name} B={b} ctx={ctx}: default {time_ours(args)*1e3:.1f} us; (us, block_n, warps, stages, "
              f"splits) best: " + ", ".join(f"{r[0]*1e3:.1f}:{r[1:]}" for r in results[:6]))
        del args
        torch.cuda.empty_cache()
    for name, heads in MODELS.items():
        args, _, _ = paged_case(4, 2048, 0, *heads)
        results = []
        for bm, bn, w, st in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                              (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 2), (256, 64, 8, 3)]:
            cfg = dict(block_m=bm, block_n=bn, num_splits=1, num_warps=w, num_stages=st)
            try:
                results.append((time_ours(args, cfg), bm, bn, w, st))
            except Exception as e:  # e.g. out of shared memory
                print(f"  prefill {name} {cfg}: {type(e).__name__}: {str(e)[:100]}")
        results.sort()
        print(f"prefill {name} 4x2048 (us, block_m, block_n, warps, stages): "
              + ", ".join(f"{r[0]*1e3:.0f}:{r[1:]}" for r in results))
        del args
        torch.cuda.empty_cache()


def head_major(cache):
    """The same K/V stored head-major, (num_blocks, KVH, block_size, D) in memory, seen through the kernels'
    (num_blocks, block_size, KVH, D) indexing: each (block, head) is one contiguous block_size x D piece."""
    stored = torch.empty(cache.shape[0], cache.shape[2], cache.shape[1], cache.shape[3], device=DEV, dtype=cache.dtype)
    view = stored.transpose(1, 2)
    view.copy_(cache)
    return view


def layouts():
    """Decode time with the cache slot-major (as allocated today) and head-major, and the KV write into each."""
    print("== layouts: decode us, slot-major (num_blocks, block_size, KVH, D) vs head-major (num_blocks, KVH, "
          "block_size, D) ==")
    for name, b, ctx in [("llama-3.2-1b", 256, 532), ("llama-3.1-8b", 256, 532), ("llama-3.2-1b", 64, 2048),
                         ("llama-3.1-8b", 64, 2048), ("llama-3.1-8b", 16, 8192), ("llama-3.2-1b", 1, 2048),
                         ("llama-3.1-8b", 1, 8192)]:
        heads = MODELS[name]
        args, _, _ = paged_case(b, 1, ctx - 1, *heads)
        slot_us = time_ours(args) * 1e3
        hm = dict(args, k_cache=head_major(args["k_cache"]), v_cache=head_major(args["v_cache"]))
        ref = pa.paged_attention(**args)
        err = (pa.paged_attention(**hm).float() - ref.float()).abs().max().item()
        head_us = time_ours(hm) * 1e3
        nbytes = 2 * b * ctx * heads[1] * heads[2] * 2
        print(f"decode {name} B={b} ctx={ctx}: slot-major {slot_us:.1f} us ({nbytes / slot_us / 1e3:.0f} GB/s), "
              f"head-major {head_us:.1f} us ({nbytes / head_us / 1e3:.0f} GB/s), ratio {head_us / slot_us:.3f}, "
              f"max |diff| {err:.1e}")
        del args, hm
        torch.cuda.empty_cache()
    for name, (H, KVH, D) in MODELS.items():
        k = torch.randn(256, KVH, D, device=DEV, dtype=torch.bfloat16)
        slots = torch.randperm(8192 * 16, device=DEV)[:256].int()
        cache = torch.zeros(8192, 16, KVH, D, device=DEV, dtype=torch.bfloat16)
        hcache = head_major(cache)
        t_slot = bench_graph(lambda: pa.write_kv_cache(k, k, cache, cache, slots)) * 1e3
        t_head = bench_graph(lambda: pa.write_kv_cache(k, k, hcache, hcache, slots)) * 1e3
        print(f"write_kv_cache {name} 256 tokens: slot-major {t_slot:.1f} us, head-major {t_head:.1f} us")


def table():
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    print(f"\n{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy:.0f} GB/s (read+write); bf16, block_size {BLOCK_SIZE}, shuffled block tables")
    print(f"{'case':34s} {'ours us':>9s} {'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s} {'SDPA us':>9s} {'ours/SDPA':>9s}")
    for name, heads in MODELS.items():
        for b in (1, 16, 64, 256):
            for ctx in (512, 2048, 8192):
                ms, sdpa_ms, nbytes, flops = time_case(b, 1, ctx - 1, heads)
                gbs = nbytes / ms / 1e6
                print(f"{'decode ' + name + f' B={b} ctx={ctx}':34s} {ms*1e3:9.1f} {gbs:7.0f} {100*gbs/copy:5.0f}% "
                      f"{flops/ms/1e9:8.1f} {sdpa_ms*1e3:9.1f} {ms/sdpa_ms:9.2f}")
        ms, sdpa_ms, nbytes, flops = time_case(4, 2048, 0, heads)
        gbs = nbytes / ms / 1e6
        print(f"{'prefill ' + name + ' 4x2048':34s} {ms*1e3:9.1f} {gbs:7.0f} {100*gbs/copy:5.0f}% "
              f"{flops/ms/1e9:8.1f} {sdpa_ms*1e3:9.1f} {ms/sdpa_ms:9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness vs float64 before the table")
    parser.add_argument("--tune", action="store_true", help="tile-size sweep before the table")
    parser.add_argument("--layouts", action="store_true", help="the cache slot-major vs head-major, before the table")
    parser.add_argument("--no-table", action="store_true")
    opts = parser.parse_args()
    if opts.check:
        check()
    if opts.tune:
        tune()
    if opts.layouts:
        layouts()
    if not opts.no_table:
        table()
