"""Seeing the engine work: eight questions behind one shared system prompt, on a KV cache too small to hold
them all, traced step by step (LLM(trace=True)). Writes trace.html: open it in a browser.

    python examples/trace_demo.py [trace.html]

Four sequences run at a time (max_num_seqs=4): the others wait, and join as running ones finish. The system
prompt's blocks are computed once and shared through the prefix cache. 12 blocks of 16 tokens cannot hold four
growing answers, so the scheduler preempts the newest sequence and recomputes it later (from the prefix cache
as far as it can). A 64-token step budget splits the first prompts' prefill over two steps."""
import sys

import timeline
from minillm import LLM, SamplingParams

SYSTEM = ("You are a patient teacher. Answer in one or two short sentences, in plain words, for a curious "
          "twelve-year-old. If you are not sure of something, say so instead of guessing.")
QUESTIONS = ["Why is the sky blue?", "What is the capital of France?", "How do bees make honey?",
             "Why does the moon change shape?", "What is a prime number?", "Why do we have seasons?",
             "How does a rainbow form?", "What makes thunder?"]

llm = LLM(trace=True, max_num_seqs=4, num_gpu_blocks_override=12, max_num_batched_tokens=64)
conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
for q, o in zip(QUESTIONS, outputs):
    print(f"--- {q}\n{o.outputs[0].text}\n")
trace, path = llm.last_trace, sys.argv[1] if len(sys.argv) > 1 else "trace.html"
timeline.write_trace(trace, path)
count = lambda key: sum(len(s[key]) for s in trace["steps"])
print(f"wrote {path}: {len(trace['steps'])} steps, {count('preempted')} preemptions, "
      f"{count('prefix_hits')} prefix cache hits, {count('evicted')} blocks evicted")
