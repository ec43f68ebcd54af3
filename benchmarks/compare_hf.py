"""minillm against HF transformers on the same weights, same GPU, same run.

    python benchmarks/compare_hf.py [--model PATH]

Workload (b) of throughput.py: 256 prompts of 100-1024 random tokens, exactly 256 output tokens each.
  - minillm: LLM.generate (continuous batching, paged KV cache, CUDA graphs)
  - HF generate: all 256 prompts left-padded into one batch
  - HF generate_batch: transformers' own continuous batching, attn_implementation="paged|sdpa"
Prints each one's output tokens/s and minillm's ratio to it, with the card's name.
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import build_random_checkpoint, run_minillm, workload  # noqa: E402

import minillm  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, n


def hf_generate(model, prompts, new_tokens):
    """One padded batch: every prompt left-padded to the longest."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=True, temperature=0.6, top_k=0, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts)


def hf_generate_batch(model, prompts, new_tokens):
    from transformers.generation import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.6,
                           top_k=0, pad_token_id=0)
    results = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    return sum(len(r.generated_tokens) for r in results.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--skip-hf-generate", action="store_true")
    args = ap.parse_args()
    tmp = None
    if args.model is None:
        tmp = tempfile.mkdtemp()
        args.model = build_random_checkpoint(tmp)
    rows = {}
    llm = minillm.LLM(args.model, max_model_len=4096)
    prompts, outs = workload("b", llm.llm_engine.cfg.vocab_size)
    run_minillm(llm, *workload("b", llm.llm_engine.cfg.vocab_size, n=16, seed=99))  # warm-up, other prompts
    dt, n_out, _ = run_minillm(llm, prompts, outs)
    rows["minillm LLM.generate"] = (dt, n_out)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM
    if not args.skip_hf_generate:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        hf_generate(model, prompts[:4], 4)  # warm-up
        rows["HF generate (one padded batch)"] = timed(lambda: hf_generate(model, prompts, 256))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda().eval()
    rows["HF generate_batch (paged|sdpa)"] = timed(lambda: hf_generate_batch(model, prompts, 256))

    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"transformers {__import__('transformers').__version__}")
    base = rows["minillm LLM.generate"]
    print(f"{'engine':<34} {'out tokens':>10} {'wall s':>8} {'out tok/s':>10} {'minillm is':>11}")
    for name, (dt, n) in rows.items():
        print(f"{name:<34} {n:>10} {dt:>8.2f} {n / dt:>10.0f} {(base[1] / base[0]) / (n / dt):>10.1f}x")
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
