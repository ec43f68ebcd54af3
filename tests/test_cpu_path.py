"""The CPU path: batched paged attention against the by-eye reference, the small GGUF reader against
the gguf package's, and the thread count."""

import gguf
import numpy as np
import pytest
import torch

import formats
import minillm
import paged_attention as pa
from test_paged_attention import MIXED, make_batch


# -- paged_attention_cpu and write_kv_cache_cpu vs their references --------------------------------

@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [
    (4, 4, 64, 16),  # MHA
    (9, 3, 64, 16),  # the default model's GQA 3
    (8, 2, 80, 32),
    (4, 1, 32, 4),   # MQA, small blocks: many per sequence
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_batch_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Decodes, chunks with context, fresh prompts and a padding row, with garbage block-table entries
    past each sequence: the two groups (decodes, the rest) of the batched path."""
    batch = make_batch(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=head_dim + block_size)
    expected = pa.paged_attention_ref(**batch)
    out = torch.full_like(batch["q"], float("nan"))
    assert pa.paged_attention_cpu(**batch, out=out) is out
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert (out[-1] == 0).all()  # the padding row


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("context_lens", [[80] * 6, [0, 5, 31, 32, 33, 200], [3, None, 17, None, 1, 64]])
def test_uniform_batch_matches_reference(q_len, context_lens):
    """Every sequence with the same number of new tokens, the queries need no padding: a pure decode step
    (max_query_len 1: one group, no reordering) or equal chunks; with and without padding rows."""
    batch = make_batch([q_len] * 6, context_lens, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, seed=7)
    torch.testing.assert_close(pa.paged_attention_cpu(**batch), pa.paged_attention_ref(**batch),
                               rtol=1e-5, atol=1e-5)


def test_unwritten_cache_slots_are_never_read():
    """Slots past each sequence's end, in its own last block and everywhere else, hold NaN: a path that
    let them into the sum (even masked: 0 * NaN) would return NaN."""
    batch = make_batch([1, 9, 1, 23], [45, 30, 6, 0], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, seed=3)
    expected = pa.paged_attention_ref(**batch)
    for cache in (batch["k_cache"], batch["v_cache"]):
        keep = torch.zeros(cache.shape[:2], dtype=torch.bool)
        for b, seq_len in enumerate(batch["seq_lens"].tolist()):
            for p in range(seq_len):
                keep[batch["block_tables"][b, p // 16], p % 16] = True
        cache[~keep] = float("nan")
    out = pa.paged_attention_cpu(**batch)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_upper_bounds_larger_than_the_truth_change_nothing():
    batch = make_batch([3, 1], [5, 12], num_heads=2, num_kv_heads=1, head_dim=32, block_size=16)
    expected = pa.paged_attention_ref(**batch)
    out = pa.paged_attention_cpu(**{**batch, "max_query_len": 70, "max_seq_len": 500})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_write_kv_cache_cpu_matches_reference(padding):
    g = torch.Generator().manual_seed(2)
    num_blocks, block_size, num_kv_heads, head_dim, n = 5, 8, 3, 16, 12
    qkv = torch.randn(n, 3, num_kv_heads, head_dim, generator=g)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as a fused projection would give
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].int()
    if padding:
        slots[[0, 7]] = -1
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) for _ in range(2)]
    before, expected = caches[0].clone(), [c.clone() for c in caches]
    pa.write_kv_cache_ref(k, v, *expected, slots)
    pa.write_kv_cache_cpu(k, v, *caches, slots)
    assert (expected[0] != before).flatten(0, 1).flatten(1).any(-1).sum() == n - 2 * padding  # one row per kept slot
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


# -- GGUFFile vs the gguf package's reader -----------------------------------------------------

def test_gguf_file_reads_what_the_gguf_package_reads(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", "{{ messages }} é")
    w.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "<|im_start|>", ""])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 5])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 0.0, 2.0])
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5), dtype=np.float32),
               "b.weight": rng.standard_normal((64, 32), dtype=np.float32).astype(np.float16),
               "c.weight": rng.standard_normal((4, 64), dtype=np.float32)}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    q8 = gguf.quants.quantize(tensors["c.weight"], gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, theirs = formats.GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields["tokenizer.ggml.tokens"] == ["a", "Ġb", "<|im_start|>", ""]
    assert [(name, kind) for name, kind, _ in ours.tensors] == [(t.name, t.tensor_type) for t in theirs.tensors]
    for (name, kind, data), t in zip(ours.tensors, theirs.tensors):
        np.testing.assert_array_equal(gguf.quants.dequantize(data, kind), gguf.quants.dequantize(t.data, t.tensor_type))
    np.testing.assert_array_equal(gguf.quants.dequantize(ours.tensors[0][2], ours.tensors[0][1]), tensors["a.weight"])


def test_gguf_file_rejects_other_files(tmp_path):
    path = tmp_path / "not.gguf"
    for header in (b"GGML" + bytes(60), b"GGUF\x00\x00\x00\x03" + bytes(56)):  # another format; big-endian v3
        path.write_bytes(header)
        with pytest.raises(ValueError, match="not.gguf: not a little-endian GGUF file of version 2 or 3"):
            formats.GGUFFile(str(path))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "F32"])
def test_dequantize_matches_the_gguf_package_bit_for_bit(kind):
    kind = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(1).standard_normal((6, 128), dtype=np.float32) * 3
    raw = gguf.quants.quantize(w, kind) if kind != gguf.GGMLQuantizationType.F32 else w
    raw = np.ascontiguousarray(raw).view(np.uint8)  # (rows, bytes per row), as GGUFFile gives it
    expected = gguf.quants.dequantize(raw, kind)
    got = formats.dequantize(raw, kind)
    assert got.dtype == torch.float32 and got.shape == (6, 128)
    assert torch.equal(got, torch.from_numpy(expected))


# -- the thread count --------------------------------------------------------------------------

def test_threads_chosen_by_hand_win(monkeypatch):
    monkeypatch.setenv("MINILLM_NUM_THREADS", "3")
    assert minillm.choose_cpu_threads(idle_cpus=0.0) == 3  # even on a fully busy machine
    monkeypatch.setenv("MINILLM_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MINILLM_NUM_THREADS"):
        minillm.choose_cpu_threads()
    monkeypatch.delenv("MINILLM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert minillm.choose_cpu_threads(idle_cpus=0.0) == torch.get_num_threads()


def test_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.delenv("MINILLM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # torch's own count: the most we use
    for idle, threads in [(8.0, 4), (4.0, 4), (3.0, 3), (2.8, 3), (2.7, 2), (0.5, 1), (0.0, 1)]:
        assert minillm.choose_cpu_threads(idle_cpus=idle) == threads, idle


def test_measured_threads_are_between_one_and_torchs(monkeypatch):
    monkeypatch.delenv("MINILLM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert 1 <= minillm.choose_cpu_threads(probe_s=0.1) <= len(minillm.os.sched_getaffinity(0))
