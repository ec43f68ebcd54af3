"""Triton kernels for the model's elementwise chains: RMSNorm, RoPE, SwiGLU's activation and the
sampler's Gumbel-max argmax, each one pass over memory.

minillm.fused(fn) returns the kernel here named like fn; fn itself, plain PyTorch in minillm.py, is
the reference: same arguments, same result, and the tests hold each kernel to it
(tests/test_fused.py, on the CPU under TRITON_INTERPRET=1). minillm calls these on CUDA tensors only.

Why hand-written kernels and not torch.compile of the same functions: compiling the chains takes 9-12 s
of LLM()'s start-up on an H200, most of it, and the compiled kernels are slow where they matter, e.g.
RoPE at 220 us against these 18 us in an 8,192-token prefill step (benchmarks/fused_ops.py; walkthrough
section 4). A Triton kernel with no shape-dependent arguments compiles once per model (and is cached
on disk across processes).

The module is called fused, not kernels: transformers looks for Hugging Face's `kernels` package under that
import name, and a module of ours by that name, installed beside it, broke transformers' imports.

The grids are sized by the rows (tokens), and no row count is passed as an argument: Triton compiles a
variant per value class of each integer argument (1, a multiple of 16, other), so an argument that
changes from step to step would compile new variants mid-generate.

Dimension legend: N rows (tokens or sampling rows), C hidden size, F intermediate size, D head_dim,
V vocabulary.
"""

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim) with unit stride along the last dim (a copy only if it is not already)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------
# RMSNorm: (N, C) -> (N, C)
# ----------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, eps,
                     C: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per row
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / C + eps)  # the statistics in float32, as HF does
    y = (xf * rstd).to(x.dtype)  # rounded to x's dtype before the weight multiplies it, as HF does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """minillm.rms_norm: x (..., C), weight (C,) -> (..., C) in the dtype weight * x promotes to."""
    rows = _rows(x)
    C = rows.shape[1]
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), eps,
                                           C=C, BLOCK_C=triton.next_power_of_2(C), num_warps=4 if C <= 2048 else 8)
    return out.view(x.shape)


# ----------------------------------------------------------------------------
# RoPE: (N, heads, D) rotated by each token's (D/2,) cos and sin -> a new (N, heads, D)
# ----------------------------------------------------------------------------

@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xn, stride_xh, stride_cos, stride_sin,
                 stride_on, stride_oh, HEADS: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # one program per token: all its heads
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < HEADS) & (d < HALF)
    x_first = x_ptr + n * stride_xn + h * stride_xh + d  # (BLOCK_H, BLOCK_HALF): element i of the pair
    x1 = tl.load(x_first, mask=mask, other=0.0)
    x2 = tl.load(x_first + HALF, mask=mask, other=0.0)  # element i + D/2
    cos = tl.load(cos_ptr + n * stride_cos + d, mask=d < HALF, other=0.0)  # (1, BLOCK_HALF) float32
    sin = tl.load(sin_ptr + n * stride_sin + d, mask=d < HALF, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out_first = out_ptr + n * stride_on + h * stride_oh + d
    tl.store(out_first, (x1f * cos - x2f * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_first + HALF, (x2f * cos + x1f * sin).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """minillm.apply_rope: x (N, heads, D) (any strides but a unit one along D); cos, sin (N, D/2) -> a new
    contiguous (N, heads, D), the pairs (x[i], x[i + D/2]) rotated."""
    N, heads, D = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty((N, heads, D), dtype=x.dtype, device=x.device)
    if N:
        _rope_kernel[(N,)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                           out.stride(0), out.stride(1), HEADS=heads, HALF=D // 2,
                           BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(D // 2))
    return out


# ----------------------------------------------------------------------------
# SwiGLU's activation: silu(gate) * up, (N, F) each -> (N, F)
# ----------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out,
                         F: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # grid: (rows, F / BLOCK)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu: computed in float32, rounded to the input's dtype
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """minillm.silu_and_mul: (N, F), (N, F) -> (N, F)."""
    gate, up = _rows(gate), _rows(up)
    N, F = gate.shape
    out = torch.empty((N, F), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if N:
        BLOCK = min(1024, triton.next_power_of_2(F))
        _silu_and_mul_kernel[(N, triton.cdiv(F, BLOCK))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                                         F=F, BLOCK=BLOCK)
    return out


# ----------------------------------------------------------------------------
# The sampler's Gumbel-max: argmax over V of logits / temperature - log q, per row -> (S,)
# ----------------------------------------------------------------------------

@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, q_ptr, out_ptr, stride_logits, stride_q,
                          V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per sampling row, walking V in tiles of BLOCK
    temperature = tl.load(temperature_ptr + row)
    lanes = tl.arange(0, BLOCK)
    # each lane keeps the best score it has seen and where; a later tile takes over only when strictly
    # better, so on a tie the lane keeps the lower index
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        mask = offs < V
        logits = tl.load(logits_ptr + row * stride_logits + offs, mask=mask, other=float("-inf"))
        q = tl.load(q_ptr + row * stride_q + offs, mask=mask, other=1.0)
        score = tl.where(mask, tl.math.div_rn(logits, temperature) - tl.log(q), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_index = tl.where(better, offs, best_index)
    # torch.argmax's answer: the lowest index holding the maximum
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_index, V), axis=0).to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """minillm.gumbel_argmax: logits (S, V) float32, temperature (S,), q (S, V) -> (S,) int64."""
    S, V = logits.shape
    out = torch.empty(S, dtype=torch.long, device=logits.device)
    if S:
        logits, q = _rows(logits), _rows(q)
        _gumbel_argmax_kernel[(S,)](logits, temperature.float().contiguous(), q, out, logits.stride(0), q.stride(0),
                                    V=V, BLOCK=min(4096, triton.next_power_of_2(V)), num_warps=8)
    return out
