"""minillm against HF transformers `generate` on the CPU, default model (SmolLM2-135M-Instruct GGUF), same run.

    python benchmarks/cpu_vs_hf.py [--prompts 16] [--max-tokens 64] [--threads N] [--busy] [--no-hf]

Both get the same prompts (examples/prompts.txt, repeated) and make exactly --max-tokens greedy tokens
each; HF runs them as one left-padded batch. Both use the same torch thread count: the one minillm
chooses (choose_cpu_threads: the free cores), or --threads. Prints a table of tokens/s, the ratio,
and whether the greedy outputs agree (up to the first EOS).

--busy then starts one busy-loop process beside it (ended by its pid) and runs minillm again, with
the thread count chosen afresh (as a new LLM() would) and, when that differs, with the quiet count:
the collapse the choice avoids.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minillm  # noqa: E402


def cpu_name() -> str:
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


class Clock:
    """Wall seconds and this process's CPU seconds (all threads) of a `with` block. On a shared machine the
    CPU seconds also show what the work itself cost, while the wall time includes the waits for a core."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_minillm(llm, prompts, sp) -> tuple[Clock, list]:
    llm.generate(prompts[:2], minillm.SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    with Clock() as clock:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    return clock, outs


def time_hf(ids, max_tokens) -> tuple[Clock, torch.Tensor, int]:
    from transformers import AutoModelForCausalLM
    path = minillm.default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(ids):
        x[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        hf.generate(input_ids=x[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        with Clock() as clock:
            out = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return clock, out[:, width:], (out.shape[1] - width) * len(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: minillm's choice)")
    ap.add_argument("--busy", action="store_true", help="then run minillm again beside one busy process")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    args = ap.parse_args()
    lines = [l.strip() for l in open(os.path.join(ROOT, "examples", "prompts.txt")) if l.strip()]
    prompts = [lines[i % len(lines)] + f" ({i})" for i in range(args.prompts)]
    sp = minillm.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    threads = args.threads or minillm.choose_cpu_threads()
    torch.set_num_threads(threads)  # as LLM() does; HF then runs with the same count
    llm = minillm.LLM(None, device="cpu")
    rows = []  # (engine, threads, tokens, Clock)
    clock, outs = time_minillm(llm, prompts, sp)
    rows.append(("minillm LLM.generate", threads, sum(len(o.outputs[0].token_ids) for o in outs), clock))
    same = None
    if not args.no_hf:
        clock, hf_out, n_hf = time_hf([llm.get_tokenizer().encode(p) for p in prompts], args.max_tokens)
        rows.append(("HF generate (padded batch)", threads, n_hf, clock))
        # HF's min_new_tokens masks EOS, while ignore_eos (vLLM's meaning) only keeps going after it:
        # compare up to the first EOS minillm picks
        upto_eos = lambda ids: ids[: next((j for j, t in enumerate(ids) if t in llm.llm_engine.eos_ids), len(ids))]
        same = sum(upto_eos(o.outputs[0].token_ids) == hf_out[i, :len(upto_eos(o.outputs[0].token_ids))].tolist()
                   for i, o in enumerate(outs))
    busy_rows = []
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)  # let it take its core
            for n in dict.fromkeys([args.threads or minillm.choose_cpu_threads(), threads]):  # chosen now, quiet
                torch.set_num_threads(n)
                clock, outs_busy = time_minillm(llm, prompts, sp)
                busy_rows.append(("minillm, 1 busy process", n, sum(len(o.outputs[0].token_ids) for o in outs_busy), clock))
        finally:
            busy.kill()
            busy.wait()

    print(f"\ndevice: {cpu_name()}, {len(os.sched_getaffinity(0))} CPUs; torch {torch.__version__}; "
          f"{args.prompts} prompts x {args.max_tokens} greedy tokens, default model (float32)")
    print(f"{'engine':<28} {'threads':>7} {'out tokens':>10} {'wall s':>8} {'cpu s':>8} {'out tok/s':>10}")
    for name, n, tokens, c in rows + busy_rows:
        print(f"{name:<28} {n:>7} {tokens:>10} {c.wall:>8.2f} {c.cpu:>8.2f} {tokens / c.wall:>10.1f}")
    if same is not None:
        (_, _, n_mini, c_mini), (_, _, n_hf, c_hf) = rows
        print(f"minillm / HF: {(n_mini / c_mini.wall) / (n_hf / c_hf.wall):.2f}x (wall), "
              f"{(n_mini / c_mini.cpu) / (n_hf / c_hf.cpu):.2f}x (cpu);  "
              f"identical greedy outputs (up to EOS): {same}/{len(outs)}")
    if busy_rows:
        how = "as given" if args.threads else "chosen afresh"
        print(f"beside a busy process, threads {how}: {busy_rows[0][3].wall / rows[0][3].wall:.2f}x the quiet wall time")

if __name__ == "__main__":
    main()
