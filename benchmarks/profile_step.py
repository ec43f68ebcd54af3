"""Where a decode step's time goes: GPU kernels vs launch and host overhead (run on a GPU).

    python benchmarks/profile_step.py [--batch 256] [--prompt-len 512] [--shape llama-3.1-8b] [--separate]

Fills the engine with `--batch` requests on a random model of `--shape` (Llama-3.2-1B's by default), lets every prompt
finish prefill (those steps under torch.profiler: their wall and GPU time), then times 30 decode steps with the host
clock and with torch.profiler. Prints the wall time per step, the GPU kernel time per step, their ratio, and the
kernels that take the most time.
--separate leaves q/k/v and gate/up as separate projections (no minillm.stack_projections): the A/B of that change.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import SHAPES, build_random_checkpoint  # noqa: E402

import minillm  # noqa: E402


KINDS = [("paged attention", ("_paged_attention", "_merge_splits")),
         ("GEMMs", ("nvjet", "gemm", "cutlass", "splitkreduce", "cublas")),
         ("elementwise (norms, RoPE, SwiGLU, sampler, copies)",
          ("_rms_norm", "_rope", "_silu_and_mul", "_gumbel_argmax", "_write_kv_cache",
           "triton_", "elementwise", "reduce_kernel", "distribution", "copy"))]


def kernel_kinds(times: list[tuple[str, float]]) -> dict:
    """Per-step microseconds summed by kind of kernel (matched on its name, case aside); the rest is "other"."""
    sums = {kind: 0.0 for kind, _ in KINDS} | {"other": 0.0}
    for name, us in times:
        sums[next((kind for kind, marks in KINDS if any(m in name.lower() for m in marks)), "other")] += us
    return sums


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--model", default=None, help="a checkpoint folder (default: a random one of --shape)")
    ap.add_argument("--separate", action="store_true", help="q/k/v and gate/up unstacked (five GEMMs a layer)")
    args = ap.parse_args()
    if args.separate:
        minillm.stack_projections = lambda model: None
    model = args.model or build_random_checkpoint(tempfile.mkdtemp(), SHAPES[args.shape])
    engine = minillm.LLMEngine.from_engine_args(minillm.EngineArgs(model, max_model_len=4096,
                                                                   enforce_eager=args.enforce_eager))
    sp = minillm.SamplingParams(temperature=0.6, max_tokens=1000, ignore_eos=True)
    for i in range(args.batch):
        ids = torch.randint(0, 128000, (args.prompt_len,)).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, sp)
    engine.streaming.clear()  # the loop of LLM.generate: outputs only when a request finishes
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # the prefill steps, profiled
        t, n_prefill = time.perf_counter(), 0
        while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.waiting + engine.scheduler.running):
            engine.step()  # prefill
            n_prefill += 1
        torch.cuda.synchronize()
        prefill_wall = (time.perf_counter() - t) / n_prefill
    prefill = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for _ in range(10):
        engine.step()  # warm-up decode
    torch.cuda.synchronize()
    n = 30
    t = time.perf_counter()
    for _ in range(n):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    # host time in each part of a step (the GPU runs meanwhile, except while SampledTokens.get waits for it)
    parts = [(engine.scheduler, "schedule"), (engine, "prepare_step"), (engine.runner, "prepare"),
             (engine.runner, "run_model"), (engine.runner, "sample"), (minillm.SampledTokens, "get"),
             (engine, "process_token"), (engine, "collect_outputs")]
    spent = {name: 0.0 for _, name in parts}
    for obj, name in parts:
        def timed(*a, _f=getattr(obj, name), _n=name):
            t0 = time.perf_counter()
            r = _f(*a)
            spent[_n] += time.perf_counter() - t0
            return r
        setattr(obj, name, timed if not isinstance(obj, type) else (lambda self, _t=timed: _t(self)))
    for _ in range(n):
        engine.step()
    host = {k: v / n for k, v in spent.items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / n / 1e6  # seconds per step
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}  "
          f"context ~{args.prompt_len + 20}  cuda graphs: {not args.enforce_eager}  model {args.model or args.shape}"
          f"  projections {'separate' if args.separate else 'stacked'}")
    print(f"decode step: wall {wall * 1e3:.2f} ms, GPU kernels {gpu * 1e3:.2f} ms ({100 * gpu / wall:.0f}% of the step), "
          f"{args.batch / wall:.0f} tokens/s")
    print("host, per step: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in host.items()) + " (get: waiting for the GPU)")
    sums = kernel_kinds([(e.key, e.self_device_time_total / n) for e in kernels])
    print("GPU per step by kind: " + ", ".join(f"{kind} {us / 1e3:.2f} ms" for kind, us in sums.items()))
    prefill_gpu = sum(e.self_device_time_total for e in prefill) / n_prefill / 1e3
    sums = kernel_kinds([(e.key, e.self_device_time_total / n_prefill) for e in prefill])
    print(f"prefill steps ({n_prefill}, ~{args.batch * args.prompt_len // n_prefill} tokens each, under the profiler): "
          f"wall {prefill_wall * 1e3:.2f} ms, GPU {prefill_gpu:.2f} ms a step; by kind: "
          + ", ".join(f"{kind} {us / 1e3:.2f} ms" for kind, us in sums.items()))
    for e in sorted(prefill, key=lambda e: -e.self_device_time_total)[:6]:
        print(f"  prefill {e.key[:70]:<70} {e.self_device_time_total / n_prefill:>8.0f} us/step")
    print(f"{'kernel':<70} {'us/step':>8} {'calls/step':>10}")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"{e.key[:70]:<70} {e.self_device_time_total / n:>8.0f} {e.count / n:>10.1f}")


if __name__ == "__main__":
    main()
