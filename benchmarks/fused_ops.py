"""The elementwise chains of the model (rms_norm, apply_rope, silu_and_mul, gumbel_argmax) three ways on a GPU:
eager PyTorch (minillm's reference functions), fused.py's Triton kernels (what minillm.fused returns) and
torch.compile(dynamic=True) (what minillm.fused was before). Times each at the Llama-3.2-1B shape's sizes of a
decode step (256 rows) and of a prefill step (8192 rows; the sampler's kernel at 256 rows only), with CUDA events,
inside a CUDA graph as the engine runs them, and prints the kernels' bandwidth against the measured copy bandwidth.

    python benchmarks/fused_ops.py [--batch 256] [--prefill 8192]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minillm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import copy_bandwidth  # noqa: E402


def graph_time(fn, args, reps=50) -> float:
    """Seconds per call of fn(*args), replayed from a CUDA graph of `reps` calls."""
    fn(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def cases(B: int, with_sampler: bool) -> dict:
    """name -> (reference function, its arguments at B rows, bytes it must move)."""
    C, F_, H, D, V = 2048, 8192, 32, 64, 128256
    bf = dict(dtype=torch.bfloat16, device="cuda")
    norm_w = torch.nn.Parameter(torch.ones(C, **bf), requires_grad=False)
    qkv = torch.randn(B, (H + 16) * D, **bf)  # q as the model passes it: a view of the stacked q/k/v output
    out = {
        "rms_norm": (minillm.rms_norm, (torch.randn(B, C, **bf), norm_w, 1e-5), 2 * B * C * 2),
        "apply_rope": (minillm.apply_rope, (qkv[:, :H * D].view(B, H, D), torch.randn(B, D // 2, device="cuda"),
                                            torch.randn(B, D // 2, device="cuda")), 2 * B * H * D * 2),
        "silu_and_mul": (minillm.silu_and_mul, (torch.randn(B, F_, **bf), torch.randn(B, F_, **bf)), 3 * B * F_ * 2),
    }
    if with_sampler:
        out["gumbel_argmax"] = (minillm.gumbel_argmax, (torch.randn(B, V, device="cuda"),
                                                        torch.rand(B, device="cuda") + 0.5,
                                                        torch.rand(B, V, device="cuda") + 1e-3), 2 * B * V * 4)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=8192)
    args = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda"), 1 << 30)  # roofline.py's measure, so the two scripts agree
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'op':<14} {'rows':>5} {'eager us':>9} {'fused.py us':>14} {'compiled us':>12} {'fused.py: % of copy bw':>25}")
    with torch.inference_mode():
        for rows, with_sampler in ((args.batch, True), (args.prefill, False)):
            for name, (fn, a, nbytes) in cases(rows, with_sampler).items():
                eager, mine = graph_time(fn, a), graph_time(minillm.fused(fn), a)
                compiled = graph_time(torch.compile(fn, dynamic=True), a)
                print(f"{name:<14} {rows:>5} {eager * 1e6:>9.1f} {mine * 1e6:>14.1f} {compiled * 1e6:>12.1f} "
                      f"{100 * nbytes / mine / bw:>24.0f}%")


if __name__ == "__main__":
    main()
