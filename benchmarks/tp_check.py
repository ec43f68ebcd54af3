"""Tensor and data parallelism on GPUs: correctness, then speed (by hand on a machine with 2+ GPUs; CI checks
both on the CPU, tests/test_parallel.py).

    python benchmarks/tp_check.py                   # everything, Llama-3.2-1B-shaped random weights for speed
    python benchmarks/tp_check.py --shape 8b        # speed on Llama-3.1-8B-shaped random weights (16 GB written)
    python benchmarks/tp_check.py --model PATH      # speed on a real checkpoint
    python benchmarks/tp_check.py --skip-speed      # correctness only
    python benchmarks/tp_check.py --dry-run         # the script itself on the CPU, tiny sizes (numbers mean nothing)

  1. float32, TF32 off, random GQA Llamas (8 query heads; 2 KV heads: one per rank; 1 KV head: copied to both):
     greedy tokens at TP=2 == TP=1 and logprobs within 1e-3, with CUDA graphs and eager, with a LoRA adapter
  2. bfloat16: how many greedy outputs of TP=2 agree with TP=1 (for information: rounding differs, near-ties flip)
  3. the seed page's large-scale example: LLM(model, tensor_parallel_size=2, gpu_memory_utilization=0.9), then
     generate over --num-prompts prompts from a file (temperature 0.7, max_tokens 256, stop "\\n\\n")
  4. throughput on workload (b) of throughput.py: TP=1 vs TP=2 (one engine), DP=1 vs DP=2 (two engines, one GPU each)
Prints one table naming the devices. Exits 1 if a check of part 1 fails.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # no TF32 in cuBLAS, in this process and in the workers it starts
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import minillm  # noqa: E402
from throughput import LLAMA_3_2_1B, build_random_checkpoint, workload  # noqa: E402

LLAMA_3_1_8B = {**LLAMA_3_2_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "head_dim": 128, "tie_word_embeddings": False}
SMALL = dict(vocab_size=128256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             head_dim=64, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
             bos_token_id=128000, eos_token_id=128001, model_type="llama", torch_dtype="float32")
rows = []  # (part, setting, result)
DRY = "--dry-run" in sys.argv
ENGINE = dict(device="cpu", num_gpu_blocks_override=512) if DRY else {}  # on the GPU: the defaults


def small_checkpoint(kv_heads: int) -> str:
    """A random fp32 GQA Llama with a random rank-8 PEFT adapter on every projection beside it (folder/adapter)."""
    from safetensors.torch import save_file
    folder = tempfile.mkdtemp()
    cfg = dict(SMALL, num_key_value_heads=kv_heads)
    build_random_checkpoint(folder, cfg)  # (bf16 values, loaded as float32 below)
    g, L, C, F = torch.Generator().manual_seed(1), cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    shapes = dict(q_proj=(C, 8 * 64), k_proj=(C, kv_heads * 64), v_proj=(C, kv_heads * 64), o_proj=(8 * 64, C),
                  gate_proj=(C, F), up_proj=(C, F), down_proj=(F, C))
    weights = {}
    for i in range(L):
        for name, (K, OUT) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{lora.TARGET_MODULES[name]}.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(8, K, generator=g) * 0.05
            weights[f"{key}.lora_B.weight"] = torch.randn(OUT, 8, generator=g) * 0.05
    os.makedirs(f"{folder}/adapter")
    save_file(weights, f"{folder}/adapter/adapter_model.safetensors")
    json.dump(dict(peft_type="LORA", r=8, lora_alpha=16, target_modules=list(shapes)), open(f"{folder}/adapter/adapter_config.json", "w"))
    return folder


def greedy(folder, tp: int, dtype: str, **kw):
    g = random.Random(2)
    prompts = [{"prompt_token_ids": [g.randrange(128000) for _ in range(g.randint(5, 300))]} for _ in range(4 if DRY else 48)]
    adapter = minillm.LoRARequest("all", 1, f"{folder}/adapter")
    with minillm.LLM(folder, dtype=dtype, tensor_parallel_size=tp, enable_lora=True, max_loras=1, max_lora_rank=8,
                      **ENGINE, **kw) as llm:
        sp = minillm.SamplingParams(temperature=0, max_tokens=4 if DRY else 32, ignore_eos=True, logprobs=1)
        return [llm.generate(prompts, sp, use_tqdm=False, lora_request=lora) for lora in (None, [adapter] * len(prompts))]


def part1_and_2() -> bool:
    ok = True
    for kv_heads in (2, 1):
        folder = small_checkpoint(kv_heads)
        for eager in (False,) if DRY else (False, True):
            want, got = greedy(folder, 1, "float32", enforce_eager=eager), greedy(folder, 2, "float32", enforce_eager=eager)
            for which, w, g in (("base", want[0], got[0]), ("LoRA", want[1], got[1])):
                same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(w, g))
                err = max((abs(x[t].logprob - y[t].logprob) for a, b in zip(w, g)
                           if a.outputs[0].token_ids == b.outputs[0].token_ids
                           for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs) for t in x), default=0.0)
                good = same == len(w) and err < 1e-3
                ok &= good
                rows.append(("1 fp32", f"KVH={kv_heads} {'eager' if eager else 'graphs'} {which}",
                             f"{'OK' if good else 'FAIL'}: {same}/{len(w)} equal, max |dlogprob| {err:.1e}"))
        want, got = greedy(folder, 1, "bfloat16"), greedy(folder, 2, "bfloat16")
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(want[0], got[0]))
        rows.append(("2 bf16", f"KVH={kv_heads} graphs base", f"{same}/{len(want[0])} greedy outputs agree (information)"))
    return ok


def part3(folder: str, n: int):
    """The seed's example, as written, on `folder`."""
    words = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
    g = random.Random(3)
    path = os.path.join(tempfile.mkdtemp(), "prompts.txt")
    with open(path, "w") as f:
        f.writelines(" ".join(g.choice(words) for _ in range(g.randint(8, 60))).capitalize() + "\n" for _ in range(n))
    start = time.perf_counter()
    llm = minillm.LLM(model=folder, tensor_parallel_size=2, gpu_memory_utilization=0.9, **ENGINE)
    loaded = time.perf_counter()
    with open(path) as f:
        prompts = [line.strip() for line in f]
    sampling_params = minillm.SamplingParams(temperature=0.7, max_tokens=4 if DRY else 256, stop=["\n\n"])
    outputs = llm.generate(prompts, sampling_params, use_tqdm=True)
    done = time.perf_counter()
    llm.close()
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    rows.append(("3 seed", f"TP=2, {n} prompts, {n_out} output tokens",
                 f"start-up {loaded - start:.0f} s, generate {done - loaded:.0f} s = {n_out / (done - loaded):,.0f} output tok/s"))


def timed_run(folder: str, tp: int, out: str):
    """Part 4 on one data-parallel rank, under torchrun: build the engine, wait for every rank's, time its share of
    workload (b); rank 0 writes (the slowest rank's time, every rank's output tokens, prompts) to `out`."""
    dp = minillm.DataParallel.from_env()
    prompts, outs = workload("b", json.load(open(os.path.join(folder, "config.json")))["vocab_size"], n=4 if DRY else 256)
    prompts = [p[:8] for p in prompts] if DRY else prompts
    device = "cpu" if DRY else f"cuda:{dp.local_rank * tp}"
    llm = minillm.LLM(folder, tensor_parallel_size=tp, **{**ENGINE, "device": device})
    dp.store.add("ready", 1)
    while int(dp.store.add("ready", 0)) < dp.size:
        time.sleep(0.01)
    params = [minillm.SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4 if DRY else m) for m in dp.shard(outs)]
    start = time.perf_counter()
    done = llm.generate([{"prompt_token_ids": p} for p in dp.shard(prompts)], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.close()
    results = dp.gather([(elapsed, sum(len(o.outputs[0].token_ids) for o in done))])
    if dp.rank == 0:
        json.dump([max(t for t, _ in results), sum(n for _, n in results), len(prompts)], open(out, "w"))


def part4(folder: str):
    """Each setting in fresh processes started by torchrun (the DP=2 run is two of them, one GPU each)."""
    for label, tp, nproc in (("TP=1", 1, 1), ("TP=2", 2, 1), ("DP=2", 1, 2)):
        out = os.path.join(tempfile.mkdtemp(), "result.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        os.path.abspath(__file__), "--timed-run", folder, str(tp), out] + ["--dry-run"] * DRY, check=True)
        wall, n_out, n = json.load(open(out))
        rows.append(("4 speed", f"{label}: workload (b), {n} prompts", f"{n_out / wall:,.0f} output tok/s ({wall:.1f} s)"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a checkpoint for parts 3 and 4 (default: random weights, --shape)")
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--num-prompts", type=int, default=10000, help="prompts of part 3 (the seed's 10,000)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--timed-run", nargs=3, metavar=("FOLDER", "TP", "OUT"), help=argparse.SUPPRESS)  # part 4's ranks
    args = ap.parse_args()
    if args.timed_run:
        return timed_run(args.timed_run[0], int(args.timed_run[1]), args.timed_run[2])
    if DRY:
        args.num_prompts = 8
        LLAMA_3_2_1B.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    elif torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    ok = part1_and_2()
    if not args.skip_speed:
        folder = args.model or build_random_checkpoint(tempfile.mkdtemp(), LLAMA_3_1_8B if args.shape == "8b" else LLAMA_3_2_1B)
        part3(folder, args.num_prompts)
        part4(folder)
    names = "CPU (dry run)" if DRY else ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    import triton
    print(f"\n{names}; torch {torch.__version__}, triton {triton.__version__}; speed model: "
          f"{args.model or f'random {args.shape}-shaped Llama, bf16'}\n")
    print("| part | setting | result |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
