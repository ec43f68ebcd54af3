"""Multi-LoRA throughput on a GPU: what serving many adapters in one batch costs.

    python benchmarks/lora.py                  # Llama-3.2-1B-shaped model, random bf16 weights
    python benchmarks/lora.py --model PATH     # a real checkpoint (adapters still random)

Workload (b) of benchmarks/throughput.py (256 prompts of 100-1024 tokens, 256 output tokens each,
ignore_eos), with random rank-16 adapters on all seven projections, written in PEFT's format by
this script. Rows:
  base               LoRA off (the plain engine)
  LoRA on, none      enable_lora=True, every request on the base model
  1 adapter          one adapter for every prompt                    (max_loras=4)
  4 distinct         prompt i uses adapter i % 4                     (max_loras=4)
  16 distinct        prompt i uses adapter i % 16                    (max_loras=16)
Prints output tokens/s and the ratio to base, then a per-layer kernel breakdown (CUDA graphs,
the seven projections of one layer with and without the LoRA kernels), and the card's name.
"""
import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import minillm  # noqa: E402
from benchmarks.throughput import build_random_checkpoint, run_minillm, workload  # noqa: E402


def projection_shapes(cfg: dict) -> dict:
    """module name -> (K, OUT) for a HF Llama config."""
    C, Fs = cfg["hidden_size"], cfg["intermediate_size"]
    H, KVH = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or C // H
    return {"q_proj": (C, H * D), "k_proj": (C, KVH * D), "v_proj": (C, KVH * D), "o_proj": (H * D, C),
            "gate_proj": (C, Fs), "up_proj": (C, Fs), "down_proj": (Fs, C)}


def write_adapter(folder: str, cfg: dict, rank: int, seed: int) -> str:
    """A random PEFT-format LoRA adapter on all seven projections of every layer."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape, std: (torch.randn(*shape, generator=g, device="cuda") * std).to(torch.bfloat16).cpu()
    w = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (K, OUT) in projection_shapes(cfg).items():
            p = f"base_model.model.model.layers.{i}.{lora.TARGET_MODULES[name]}.{name}."
            w[p + "lora_A.weight"] = rand(rank, K, std=K ** -0.5)
            w[p + "lora_B.weight"] = rand(OUT, rank, std=0.01)
    save_file(w, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(projection_shapes(cfg)),
                   "bias": "none", "use_rslora": False}, f)
    return folder


@torch.inference_mode()
def layer_breakdown(cfg: dict, N: int, num_adapters: int, rank: int, max_loras: int) -> tuple[float, float]:
    """µs for the seven projections of one layer on N tokens, without and with LoRA (num_adapters
    spread round-robin over the tokens), each replayed from a CUDA graph."""
    dev, dt = "cuda", torch.bfloat16
    shapes = projection_shapes(cfg)
    W = {n: torch.randn(OUT, K, device=dev, dtype=dt) * 0.02 for n, (K, OUT) in shapes.items()}
    A = {n: torch.randn(max_loras, rank, K, device=dev, dtype=dt) * 0.02 for n, (K, OUT) in shapes.items()}
    B = {n: torch.randn(max_loras, rank, OUT, device=dev, dtype=dt) * 0.02 for n, (K, OUT) in shapes.items()}
    xs = {K: torch.randn(N, K, device=dev, dtype=dt) for K, _ in shapes.values()}
    slots = (torch.arange(N, device=dev) % num_adapters)

    def layer(with_lora):
        batch = lora.LoRABatch.build(slots, max_loras) if with_lora else None
        for n, (K, OUT) in shapes.items():
            y = F.linear(xs[K], W[n])
            if with_lora:
                lora.add(y, xs[K], A[n], B[n], batch)

    times = []
    for with_lora in (False, True):
        layer(with_lora)  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                layer(with_lora)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 200)
    return times[0], times[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random Llama-3.2-1B-shaped one)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", default="base,none,1,4,16", help="which rows to run, comma-separated")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    model = args.model
    if model is None:
        os.makedirs(os.path.join(tmp, "model"))
        model = build_random_checkpoint(os.path.join(tmp, "model"))
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    adapters = [minillm.LoRARequest(f"adapter{i}", i + 1, write_adapter(os.path.join(tmp, f"adapter{i}"), cfg, args.rank, i))
                for i in range(16)]
    prompts, outs = workload("b", cfg["vocab_size"])
    rows = args.rows.split(",")
    # each engine takes 45% of the card, so a second fits even before the first's memory is back
    engines = [("base", {}, ["base"]), ("lora4", dict(enable_lora=True, max_loras=4), ["none", "1", "4"]),
               ("lora16", dict(enable_lora=True, max_loras=16), ["16"])]
    results = {}
    for name, kwargs, engine_rows in engines:
        engine_rows = [r for r in engine_rows if r in rows]
        if not engine_rows:
            continue
        t = time.perf_counter()
        llm = minillm.LLM(model, max_model_len=4096, gpu_memory_utilization=0.45, max_lora_rank=args.rank, **kwargs)
        startup = time.perf_counter() - t
        warm = workload("b", cfg["vocab_size"], n=16)
        run_minillm(llm, *warm, lora_request=adapters[:16] if kwargs else None)  # Triton compiles, allocator settles
        for row in engine_rows:
            k = {"base": 0, "none": 0, "1": 1, "4": 4, "16": 16}[row]
            reqs = [adapters[i % k] for i in range(len(prompts))] if k else None
            dt, n_out, n_in = run_minillm(llm, prompts, outs, lora_request=reqs)
            results[row] = (dt, n_out, n_in)
            print(f"{row:>5}: {n_out / dt:8.0f} out tok/s  {dt:6.2f} s  (engine {name}, startup {startup:.1f} s, "
                  f"slot loads {llm.lora.num_loads if llm.lora else 0})", flush=True)
        del llm  # give its memory back before the next engine
        gc.collect()
        torch.cuda.empty_cache()
    shutil.rmtree(tmp)
    # -- the kernels alone: one layer's projections, decode-sized and prefill-sized batches --
    breakdown = []
    for N, k, S in ((256, 4, 4), (256, 16, 16), (8192, 4, 4)):
        base_us, lora_us = layer_breakdown(cfg, N, k, args.rank, S)
        breakdown.append((N, k, base_us, lora_us))
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{importlib.util.find_spec('triton') and __import__('triton').__version__}  rank {args.rank}, all seven projections")
    labels = {"base": "base (LoRA off)", "none": "LoRA on, no adapter", "1": "1 adapter", "4": "4 distinct",
              "16": "16 distinct (max_loras=16)"}
    base = results.get("base")
    print(f"{'workload (b)':<28} {'out tok/s':>10} {'total tok/s':>11} {'wall s':>7} {'vs base':>8}")
    for row, (dt, n_out, n_in) in results.items():
        ratio = f"{(n_out / dt) / (base[1] / base[0]):.3f}" if base else "-"
        print(f"{labels[row]:<28} {n_out / dt:>10.0f} {(n_in + n_out) / dt:>11.0f} {dt:>7.2f} {ratio:>8}")
    print(f"\n{'one layer, 7 projections (bf16)':<34} {'base µs':>8} {'+LoRA µs':>9} {'overhead':>9}")
    for N, k, b, lo in breakdown:
        print(f"{f'N={N}, {k} adapters':<34} {b:>8.1f} {lo:>9.1f} {lo / b - 1:>8.0%}")


if __name__ == "__main__":
    main()
