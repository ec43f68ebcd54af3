"""Multi-LoRA throughput on a GPU: what serving many adapters in one batch costs.

    python benchmarks/lora.py                  # Llama-3.2-1B-shaped model, random bf16 weights
    python benchmarks/lora.py --model PATH     # a real checkpoint (adapters still random)
    python benchmarks/lora.py --dry-run        # CPU, tiny sizes, kernels in the Triton interpreter:
                                               # checks the script end to end, times nothing real

1. One layer's projections (device time, median of triton.testing.do_bench over CUDA-graph replays):
   the seven projections of one decoder layer without LoRA, with LoRA as one shrink + expand per
   projection (14 launches, the first version), and as the model runs them now (q/k/v and gate/up
   stacked: 8 launches); then the LoRA kernels of each stack alone, and the step's token grouping
   (once per step, not per layer). Decode-sized (256 tokens) and prefill-sized (8192 tokens) steps.
2. Workload (b) of benchmarks/throughput.py (256 prompts of 100-1024 tokens, 256 output tokens each,
   ignore_eos), with random rank-16 adapters on all seven projections, written in PEFT's format by
   this script. Rows:
     base               LoRA off (the plain engine)
     LoRA on, none      enable_lora=True, every request on the base model
     1 adapter          one adapter for every prompt                    (max_loras=4)
     4 distinct         prompt i uses adapter i % 4                     (max_loras=4)
     16 distinct        prompt i uses adapter i % 16                    (max_loras=16)
   Output tokens/s and the ratio to base (target: 4 distinct >= 0.85).
A part that fails prints its error and the script goes on with the next.
"""
import os
import sys

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter runs the kernels on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import minillm  # noqa: E402
from benchmarks.throughput import LLAMA_3_2_1B, build_random_checkpoint, workload  # noqa: E402

TINY = dict(LLAMA_3_2_1B, vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")


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
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std: (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)
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


# ---- 1. one layer's projections -------------------------------------------------------------------


def device_us(fn, reps: int) -> float:
    """Device time of one fn() in µs: a CUDA graph of `reps` calls, replayed by do_bench (median). On
    the CPU (dry run) one call's wall time, which says nothing about a GPU."""
    fn()  # Triton compiles here, outside the capture
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
    del graph
    return ms * 1000 / reps


@torch.inference_mode()
def layer_breakdown(cfg: dict, N: int, num_adapters: int, rank: int, max_loras: int, dev: str, dt) -> dict:
    """µs for one layer's seven projections on N tokens (num_adapters spread round-robin over them)."""
    mcfg = minillm.ModelConfig(vocab_size=256, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                               num_layers=1, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                               head_dim=cfg.get("head_dim") or 0)
    with torch.device(dev):
        model = minillm.Llama(mcfg).to(dt)
    manager = lora.LoRAManager(model, max_loras, rank)
    for name, (A, B) in manager.views.items():  # every slot holds a random adapter of rank `rank`
        A.normal_(0, A.shape[-1] ** -0.5)
        B.normal_(0, 0.01)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    C, Fs, HD = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads * mcfg.head_dim
    x, xo, xf = (torch.randn(N, K, device=dev, dtype=dt) for K in (C, HD, Fs))  # inputs of q/k/v + gate/up, o, down
    slots = torch.arange(N, device=dev) % num_adapters
    batch = lora.LoRABatch.build(slots, max_loras)
    batch.tiles  # built once per step in the engine: timed on its own below, not inside the layers
    stacks = {"q/k/v": ((attn.q_proj, attn.k_proj, attn.v_proj), x), "o": ((attn.o_proj,), xo),
              "gate/up": ((mlp.gate_proj, mlp.up_proj), x), "down": ((mlp.down_proj,), xf)}

    def projections(lora_batch):  # as the model runs them
        for projs, inp in stacks.values():
            minillm.project(projs, inp, lora_batch)

    def per_projection():  # the first version: one shrink + expand per projection, 14 launches
        for projs, inp in stacks.values():
            for proj in projs:
                lora.add(proj(inp), inp, proj.lora_a, proj.lora_b, batch)

    reps = 20 if N <= 1024 else 2
    r = {"base": device_us(lambda: projections(None), reps),
         "per projection": device_us(per_projection, reps),
         "stacked": device_us(lambda: projections(batch), reps)}
    for name, (projs, inp) in stacks.items():  # the LoRA kernels alone (y += in place, repeatedly: fine for timing)
        ys = [proj(inp) for proj in projs]
        r["lora " + name] = device_us(lambda: lora.add_stacked(ys, inp, projs, batch), reps)
    # the LoRA kernels' memory traffic: x read, y read and written, the float32 partial sums written and
    # read once, the slots' weights; over the card's copy bandwidth it is their floor at this N
    nbytes = 0
    for projs, inp in stacks.values():
        G, (K, width) = len(projs), (inp.shape[1], sum(p.out_features for p in projs))
        split_k = lora._config(N, K, max(p.out_features for p in projs), G * rank, rank, inp.device)["split_k"]
        nbytes += (N * K + 2 * N * width + max_loras * rank * (G * K + width)) * inp.element_size() + 2 * split_k * N * G * rank * 4
    r["bytes"] = nbytes
    group = lora.group_tokens if lora.use_kernels(slots) else lora.group_tokens_ref
    r["grouping"] = device_us(lambda: group(slots, max_loras, batch.block_m), reps)
    r["grouping, PyTorch"] = device_us(lambda: lora.group_tokens_ref(slots, max_loras, batch.block_m), reps)
    return r


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 512 MiB (read + write), the floor's yardstick."""
    if not torch.cuda.is_available():
        return 0.0
    src = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms / 1000)


def print_breakdown(rows: list, dry_run: bool, bandwidth: float):
    unit = "wall µs, interpreter: NOT a timing" if dry_run else "device µs"
    print(f"\none layer, 7 projections ({unit}); LoRA launches per layer: 14 per projection, 8 stacked")
    print(f"{'':<29} {'base':>8} {'per proj':>9} {'stacked':>8} {'overhead':>9} {'q/k/v':>7} {'o':>6} {'gate/up':>8} "
          f"{'down':>6} {'LoRA sum':>8} {'floor':>6}  grouping, per step")
    for label, r in rows:
        lora_sum = sum(r["lora " + n] for n in ("q/k/v", "o", "gate/up", "down"))
        floor = f"{r['bytes'] / bandwidth * 1e6:>6.1f}" if bandwidth else f"{'-':>6}"
        print(f"{label:<29} {r['base']:>8.1f} {r['per projection']:>9.1f} {r['stacked']:>8.1f} "
              f"{r['stacked'] / r['base'] - 1:>8.0%} {r['lora q/k/v']:>7.1f} {r['lora o']:>6.1f} {r['lora gate/up']:>8.1f} "
              f"{r['lora down']:>6.1f} {lora_sum:>8.1f} {floor}  {r['grouping']:.1f} (PyTorch: {r['grouping, PyTorch']:.1f})",
              flush=True)
    print("  base: the seven projections without LoRA; per proj / stacked: with LoRA, 14 / 8 kernel launches;"
          "\n  overhead: stacked vs base; q/k/v .. down: each stack's LoRA kernels alone (shrink + expand);"
          "\n  floor: the LoRA kernels' bytes over the copy bandwidth" +
          (f" ({bandwidth / 1e12:.2f} TB/s)" if bandwidth else "") +
          "; grouping: tokens into tiles, one kernel (in PyTorch ~35)")


# ---- 2. workload (b) through the engine ------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_engine(llm, prompts, out_lens, lora_request=None):
    params = [minillm.SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in out_lens]
    sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    sync()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(out_lens), (n_out, sum(out_lens))
    return dt, n_out, sum(map(len, prompts))


def engine_rows(model: str, cfg: dict, rows: list, rank: int, tmp: str, dry_run: bool) -> dict:
    adapters = [minillm.LoRARequest(f"adapter{i}", i + 1, write_adapter(os.path.join(tmp, f"adapter{i}"), cfg, rank, i))
                for i in range(16)]
    n = 8 if dry_run else 256
    prompts, outs = workload("b", cfg["vocab_size"], n=n)
    if dry_run:
        outs = [8] * n
    # each engine takes 45% of the card, so a second fits even before the first's memory is back
    size = dict(device="cpu", num_gpu_blocks_override=1024) if dry_run else dict(gpu_memory_utilization=0.45)
    engines = [("base", {}, ["base"]), ("lora4", dict(enable_lora=True, max_loras=4), ["none", "1", "4"]),
               ("lora16", dict(enable_lora=True, max_loras=16), ["16"])]
    results = {}
    for name, kwargs, engine_rows in engines:
        engine_rows = [r for r in engine_rows if r in rows]
        if not engine_rows:
            continue
        try:
            t = time.perf_counter()
            # the rows repeat one workload on one engine: no prefix cache, or later rows would skip the prefill
            llm = minillm.LLM(model, max_model_len=4096, max_lora_rank=rank, enable_prefix_caching=False, **size, **kwargs)
            startup = time.perf_counter() - t
            warm = workload("b", cfg["vocab_size"], n=16 if not dry_run else 2, seed=99)
            run_engine(llm, warm[0], [8] * len(warm[0]) if dry_run else warm[1],
                       lora_request=adapters[:len(warm[0])] if kwargs else None)  # Triton compiles, allocator settles
            for row in engine_rows:
                k = {"base": 0, "none": 0, "1": 1, "4": 4, "16": 16}[row]
                reqs = [adapters[i % k] for i in range(len(prompts))] if k else None
                dt, n_out, n_in = run_engine(llm, prompts, outs, lora_request=reqs)
                results[row] = (dt, n_out, n_in)
                print(f"{row:>5}: {n_out / dt:8.0f} out tok/s  {dt:6.2f} s  (engine {name}, startup {startup:.1f} s, "
                      f"slot loads {llm.llm_engine.lora.num_loads if llm.llm_engine.lora else 0})", flush=True)
            del llm  # give its memory back before the next engine
        except Exception:
            print(f"engine {name} failed:\n{traceback.format_exc()}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def print_rows(results: dict):
    labels = {"base": "base (LoRA off)", "none": "LoRA on, no adapter", "1": "1 adapter", "4": "4 distinct",
              "16": "16 distinct (max_loras=16)"}
    base = results.get("base")
    print(f"\n{'workload (b)':<28} {'out tok/s':>10} {'total tok/s':>11} {'wall s':>7} {'vs base':>8}")
    for row, (dt, n_out, n_in) in results.items():
        ratio = f"{(n_out / dt) / (base[1] / base[0]):.3f}" if base else "-"
        print(f"{labels[row]:<28} {n_out / dt:>10.0f} {(n_in + n_out) / dt:>11.0f} {dt:>7.2f} {ratio:>8}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random Llama-3.2-1B-shaped one)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", default="base,none,1,4,16", help="which engine rows to run, comma-separated ('' for none)")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer kernel breakdown")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the kernels in the Triton interpreter")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --dry-run to check the script on the CPU")
    dev, dt = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    engine_use_kernels = lora.use_kernels
    if dry:
        lora.use_kernels = lambda t: True  # the layer breakdown runs the Triton kernels in the interpreter
    tmp = tempfile.mkdtemp()
    try:
        model = args.model
        if model is None:
            os.makedirs(os.path.join(tmp, "model"))
            model = build_random_checkpoint(os.path.join(tmp, "model"), TINY if dry else LLAMA_3_2_1B)
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
        print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
              f"rank {args.rank} on all seven projections", flush=True)
        breakdown, bandwidth = [], 0.0
        if not args.no_layers:
            cases = ((256, 4, 4), (256, 16, 16), (8192, 4, 4)) if not dry else ((40, 4, 4), (1100, 4, 4))
            for N, k, S in cases:
                label = f"N={N}, {k} adapters" + (" (decode)" if N <= 1024 else " (prefill)")
                try:
                    breakdown.append((label, layer_breakdown(cfg, N, k, args.rank, S, dev, dt)))
                except Exception:
                    print(f"layer breakdown {label} failed:\n{traceback.format_exc()}", flush=True)
                gc.collect()
                if not dry:
                    torch.cuda.empty_cache()
            try:
                bandwidth = copy_bandwidth()
            except Exception:
                print(f"copy bandwidth failed:\n{traceback.format_exc()}", flush=True)
            print_breakdown(breakdown, dry, bandwidth)
        lora.use_kernels = engine_use_kernels  # the engine as it runs: the kernels on the GPU only
        if not dry:
            torch.cuda.reset_peak_memory_stats()  # the engines size their KV cache from the peak
        results = engine_rows(model, cfg, [r for r in args.rows.split(",") if r], args.rank, tmp, dry) if args.rows else {}
        print(f"\ndevice: {name}  torch {torch.__version__}  triton {triton.__version__}  "
              f"rank {args.rank} on all seven projections")
        if breakdown:
            print_breakdown(breakdown, dry, bandwidth)
        print_rows(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
