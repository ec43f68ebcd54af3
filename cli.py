"""
The command line of minillm: `python minillm.py --prompts file.txt` (or the `minillm` script pip installs).

    python minillm.py --prompts examples/prompts.txt                  # the built-in SmolLM2-135M-Instruct
    python minillm.py --prompts questions.txt --chat --max-tokens 200 --output answers.jsonl
    python minillm.py --prompts file.txt --model ./Llama-3.2-1B --temperature 0.8 --seed 0

One prompt per line in, one completion per prompt out (printed, or one JSON object per line with --output). Every
argument is checked before the model loads, and every error is one line that names its culprit. The work is the
core's: one `LLM` (minillm.py) and one `generate` or `chat` call; with --data-parallel-size K, torchrun starts K
copies of this command and parallel.DataParallel gives each one every K-th prompt.

This file imports minillm only after the arguments parse, so that --help and a mistyped flag answer at once
instead of after torch's second and a half of importing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional


def cli_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="Offline batch generation with a Llama-family model.")
    arg = ap.add_argument
    arg("--prompts", required=True, help="text file with one prompt per line (blank lines skipped); - reads stdin")
    arg("--chat", action="store_true", help="send each line as a user message through the model's chat template")
    arg("--model", default=None, help="HF checkpoint folder, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    arg("--max-tokens", type=int, default=64, help="most tokens to generate per prompt (default 64)")
    arg("--temperature", type=float, default=0.0, help="0 is greedy (the default); higher is more random")
    arg("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass")
    arg("--top-k", type=int, default=0, help="keep only the k most likely tokens (0: off)")
    arg("--seed", type=int, default=None, help="seed for each prompt's sampling stream (reproducible runs)")
    arg("--output", default=None, help="write one JSON object per prompt here (prompt, text, token_ids, finish_reason)")
    arg("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    arg("--lora", default=None, metavar="PATH", help="a PEFT LoRA adapter folder applied to every prompt")
    arg("--trace", default=None, metavar="PATH", help="write what each engine step did: .html (a picture) or .json")
    arg("--json-schema", default=None, metavar="FILE", help="every output is JSON valid under this schema (xgrammar)")
    arg("--regex", default=None, help="every output matches this regular expression (xgrammar)")
    arg("--tensor-parallel-size", type=int, default=1, metavar="N",
        help="GPUs per engine, each holding 1/N of every layer (default 1)")
    arg("--data-parallel-size", type=int, default=1, metavar="K",
        help="engines on this host, each with every K-th prompt (default 1; under torchrun, one per process)")
    return ap


def main(args=None) -> int:
    """Run the command line with `args` (a list of strings, or a parsed Namespace; default sys.argv). Returns the exit
    status: 0 done, 1 an error (printed as one line), 130 interrupted."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
    args = args if isinstance(args, argparse.Namespace) else cli_parser().parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error is one line, naming its culprit
        print(f"minillm: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Check every argument, then generate (on this data-parallel rank) and write the outputs (on rank 0)."""
    import compat
    import minillm
    import parallel
    prompts = read_prompts(args.prompts)
    constraint = None
    if args.json_schema or args.regex:
        constraint = minillm.StructuredOutputsParams(json=read_json(args.json_schema), regex=args.regex)
    params = minillm.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    seed=args.seed, max_tokens=args.max_tokens, structured_outputs=constraint)
    device = compat.check_device(args.device)
    parallel.check_tensor_parallel(args.tensor_parallel_size, device)
    parallel.check_data_parallel(args, device)
    if args.trace:
        import timeline
        timeline.check_path(args.trace)
    for path in filter(None, (args.output, args.trace)) if int(os.environ.get("RANK", 0)) == 0 else ():
        check_writable(path)
    adapter, lora_kwargs = None, {}
    if args.lora:  # one adapter for every prompt: one slot, of exactly its rank
        import lora
        adapter = lora.LoRARequest(os.path.basename(os.path.normpath(args.lora)), 1, args.lora)
        lora_kwargs = dict(enable_lora=True, max_loras=1, max_lora_rank=lora.read_adapter_config(adapter)["r"])
    if args.data_parallel_size > 1 and "WORLD_SIZE" not in os.environ:
        # K engines on this host: torchrun starts this same command K times, one data-parallel rank each
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={args.data_parallel_size}", minillm.__file__, *argv]).returncode
    dp = parallel.DataParallel.from_env()
    outputs = generate_shard(dp, args, prompts, params, adapter, lora_kwargs)
    if dp.rank == 0:
        write_outputs(args.output, prompts, outputs)
    return 0


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (- is stdin)."""
    try:
        src = sys.stdin if path == "-" else open(path, encoding="utf-8")
        with src:
            prompts = [line.rstrip("\n") for line in src if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def read_json(path: Optional[str]):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def check_writable(path: str) -> None:
    """Fail now, not after all the generation, if `path` cannot be written."""
    existed = os.path.exists(path)
    with open(path, "a", encoding="utf-8"):
        pass
    if not existed:
        os.remove(path)


def generate_shard(dp, args, prompts: list[str], params, adapter, lora_kwargs) -> Optional[list]:
    """The generation on data-parallel rank dp.rank: its share of the prompts through an engine of its own (GPUs
    from local_rank * tensor_parallel_size on); rank 0 returns every output, in input order, the others None."""
    import compat
    import minillm
    device = args.device
    if dp.size > 1 and compat.check_device(device).type == "cuda":
        device = f"cuda:{(compat.check_device(device).index or 0) + dp.local_rank * args.tensor_parallel_size}"
    mine, progress, trace = dp.shard(prompts), dp.progress(len(prompts)), bool(args.trace) and dp.rank == 0
    with minillm.LLM(args.model, device=device, tensor_parallel_size=args.tensor_parallel_size, trace=trace,
                     **lora_kwargs) as llm:
        if args.chat:
            conversations = [[{"role": "user", "content": p}] for p in mine]
            outputs = llm.chat(conversations, params, lora_request=adapter, use_tqdm=progress)
        else:
            outputs = llm.generate(mine, params, lora_request=adapter, use_tqdm=progress)
    if trace:  # (rank 0's engine: the others' steps are alike)
        import timeline
        timeline.write_trace(llm.last_trace, args.trace)
        print(f"wrote the trace of {len(llm.last_trace['steps'])} engine steps to {args.trace}", file=sys.stderr)
    return dp.gather(outputs)


def write_outputs(path: Optional[str], prompts: list[str], outputs: list) -> None:
    """Print each prompt and its completion, or write one JSON object per prompt to `path`."""
    if not path:
        for p, o in zip(prompts, outputs):
            print(f"--- {p}\n{o.outputs[0].text}\n")
        return
    with open(path, "w", encoding="utf-8") as f:
        for p, o in zip(prompts, outputs):
            c = o.outputs[0]
            f.write(json.dumps({"prompt": p, "text": c.text, "token_ids": c.token_ids,
                                "finish_reason": c.finish_reason}, ensure_ascii=False) + "\n")
    print(f"wrote {len(outputs)} completions to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
