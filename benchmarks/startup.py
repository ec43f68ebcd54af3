"""How long minillm takes to start: `import minillm`, then `LLM()` of the default model on the CPU, or with
--gpu of a random Llama-3.2-1B-shaped checkpoint (benchmarks/throughput.py's) on the GPU.

    python benchmarks/startup.py [--runs 3]
    python benchmarks/startup.py --gpu [--runs 2] [--shape llama-3.1-8b]

--gpu times LLM()'s parts as the engine runs them, in each fresh process: load_model (read the safetensors,
build the model on the GPU), ModelRunner.warm_up (Triton compiles fused.py's kernels), count_kv_blocks (the
memory profile: one forward pass of max_num_batched_tokens), capture_cuda_graphs, and how many variants of each
Triton kernel the process compiled. The first process meets an empty Triton cache (a fresh machine); the later
ones find it on disk.

Each run is a fresh Python process (the file is in the OS page cache after the first). Prints the
median wall time of each phase over the runs, then where LLM()'s time goes, timed piece by piece in the
last process: reading the GGUF's metadata, building the tokenizer, dequantizing the weights, building
the model around them, allocating the KV cache.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run() -> dict:
    """In a fresh process: the phases of a start, in seconds."""
    t0 = time.perf_counter()
    sys.path.insert(0, ROOT)
    import torch
    t_torch = time.perf_counter()
    import formats
    import minillm
    t_import = time.perf_counter()
    llm = minillm.LLM(None, device="cpu")
    t_llm = time.perf_counter()
    times = {"import torch": t_torch - t0, "import minillm (after torch)": t_import - t_torch, "LLM()": t_llm - t_import}
    # LLM()'s pieces, again, one at a time (reads of a file already read: what a second start sees)
    path = minillm.default_model_path()
    pieces = {
        "  read GGUF metadata (GGUFFile)": lambda: formats.GGUFFile(path),
        "  build the tokenizer": lambda: minillm.make_tokenizer(*formats.tokenizer_from_gguf(file.fields)),
        "  dequantize the weights": lambda: [formats.dequantize(data, kind) for _, kind, data in file.tensors],
        "  load_model (all of the above + model)": lambda: minillm.load_model(path, "cpu", "auto", None),
        "  allocate a 1 GiB KV cache (the CPU's)": lambda: minillm.allocate_kv_cache(
            cfg, (1 << 30) // minillm.kv_bytes_per_block(cfg, 16, torch.float32), 16, torch.float32, "cpu"),
    }
    del llm
    file, (_, cfg, _) = formats.GGUFFile(path), minillm.load_model(path, "cpu", "auto", None)
    for name, piece in pieces.items():
        t = time.perf_counter()
        piece()
        times[name] = time.perf_counter() - t
    times["threads"] = torch.get_num_threads()
    return times


def one_gpu_run(model: str) -> dict:
    """In a fresh process: LLM() of `model` on the GPU, and the seconds of each of its timed parts."""
    t0 = time.perf_counter()
    sys.path.insert(0, ROOT)
    import torch
    import minillm
    times = {"import torch + minillm": time.perf_counter() - t0}

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times[label] = times.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)
    timed(minillm, "load_model", "  load_model")
    timed(minillm.ModelRunner, "warm_up", "  warm_up (compile)")
    timed(minillm.ModelRunner, "count_kv_blocks", "  count_kv_blocks (memory profile)")
    timed(minillm.ModelRunner, "capture_cuda_graphs", "  capture_cuda_graphs")
    t = time.perf_counter()
    minillm.LLM(model, max_model_len=4096)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times["LLM()"] = time.perf_counter() - t
    times.update(compiled_variants())
    return times


def compiled_variants() -> dict:
    """How many variants of each Triton kernel this process compiled (or found in the on-disk cache)."""
    import triton
    import fused
    import paged_attention
    counts = {}
    for module in (fused, paged_attention):
        for name, fn in vars(module).items():
            if isinstance(fn, triton.runtime.JITFunction):  # device_caches: device -> (variants, ...)
                n = sum(len(cache[0]) for cache in getattr(fn, "device_caches", {}).values())
                if n:
                    counts[f"variants of {name}"] = n
    return counts


def gpu_main(runs: int, shape: str) -> None:
    import tempfile
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from throughput import SHAPES, build_random_checkpoint
    model = build_random_checkpoint(tempfile.mkdtemp(), SHAPES[shape])
    results = [json.loads(subprocess.run([sys.executable, __file__, "--gpu-child", model], capture_output=True,
                                         text=True, check=True).stdout.splitlines()[-1]) for _ in range(runs)]
    print(f"\nLLM() start-up on {torch.cuda.get_device_name()}, {shape} random checkpoint, torch {torch.__version__}: "
          f"{runs} fresh processes (the first with empty compiler caches)")
    print("| part | " + " | ".join(f"process {i + 1}" for i in range(runs)) + " |")
    print("|---|" + "---:|" * runs)
    for name in results[0]:
        cell = (lambda v: str(v)) if name.startswith("variants") else (lambda v: f"{v:.2f} s")
        print(f"| {name} | " + " | ".join(cell(r.get(name, 0.0)) for r in results) + " |")


def main():
    if "--child" in sys.argv:
        print(json.dumps(one_run()))
        return
    if "--gpu-child" in sys.argv:
        print(json.dumps(one_gpu_run(sys.argv[-1])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=None, help="fresh processes (default: 3 on the CPU, 2 with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="a random checkpoint on the GPU (see the docstring)")
    ap.add_argument("--shape", default="llama-3.2-1b", help="with --gpu: throughput.py's shape")
    args = ap.parse_args()
    if args.gpu:
        gpu_main(args.runs or 2, args.shape)
        return
    args.runs = args.runs or 3
    runs = [json.loads(subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1]) for _ in range(args.runs)]
    load = os.getloadavg()[0]
    print(f"startup, median of {args.runs} fresh processes (load average {load:.2f}, "
          f"{len(os.sched_getaffinity(0))} CPUs, torch threads {runs[0]['threads']})")
    for name in runs[0]:
        if name != "threads":
            print(f"{name:<44} {statistics.median(r[name] for r in runs):6.2f} s")


if __name__ == "__main__":
    main()
