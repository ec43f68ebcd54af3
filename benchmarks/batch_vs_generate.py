"""The batch job's throughput against LLM.generate on the same prompts: the command line's path (cli.BatchInput's
lazy second pass, cli.Feeder's step-by-step feeding, one flushed JSON line per finished request) against one
generate call, on one engine (loaded once).

    python benchmarks/batch_vs_generate.py --model PATH [--prompts 2000] [--max-tokens 16] [--device cpu]
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import minillm  # noqa: E402


class Quiet:
    def finished(self, tokens: int) -> None: pass
    def close(self) -> None: pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    prompts = [f"Tell me about the number {i}." for i in range(a.prompts)]
    folder = tempfile.mkdtemp()
    src, out = os.path.join(folder, "in.jsonl"), os.path.join(folder, "out.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    params = dict(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    with minillm.LLM(a.model, device=a.device) as llm:
        llm.generate(prompts[:64], minillm.SamplingParams(**params), use_tqdm=False)  # warm up
        t = time.perf_counter()
        outs = llm.generate(prompts, minillm.SamplingParams(**params), use_tqdm=False)
        gen_s, gen_tokens = time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)
        t = time.perf_counter()
        batch, output = cli.BatchInput(src, False, params), cli.Output(out, False, True, None)
        cli.Feeder(llm, None, Quiet()).run(iter(batch), output.write)
        output.close()
        jsonl_s = time.perf_counter() - t
    jsonl_tokens = sum(len(json.loads(line)["token_ids"]) for line in open(out))
    print(f"LLM.generate: {gen_tokens / gen_s:.0f} output tok/s ({gen_s:.2f} s); JSONL batch job (both passes "
          f"and the writes included): {jsonl_tokens / jsonl_s:.0f} output tok/s ({jsonl_s:.2f} s)")


if __name__ == "__main__":
    main()
