"""How long minillm takes to start on the CPU: `import minillm`, then `LLM()` of the default model.

    python benchmarks/startup.py [--runs 3]

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


def main():
    if "--child" in sys.argv:
        print(json.dumps(one_run()))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
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
