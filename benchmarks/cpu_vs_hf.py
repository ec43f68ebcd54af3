"""minillm against HF transformers `generate` on the CPU, default model (SmolLM2-135M-Instruct GGUF), same run.

    python benchmarks/cpu_vs_hf.py [--prompts 16] [--max-tokens 64]

Both get the same prompts (examples/prompts.txt, repeated) and make exactly --max-tokens greedy tokens
each; HF runs them as one left-padded batch. Prints tokens/s for both and the ratio.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minillm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    lines = [l.strip() for l in open(os.path.join(ROOT, "examples", "prompts.txt")) if l.strip()]
    prompts = [lines[i % len(lines)] + f" ({i})" for i in range(args.prompts)]

    llm = minillm.LLM(None, device="cpu")
    ids = [llm.get_tokenizer().encode(p) for p in prompts]
    sp = minillm.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], minillm.SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    t_mini = time.perf_counter() - t
    n_mini = sum(len(o.outputs[0].token_ids) for o in outs)

    from transformers import AutoModelForCausalLM
    path = minillm.default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(ids):
        x[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    hf.generate(input_ids=x[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=args.max_tokens,
                          min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
    t_hf = time.perf_counter() - t
    n_hf = (out.shape[1] - width) * len(ids)
    # HF's min_new_tokens masks EOS, while ignore_eos (vLLM's meaning) only keeps going after it: compare up
    # to the first EOS minillm picks
    def upto_eos(ids):
        return ids[: next((j for j, t in enumerate(ids) if t in llm.llm_engine.eos_ids), len(ids))]
    mine = [upto_eos(o.outputs[0].token_ids) for o in outs]
    same = sum(m == out[i, width:width + len(m)].tolist() for i, m in enumerate(mine))

    print(f"\ndevice: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{args.prompts} prompts x {args.max_tokens} greedy tokens, default model (float32)")
    print(f"{'engine':<28} {'out tokens':>10} {'wall s':>8} {'out tok/s':>10}")
    print(f"{'minillm LLM.generate':<28} {n_mini:>10} {t_mini:>8.2f} {n_mini / t_mini:>10.1f}")
    print(f"{'HF generate (padded batch)':<28} {n_hf:>10} {t_hf:>8.2f} {n_hf / t_hf:>10.1f}")
    print(f"minillm / HF: {(n_mini / t_mini) / (n_hf / t_hf):.2f}x;  identical greedy outputs (up to EOS): {same}/{len(outs)}")


if __name__ == "__main__":
    main()
