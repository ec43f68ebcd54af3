"""The elementwise chains of the model (rms_norm, apply_rope, silu_and_mul, gumbel_argmax) three ways on a GPU:
eager PyTorch, torch.compile(dynamic=True) (what minillm.fused uses) and torch.compile at fixed shapes. Times
each at the decode step's shapes of the Llama-3.2-1B shape (batch 256), with CUDA events, inside a CUDA graph
as the engine runs them, and prints achieved bandwidth against the measured copy bandwidth.

    python benchmarks/fused_ops.py [--batch 256]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    B, C, F_, H, D, V = args.batch, 2048, 8192, 32, 64, 128256
    bf = dict(dtype=torch.bfloat16, device="cuda")
    bw = copy_bandwidth(torch.device("cuda"), 1 << 30)  # roofline.py's measure, so the two scripts agree
    norm_w = torch.nn.Parameter(torch.ones(C, **bf), requires_grad=False)
    cases = {
        "rms_norm": (minillm.rms_norm, (torch.randn(B, C, **bf), norm_w, 1e-5), 2 * B * C * 2),
        "apply_rope": (minillm.apply_rope, (torch.randn(B, H, D, **bf), torch.randn(B, D // 2, device="cuda"),
                                            torch.randn(B, D // 2, device="cuda")), 2 * B * H * D * 2),
        "silu_and_mul": (minillm.silu_and_mul, (torch.randn(B, F_, **bf), torch.randn(B, F_, **bf)), 3 * B * F_ * 2),
        "gumbel_argmax": (minillm.gumbel_argmax, (torch.randn(B, V, device="cuda"), torch.rand(B, device="cuda") + 0.5,
                                                  torch.rand(B, V, device="cuda") + 1e-3), 2 * B * V * 4),
    }
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {B}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'op':<14} {'eager us':>9} {'compiled dynamic us':>20} {'compiled static us':>19} {'engine-warmed us':>17} "
          f"{'engine: % of copy bw':>21}")
    with torch.inference_mode():
        for name, (fn, a, nbytes) in cases.items():
            eager = graph_time(fn, a)
            dyn = graph_time(minillm.fused(fn), a)
            static = graph_time(torch.compile(fn, dynamic=False), a)
            warmed = torch.compile(fn, dynamic=True)  # first called as ModelRunner.warm_up calls it: odd small sizes
            if name == "silu_and_mul":
                for n in (3, 1):
                    warmed(torch.ones(n, 7, **bf), torch.ones(n, 7, **bf))
            elif name == "rms_norm":
                for n in (3, 1):
                    warmed(torch.ones(n, C, **bf), norm_w, 1e-5)
            engine = graph_time(warmed, a)
            print(f"{name:<14} {eager * 1e6:>9.1f} {dyn * 1e6:>20.1f} {static * 1e6:>19.1f} {engine * 1e6:>17.1f} "
                  f"{100 * nbytes / engine / bw:>21.0f}%")


if __name__ == "__main__":
    main()
