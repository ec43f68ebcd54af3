"""fused.py's Triton kernels vs minillm's PyTorch functions, their references (what minillm.fused returns
on the GPU vs what the CPU runs). On the CPU the kernels run in Triton's interpreter (conftest.py), which has
no bfloat16 arithmetic: float32 and float16 here, bf16 through benchmarks/gpu_check.py on a GPU."""

import pytest
import torch

import fused
import minillm

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])


def test_fused_returns_the_kernel_named_like_the_reference():
    for fn in (minillm.rms_norm, minillm.apply_rope, minillm.silu_and_mul, minillm.gumbel_argmax):
        assert minillm.fused(fn) is getattr(fused, fn.__name__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    wide = (torch.randn(7, 100, generator=g) * 3).to(dtype)
    x = wide[:, 10:58]  # rows with a stride of 100: a view, as the kernel gets them
    weight = torch.randn(48, generator=g).to(dtype)
    close(fused.rms_norm(x, weight, 1e-5), minillm.rms_norm(x, weight, 1e-5), dtype)
    # Qwen3's q/k norms: (N, heads, D) normalized over D, with a (D,) weight
    heads = torch.randn(5, 4, 16, generator=g).to(dtype)
    w16 = torch.randn(16, generator=g).to(dtype)
    close(fused.rms_norm(heads, w16, 1e-6), minillm.rms_norm(heads, w16, 1e-6), dtype)
    assert fused.rms_norm(x[:0], weight, 1e-5).shape == (0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, D", [(3, 16), (5, 80)])  # 80: D/2 = 40 lanes of a 64-wide tile, the rest masked
def test_apply_rope_on_a_view_of_the_stacked_projection(dtype, H, D):
    cfg = minillm.ModelConfig(vocab_size=10, hidden_size=H * D, intermediate_size=8, num_layers=1, num_heads=H,
                              num_kv_heads=1, head_dim=D, rope_theta=10000.0)
    cos, sin = minillm.rope_tables(cfg, 64, "cpu")
    positions = torch.tensor([0, 5, 17, 63, 2])
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, (H + 1 + 1) * D, generator=g).to(dtype)  # (N, (H + 2 KVH) D), q/k/v side by side
    q, k = qkv[:, :H * D].view(5, H, D), qkv[:, H * D:(H + 1) * D].view(5, 1, D)  # views with the stacked row stride
    for x in (q, k):
        out = fused.apply_rope(x, cos[positions], sin[positions])
        close(out, minillm.apply_rope(x, cos[positions], sin[positions]), dtype)
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(2)
    stacked = (torch.randn(6, 2 * 1500, generator=g) * 4).to(dtype)  # F = 1500: two tiles, the second partly masked
    gate, up = stacked[:, :1500], stacked[:, 1500:]
    close(fused.silu_and_mul(gate, up), minillm.silu_and_mul(gate, up), dtype)


def test_gumbel_argmax_is_the_reference_argmax():
    g = torch.Generator().manual_seed(3)
    S, V = 5, 9000  # three tiles of 4096, the last partly masked
    logits = torch.randn(S, V, generator=g) * 3
    q = torch.empty(S, V).exponential_(generator=g)
    temperature = torch.tensor([0.5, 1.0, 2.0, 1e-5, 0.7])
    assert torch.equal(fused.gumbel_argmax(logits, temperature, q), minillm.gumbel_argmax(logits, temperature, q))
    # ties: the lowest index wins, as torch.argmax; a row masked everywhere (-inf) gives 0, as torch.argmax
    logits, q = torch.zeros(3, V), torch.ones(3, V)
    logits[0, [8500, 100, 4200]] = 5.0  # the same maximum in three tiles
    logits[1, [4097, 4096]] = 5.0       # in one tile, two lanes
    logits[2] = float("-inf")
    ones = torch.ones(3)
    assert fused.gumbel_argmax(logits, ones, q).tolist() == [100, 4096, 0]
    assert minillm.gumbel_argmax(logits, ones, q).tolist() == [100, 4096, 0]
    assert fused.gumbel_argmax(logits[:0], ones[:0], q[:0]).shape == (0,)
