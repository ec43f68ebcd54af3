"""How close minillm comes to the card's roofline on throughput.py's workloads, and at batch 1 (issue #16).

    python benchmarks/roofline.py                 # Llama-3.2-1B-shaped model, random bf16 weights, on a GPU
    python benchmarks/roofline.py --model PATH    # a real (Llama-shaped) checkpoint
    python benchmarks/roofline.py --shape llama-3.1-8b   # a random checkpoint of throughput.py's other shapes
    OMP_NUM_THREADS=1 python benchmarks/roofline.py --tiny   # a tiny model and workloads: checks the script on a CPU

Two numbers are measured on the card first: the copy bandwidth BW (a 1 GiB device-to-device tensor copy timed
with CUDA events, bytes read + bytes written per second) and the matmul rate FLOPS (an (8192, C) x (C, F) matmul
of the model's dtype: the shape of its MLP). Then, from config.json's shapes:
  weights  bytes a step reads: every layer's projections and norms, the final norm and the LM head (tied: the
           embedding table, read whole by the LM head; an untied embedding table is only gathered, N rows)
  KV       bytes per token of context: layers x 2 (K and V) x KV heads x head_dim x dtype size

The roofline of a workload is the time of the schedule minillm would run, step by step. The schedule is
simulated from the workload's own prompt and output lengths with the engine's budgets (max_num_seqs 256,
max_num_batched_tokens 8192): each step, the running sequences first (one decode token each, or the next chunk
of a prompt), then waiting ones admitted in order while the token budget lasts, chunked to fit; a sequence
samples a token in the step its prompt's last token is computed and in each decode step after it, and leaves
when it has all its output tokens. The KV cache is taken as large enough (no preemption: true at 0.9 of an
H200 for these workloads) and the prefix cache as giving nothing (random prompts). One step of N new tokens,
S sampling rows, attending to K positions in all (each sequence's context before the step plus its new
tokens) over P query-key pairs, takes at least
  bandwidth:            (weights + K x KV) / BW
  bandwidth + compute:  max of that and (2 x N x linear params + 2 x S x V x C + 4 x P x H x D x layers) / FLOPS
and the roofline in out tok/s is the workload's output tokens over the sum of its steps' times. The first column
is the bandwidth roofline alone (every step reads all weights once plus the KV of every running sequence); it
overstates what prefill can do, as a prefill step of 8192 tokens is compute-bound, so the second column, which
also counts the matmuls and attention, is the one the achieved fraction is taken of. Not counted, so both are
upper bounds: activations, the logits' write and read, the sampler, writing the new K/V, and launch gaps. A
weight read is read-only traffic, which a card can move somewhat faster than a copy: a fraction a bit over 1
is possible in principle.

minillm runs each workload twice in one process after a 16-prompt warm-up (the first time a fresh process's
first run, the second with new prompts of the same shape), as throughput.py does. Batch 1: a 128-token random
prompt and 512 greedy tokens (ignore_eos), twice with new prompts; its limit is the weights' bytes over BW per
token (the KV of <= 640 tokens adds under 1% at 1B); ms/token is (time of 512 tokens - time of 1) / 511, the
decode steps alone. The target there is >= 0.75 of the limit.
Prints one table: roofline and achieved per workload, with the card's name and the versions.
"""
import argparse
import gc
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import LLAMA_3_2_1B, SHAPES, build_random_checkpoint, workload  # noqa: E402

import minillm  # noqa: E402

# a few-MB model of the same kind, for --tiny (the real vocabulary: the Llama 3 tokenizer comes with it)
TINY = LLAMA_3_2_1B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16)
TINY_SCALE = 8  # --tiny: prompts and outputs 1/8 as long, and 8 prompts


@dataclass
class ModelCost:
    """What one step of the model reads and computes, from config.json's shapes."""
    weight_bytes: int        # read once per step
    kv_bytes_per_token: int  # K and V of one token, all layers
    linear_params: int       # the layers' projection weights: 2 flops each per token
    lm_head_params: int      # V x C: 2 flops each per sampling row
    attn_flops_per_pair: int  # 4 x H x D x layers: QK^T and PV for one query-key pair in every layer

    @classmethod
    def from_config(cls, cfg: dict, dtype_bytes: int) -> "ModelCost":
        C, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        H, KVH = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        D = cfg.get("head_dim") or C // H
        per_layer = H * D * C + 2 * KVH * D * C + C * H * D + 3 * F * C  # q, k and v, o; gate, up, down
        norms = (2 * L + 1) * C
        return cls(weight_bytes=(L * per_layer + norms + V * C) * dtype_bytes,
                   kv_bytes_per_token=L * 2 * KVH * D * dtype_bytes, linear_params=L * per_layer,
                   lm_head_params=V * C, attn_flops_per_pair=4 * H * D * L)


@dataclass
class Step:
    tokens: int      # N: new tokens computed
    kv_tokens: int   # K: positions whose K/V attention reads, summed over the batch
    pairs: int       # P: causal query-key pairs
    samples: int     # S: sequences sampling a token

    def add(self, ctx: int, n: int, samples: bool) -> None:
        """One sequence's part of the step: n new tokens after ctx cached ones, and whether it samples a token."""
        self.tokens, self.kv_tokens = self.tokens + n, self.kv_tokens + ctx + n
        self.pairs += n * ctx + n * (n + 1) // 2
        self.samples += samples


def simulate_schedule(prompt_lens: list[int], out_lens: list[int], max_num_seqs: int, max_num_batched_tokens: int) -> list[Step]:
    """The steps minillm's Scheduler makes for these requests when the KV cache never runs out (see the docstring)."""
    n = len(prompt_lens)
    waiting, running, steps = list(range(n))[::-1], [], []  # waiting: a stack, the first request on top
    computed, total, produced = [0] * n, list(prompt_lens), [0] * n
    while waiting or running:
        budget, batch = max_num_batched_tokens, []
        for i in running:
            if budget == 0:
                break
            batch.append((i, min(total[i] - computed[i], budget)))
            budget -= batch[-1][1]
        while waiting and budget > 0 and len(running) < max_num_seqs:
            i = waiting.pop()
            running.append(i)
            batch.append((i, min(total[i], budget)))
            budget -= batch[-1][1]
        step = Step(0, 0, 0, 0)
        for i, k in batch:
            step.add(computed[i], k, computed[i] + k == total[i])  # the prompt is in (or a decode token): it samples
            computed[i] += k
            if computed[i] == total[i]:
                produced[i], total[i] = produced[i] + 1, total[i] + 1
        steps.append(step)
        running = [i for i in running if produced[i] < out_lens[i]]
    return steps


def step_seconds(step: Step, cost: ModelCost, bandwidth: float, flops: float) -> tuple[float, float]:
    """(bandwidth-only time, bandwidth + compute time) of one step."""
    memory = (cost.weight_bytes + step.kv_tokens * cost.kv_bytes_per_token) / bandwidth
    compute = (2 * step.tokens * cost.linear_params + 2 * step.samples * cost.lm_head_params
               + step.pairs * cost.attn_flops_per_pair) / flops
    return memory, max(memory, compute)


def roofline(steps: list[Step], cost: ModelCost, bandwidth: float, flops: float) -> tuple[float, float]:
    """Seconds for all the steps: (bandwidth only, bandwidth + compute)."""
    times = [step_seconds(s, cost, bandwidth, flops) for s in steps]
    return sum(t for t, _ in times), sum(t for _, t in times)


def device_seconds(fn, device: torch.device, repeat: int) -> float:
    """Seconds per call of fn, after one warm-up call: CUDA events on a GPU, the host clock on the CPU."""
    fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t) / repeat
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / device_seconds(lambda: dst.copy_(src), device, repeat=20)


def matmul_flops(device: torch.device, dtype: torch.dtype, M: int, K: int, N: int) -> float:
    x, w = torch.randn(M, K, device=device, dtype=dtype), torch.randn(N, K, device=device, dtype=dtype)
    return 2 * M * K * N / device_seconds(lambda: x @ w.T, device, repeat=20)  # (M, K) x (K, N)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(llm, prompts: list[list[int]], params: list, synchronize: bool = True) -> tuple[float, int]:
    """(seconds, output tokens) of one generate call on token-id prompts; any engine with vLLM's LLM API."""
    if synchronize:
        sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if synchronize:
        sync()
    return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)


def make_workload(kind: str, vocab_size: int, tiny: bool, seed=None, n: int = 256):
    """throughput.py's workload; --tiny: 8 prompts, prompts and outputs 1/8 as long."""
    prompts, outs = workload(kind, vocab_size, n=min(n, 8) if tiny else n, seed=seed)
    if tiny:
        prompts, outs = [p[:len(p) // TINY_SCALE] for p in prompts], [m // TINY_SCALE for m in outs]
    return prompts, outs


def sampled(out_lens: list[int], make_params) -> list:  # workload (a)/(b)'s sampling: temperature 0.6, ignore_eos
    return [make_params(temperature=0.6, ignore_eos=True, max_tokens=m) for m in out_lens]


def versions() -> str:
    triton = __import__("triton").__version__ if importlib.util.find_spec("triton") else "none"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (the file's own hash, not git's HEAD: the GPU machine gets a copy of the working tree, whose .git may be stale)
    rev = "minillm.py sha1 " + hashlib.sha1(open(os.path.join(root, "minillm.py"), "rb").read()).hexdigest()[:10]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"device: {card}  torch {torch.__version__}  triton {triton}  {rev}"


def batch_one(llm, V: int, tiny: bool, seed: int) -> tuple[float, float]:
    """(seconds for 512 greedy tokens after a 128-token prompt, decode seconds per token)."""
    rng = random.Random(seed)
    prompt_len, n_out = (128, 512) if not tiny else (16, 64)
    prompt = lambda: [[rng.randint(0, min(V, 128000) - 1) for _ in range(prompt_len)]]  # new ones: no prefix cache hit
    greedy = lambda m: [minillm.SamplingParams(temperature=0, ignore_eos=True, max_tokens=m)]
    whole, n = timed_generate(llm, prompt(), greedy(n_out))
    assert n == n_out, (n, n_out)
    first, _ = timed_generate(llm, prompt(), greedy(1))
    return whole, (whole - first) / (n_out - 1)


class StepLog:
    """Wraps the engine's observer (the Observer seam) to keep, per step, its Step shape and its wall time."""

    def __init__(self, engine):
        self.inner, self.steps = engine.observer, []
        self.inner_scheduled, self.inner_step_ended = self.inner.scheduled, self.inner.step_ended
        self.inner.scheduled, self.inner.step_ended = self.scheduled, self.step_ended
        self.gc_seconds, self.gc_started = [0.0, 0.0, 0.0], None  # time in Python's collector, by generation
        gc.callbacks.append(self.on_gc)

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
        elif self.gc_started is not None:
            self.gc_seconds[info["generation"]] += time.perf_counter() - self.gc_started

    def close(self) -> None:
        self.inner.scheduled, self.inner.step_ended = self.inner_scheduled, self.inner_step_ended
        gc.callbacks.remove(self.on_gc)

    def scheduled(self, batch: list) -> None:
        step = Step(0, 0, 0, 0)
        for seq, n in batch:
            step.add(seq.num_computed_tokens, n, seq.num_computed_tokens + n == seq.num_tokens)
        self.steps.append([step, max((n for _, n in batch), default=0), len(batch), None])
        self.inner_scheduled(batch)

    def step_ended(self, started: float) -> None:
        if self.steps and self.steps[-1][3] is None:
            self.steps[-1][3] = time.perf_counter() - started
        self.inner_step_ended(started)


PHASES = [("steps with prefill", lambda longest, seqs: longest > 1),
          ("decode, batch 192-256", lambda longest, seqs: longest == 1 and seqs >= 192),
          ("decode, batch 64-191", lambda longest, seqs: longest == 1 and 64 <= seqs < 192),
          ("decode, batch 8-63", lambda longest, seqs: longest == 1 and 8 <= seqs < 64),
          ("decode, batch 1-7", lambda longest, seqs: longest == 1 and seqs < 8)]


def phase_table(label: str, log: StepLog, generate_seconds: float, cost: "ModelCost", bandwidth: float,
                flops: float) -> None:
    """Where one generate call's time went: its steps by kind, each kind's wall time against its roofline."""
    steps = log.steps
    print(f"\n{label}: {len(steps)} steps, generate {generate_seconds:.3f} s, of it outside steps "
          f"{generate_seconds - sum(s[3] or 0 for s in steps):.3f} s; Python's garbage collector (generations 0/1/2) "
          + "/".join(f"{t:.3f}" for t in log.gc_seconds) + " s")
    print("| steps | count | wall s | roofline s (bw + compute) | roofline / wall | wall ms a step: mean, median, max "
          "| tokens a step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, test in PHASES:
        mine = [s for s in steps if s[3] is not None and test(s[1], s[2])]
        if not mine:
            continue
        wall = sum(s[3] for s in mine)
        limit = sum(step_seconds(s[0], cost, bandwidth, flops)[1] for s in mine)
        ms = sorted(s[3] * 1e3 for s in mine)
        print(f"| {name} | {len(mine)} | {wall:.3f} | {limit:.3f} | {limit / wall:.2f} | {wall / len(mine) * 1e3:.2f}, "
              f"{ms[len(ms) // 2]:.2f}, {ms[-1]:.2f} | {sum(s[0].tokens for s in mine) / len(mine):.0f} |")


def measure(llm, tiny: bool, rows_wanted: str = "ab1") -> dict:
    """Achieved figures: {row: (run 1, run 2)} in out tok/s, batch-1 tok/s and ms/token (of rows_wanted: "a", "b",
    "1" for batch 1)."""
    V = llm.llm_engine.cfg.vocab_size
    prompts, outs = make_workload("b", V, tiny, seed=99, n=16)
    timed_generate(llm, prompts, sampled(outs, minillm.SamplingParams))  # warm-up (Triton compiles, allocator settles)
    if "1" in rows_wanted:
        batch_one(llm, V, tiny, seed=98)  # warm-up for batch 1
    rows = {"phases": []}
    for kind in [k for k in "ab" if k in rows_wanted]:
        runs = []
        for seed in (None, {"a": 10, "b": 11}[kind]):
            prompts, outs = make_workload(kind, V, tiny, seed=seed)
            log = StepLog(llm.llm_engine)
            dt, n = timed_generate(llm, prompts, sampled(outs, minillm.SamplingParams))
            log.close()
            rows["phases"].append((f"({kind}) run {len(runs) + 1}", log, dt))
            assert n == sum(outs), (kind, n, sum(outs))
            runs.append(n / dt)
        rows[kind] = runs
    if "1" not in rows_wanted:
        return rows
    n_out = 64 if tiny else 512
    ones = [batch_one(llm, V, tiny, seed) for seed in (1, 2)]
    rows["1 tok/s"] = [n_out / whole for whole, _ in ones]
    rows["1 ms"] = [per * 1e3 for _, per in ones]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --shape)")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="the random checkpoint's shape")
    ap.add_argument("--rows", default="ab1", help="which rows to run: a, b, 1 (batch 1); default all three")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, 8 short prompts: checks the script on a CPU")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None
    if args.model is None:
        tmp = tempfile.mkdtemp()
        args.model = build_random_checkpoint(tmp, TINY if args.tiny else SHAPES[args.shape])
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    dtype = minillm.resolve_dtype("auto", cfg.get("torch_dtype"), device)
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    flops = matmul_flops(device, dtype, 8192 if device.type == "cuda" else 256, cfg["hidden_size"], cfg["intermediate_size"])
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the measurements' buffers back, before the engine sizes its KV cache
    cost = ModelCost.from_config(cfg, torch.tensor([], dtype=dtype).element_size())

    llm = minillm.LLM(args.model, max_model_len=4096)
    sched = llm.llm_engine.scheduler
    V = llm.llm_engine.cfg.vocab_size
    achieved = measure(llm, args.tiny, args.rows)
    limits = {}  # row -> (bandwidth only, bandwidth + compute), in the row's unit
    for kind in "ab":
        prompts, outs = make_workload(kind, V, args.tiny)
        steps = simulate_schedule(list(map(len, prompts)), outs, sched.max_num_seqs, sched.max_num_batched_tokens)
        limits[kind] = tuple(sum(outs) / t for t in roofline(steps, cost, bandwidth, flops))
    prompt_len, n_out = (16, 64) if args.tiny else (128, 512)
    steps = simulate_schedule([prompt_len], [n_out], sched.max_num_seqs, sched.max_num_batched_tokens)
    per_token = cost.weight_bytes / bandwidth  # the weight-bandwidth limit
    limits["1 tok/s"] = (1 / per_token, n_out / roofline(steps, cost, bandwidth, flops)[1])
    limits["1 ms"] = (per_token * 1e3, roofline(steps[1:], cost, bandwidth, flops)[1] / (n_out - 1) * 1e3)

    print(f"\n{versions()}  transformers {__import__('transformers').__version__}")
    print(f"copy bandwidth {bandwidth / 1e12:.3g} TB/s, {str(dtype)[6:]} matmul {flops / 1e12:.3g} TFLOP/s; weights "
          f"{cost.weight_bytes / 1e9:.3g} GB read per step, KV {cost.kv_bytes_per_token / 1024:.3g} KiB per token; "
          f"max_num_seqs {sched.max_num_seqs}, max_num_batched_tokens {sched.max_num_batched_tokens}")
    names = {"a": "(a) out tok/s", "b": "(b) out tok/s", "1 tok/s": "batch 1, tok/s", "1 ms": "batch 1 decode, ms/token"}
    print(f"| {'row':<25} | roofline: bandwidth | bandwidth + compute | run 1 | run 2 | run 2 / bandwidth | run 2 / bw + compute |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row, name in [(row, name) for row, name in names.items() if row in achieved]:
        (bw, both), (r1, r2) = limits[row], achieved[row]
        fmt = (lambda x: f"{x:.3f}") if row == "1 ms" else (lambda x: f"{x:.0f}")
        frac = (lambda lim: lim / r2) if row == "1 ms" else (lambda lim: r2 / lim)  # ms: lower is better
        print(f"| {name:<25} | {fmt(bw)} | {fmt(both)} | {fmt(r1)} | {fmt(r2)} | {frac(bw):.2f} | {frac(both):.2f} |")
    print("batch 1: the bandwidth column is weights / copy bandwidth per token (target: run 2 / bandwidth >= 0.75); "
          "(a), (b): 256 prompts of 100-1024 random tokens, temperature 0.6, ignore_eos" + (" (--tiny: 1/8 of it)" if args.tiny else ""))
    for label, log, dt in achieved["phases"]:
        phase_table(label, log, dt, cost, bandwidth, flops)
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
