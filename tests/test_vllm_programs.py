"""vLLM programs run with only the import changed (issue 15). The first half are whole scripts written the way
vLLM's offline examples are (basic generation, per-prompt parameters, chat with tools, prefix caching, a command
line built from the engine arguments, the LLMEngine loop, metrics, seeds, profiling), run as `python script.py
ARGS`; the model path is the one line filled in. The second half pins vLLM's offline rules one by one
(stop strings and tokens, min_tokens, temperature, seeds, n, max_logprobs, decoded tokens, EOS ids, metrics).
All on a tiny random checkpoint, except the first script, which runs on the default model."""
import argparse
import contextlib
import io
import json
import os
import random
import runpy
import sys
import textwrap

import pytest
import torch

import minillm
from minillm import LLM, EngineArgs, SamplingParams
from test_compat import LLAMA3_TEMPLATE
from test_engine import make_checkpoint

EOT, END_OF_TEXT = 128009, 128001  # Llama 3's <|eot_id|> (the tokenizer's EOS) and <|end_of_text|>
SMALL = dict(num_gpu_blocks_override=64)  # the 1 GiB CPU default takes a while to allocate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama with the Llama 3 tokenizer, a chat template that prints the tools and reads a template
    variable, and a generation_config.json with sampling defaults and two EOS ids (as Llama 3 Instruct has)."""
    folder = tmp_path_factory.mktemp("tiny")
    make_checkpoint(str(folder), eos_token_id=END_OF_TEXT)
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
              open(folder / "tokenizer_config.json", "w"))
    json.dump({"eos_token_id": [END_OF_TEXT, EOT], "temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_new_tokens": 12},
              open(folder / "generation_config.json", "w"))
    return str(folder)


@pytest.fixture(scope="module")
def tiny(folder):
    return LLM(folder, **SMALL)


def run_program(source: str, argv=(), **constants) -> tuple[dict, str]:
    """Run a script as `python script.py argv` would, in this process: (its globals, what it printed).
    `constants` are the lines a user fills in at its top (MODEL = "...")."""
    header = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    path = os.path.join(constants.get("WORKDIR", "/tmp"), "program.py")
    with open(path, "w") as f:
        f.write(header + textwrap.dedent(source))
    out, old_argv = io.StringIO(), sys.argv
    sys.argv = [path, *argv]
    try:
        with contextlib.redirect_stdout(out):
            scope = runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old_argv
    return scope, out.getvalue()


# ==== whole programs ==========================================================================

BASIC = '''
from minillm import LLM, SamplingParams   # was: from vllm import LLM, SamplingParams

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is", "The future of AI is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main():
    llm = LLM(model=MODEL)
    outputs = llm.generate(prompts, sampling_params)
    print("\\nGenerated Outputs:\\n" + "-" * 60)
    for output in outputs:
        print(f"Prompt:    {output.prompt!r}")
        print(f"Output:    {output.outputs[0].text!r}")
        print("-" * 60)
    answer = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    print("Greedy:", answer.outputs[0].text)


if __name__ == "__main__":
    main()
'''


def test_basic_generation_on_the_default_model(tmp_path):
    _, printed = run_program(BASIC, MODEL=minillm.default_model_path(), WORKDIR=str(tmp_path))
    assert printed.count("Prompt:    ") == 4 and printed.count("Output:    ") == 4
    assert "Prompt:    'The future of AI is'" in printed
    assert "Paris" in printed.split("Greedy:")[1]


PER_PROMPT = '''
from minillm import LLM, SamplingParams, TextPrompt, TokensPrompt

llm = LLM(MODEL, seed=0, num_gpu_blocks_override=64)
tokenizer = llm.get_tokenizer()
defaults = llm.get_default_sampling_params()   # from the checkpoint's generation_config.json
greedy = SamplingParams(temperature=0.0, max_tokens=8)
sampled = greedy.clone()
sampled.temperature, sampled.seed, sampled.n = 0.8, 7, 2
prompts = [TextPrompt(prompt="The capital of France is"),
           TokensPrompt(prompt_token_ids=tokenizer.encode("One, two, three,")),
           "A plain string prompt"]
outputs = llm.generate(prompts, [greedy, sampled, defaults])
again = llm.generate(prompts[0], greedy)
for output in outputs:
    print(output.request_id, [len(c.token_ids) for c in output.outputs], output.metrics.num_generation_tokens)
'''


def test_per_prompt_params_prompt_dicts_and_generation_config_defaults(folder, tmp_path):
    g, printed = run_program(PER_PROMPT, MODEL=folder, WORKDIR=str(tmp_path))
    d = g["defaults"]
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (0.6, 0.9, 0, 12)  # top_k 50 is transformers' default
    assert g["greedy"].temperature == 0.0 and g["greedy"].n == 1  # the clone is its own object
    out = g["outputs"]
    assert [o.request_id for o in out] == ["0", "1", "2"] and g["again"][0].request_id == "3"
    assert out[0].prompt == "The capital of France is" and out[1].prompt is None
    assert len(out[0].outputs[0].token_ids) == 8 and out[0].outputs[0].token_ids == g["again"][0].outputs[0].token_ids
    assert len(out[1].outputs) == 2 and out[1].outputs[0].token_ids != out[1].outputs[1].token_ids
    assert 1 <= len(out[2].outputs[0].token_ids) <= 12  # the defaults' max_new_tokens
    assert printed.splitlines()[0] == "0 [8] 8"


CHAT = '''
from minillm import LLM, SamplingParams

llm = LLM(model=MODEL, num_gpu_blocks_override=64)
sampling_params = SamplingParams(temperature=0.5, max_tokens=8, seed=0)
conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": [{"type": "text", "text": "Write an essay about"}, {"type": "text", "text": "higher education."}]},
]
outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
batch = llm.chat([conversation, conversation, conversation], sampling_params, use_tqdm=False)

tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
tool_outputs = llm.chat([{"role": "user", "content": "What is the weather in Paris?"}], sampling_params,
                        tools=tools, chat_template_kwargs={"enable_thinking": True})
prefilled = llm.chat(conversation + [{"role": "assistant", "content": "Higher education is"}], sampling_params,
                     add_generation_prompt=False, continue_final_message=True)
'''


def test_chat_with_content_parts_tools_template_kwargs_and_continued_message(folder, tmp_path):
    g, _ = run_program(CHAT, MODEL=folder, WORKDIR=str(tmp_path))
    tok = g["llm"].get_tokenizer()
    prompt = g["outputs"][0].prompt
    assert "Write an essay about\nhigher education.<|eot_id|>" in prompt  # parts joined for a template that prints content
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert g["outputs"][0].prompt_token_ids == tok.encode(prompt, add_special_tokens=False)  # the template wrote BOS
    assert [o.prompt for o in g["batch"]] == [prompt] * 3
    assert [o.outputs[0].token_ids for o in g["batch"]] == [g["outputs"][0].outputs[0].token_ids] * 3  # seeded
    tool_prompt = g["tool_outputs"][0].prompt
    assert '"name": "get_weather"' in tool_prompt and tool_prompt.endswith("<think>")
    assert g["prefilled"][0].prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHigher education is")
    with pytest.raises(ValueError, match="chat_template_content_format"):
        g["llm"].chat(g["conversation"], chat_template_content_format="xml")


PREFIX_CACHING = '''
from minillm import LLM, SamplingParams

prefix = ("You are an expert school principal, skilled in effectively managing faculty and staff. Draft 10-15 "
          "questions for a potential first grade Head Teacher for my K-12, all-girls', independent school. ")
prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is"]
generating_prompts = [prefix + prompt for prompt in prompts]
sampling_params = SamplingParams(temperature=0.0, max_tokens=8)

regular_llm = LLM(model=MODEL, enable_prefix_caching=False, num_gpu_blocks_override=64)
regular_outputs = regular_llm.generate(generating_prompts, sampling_params)

prefix_cached_llm = LLM(model=MODEL, enable_prefix_caching=True, num_gpu_blocks_override=64)
prefix_cached_llm.generate(generating_prompts[0], sampling_params)  # warm up: the prefix is cached
cached_outputs = prefix_cached_llm.generate(generating_prompts, sampling_params)
generated_same = all(r.outputs[0].text == c.outputs[0].text for r, c in zip(regular_outputs, cached_outputs))
print(f"Generated answers are the same: {generated_same}")
reset = prefix_cached_llm.reset_prefix_cache()
after_reset = prefix_cached_llm.generate(generating_prompts[0], sampling_params)
'''


def test_prefix_caching_and_reset_prefix_cache(folder, tmp_path):
    g, printed = run_program(PREFIX_CACHING, MODEL=folder, WORKDIR=str(tmp_path))
    assert "Generated answers are the same: True" in printed
    assert all(o.num_cached_tokens >= 16 for o in g["cached_outputs"])
    assert all(o.num_cached_tokens == 0 for o in g["regular_outputs"])
    assert g["reset"] is True and g["after_reset"][0].num_cached_tokens == 0


CLI = '''
from minillm import LLM, EngineArgs                   # was: from vllm import LLM, EngineArgs
from minillm import FlexibleArgumentParser            # was: from vllm.utils.argparse_utils import ...


def create_parser():
    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model=MODEL)
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    sampling_group.add_argument("--temperature", type=float)
    sampling_group.add_argument("--top-p", type=float)
    return parser


def main(args: dict):
    max_tokens, temperature, top_p = args.pop("max_tokens"), args.pop("temperature"), args.pop("top_p")
    llm = LLM(**args)
    sampling_params = llm.get_default_sampling_params()
    if max_tokens is not None:
        sampling_params.max_tokens = max_tokens
    if temperature is not None:
        sampling_params.temperature = temperature
    if top_p is not None:
        sampling_params.top_p = top_p
    prompts = ["Hello, my name is", "The capital of France is"]
    for output in llm.generate(prompts, sampling_params):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}, tokens: {len(output.outputs[0].token_ids)}")
    return llm


if __name__ == "__main__":
    parser = create_parser()
    args: dict = vars(parser.parse_args())
    llm = main(dict(args))
'''

CLI_ARGV = ["--max_model_len=256", "-tp", "1", "--max-num-seqs", "4", "--num-gpu-blocks-override", "64", "--seed", "3",
            "--generation-config", "vllm", "--hf-overrides", '{"rms_norm_eps": 1e-06}', "--disable-log-stats",
            "--trust-remote-code", "--enforce-eager", "--block_size", "8", "--max-tokens", "5", "--temperature", "0"]


def test_engine_argument_command_line_round_trip(folder, tmp_path):
    g, printed = run_program(CLI, CLI_ARGV, MODEL=folder, WORKDIR=str(tmp_path))
    assert printed.count("tokens: 5") == 2
    args = dict(g["args"])
    for key in ("max_tokens", "temperature", "top_p"):
        args.pop(key)
    # LLM(**vars(args)) and LLMEngine.from_engine_args(EngineArgs.from_cli_args(args)) build the same engine
    by_llm = g["llm"].llm_engine
    by_engine = minillm.LLMEngine.from_engine_args(EngineArgs.from_cli_args(argparse.Namespace(**args)))
    for engine in (by_llm, by_engine):
        assert (engine.max_model_len, engine.scheduler.max_num_seqs, engine.runner.num_blocks) == (256, 4, 64)
        assert (engine.block_manager.block_size, engine.cfg.rms_norm_eps, engine.default_params) == (8, 1e-06, {})
        assert engine.runner.graphs == {}
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported"):  # (-tp 2 is: test_parallel.py)
        run_program(CLI, ["-pp", "2"], MODEL=folder, WORKDIR=str(tmp_path))


ENGINE_LOOP = '''
import argparse

from minillm import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from minillm import FlexibleArgumentParser


def create_test_prompts() -> list[tuple[str, SamplingParams]]:
    return [("A robot may not injure a human being", SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1)),
            ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2, seed=1)),
            ("What is the meaning of life?", SamplingParams(n=2, temperature=0.8, top_p=0.95, frequency_penalty=0.1, seed=2))]


def process_requests(engine: LLMEngine, test_prompts: list[tuple[str, SamplingParams]]):
    request_id = 0
    finished = {}
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params)
            request_id += 1
        request_outputs: list[RequestOutput] = engine.step()
        for request_output in request_outputs:
            if request_output.finished:
                print(request_output.request_id, request_output.outputs[0].finish_reason)
                finished[request_output.request_id] = request_output
    return finished


def initialize_engine(args: argparse.Namespace) -> LLMEngine:
    engine_args = EngineArgs.from_cli_args(args)
    return LLMEngine.from_engine_args(engine_args)


def main(args: argparse.Namespace):
    engine = initialize_engine(args)
    return process_requests(engine, create_test_prompts())


if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="Demo on using the LLMEngine class directly")
    parser = EngineArgs.add_cli_args(parser)
    parser.set_defaults(model=MODEL)
    finished = main(parser.parse_args())
'''


def test_llm_engine_loop_program_equals_llm_generate(folder, tmp_path, tiny):
    g, printed = run_program(ENGINE_LOOP, ["--num-gpu-blocks-override", "64"], MODEL=folder, WORKDIR=str(tmp_path))
    finished = g["finished"]
    assert sorted(finished) == ["0", "1", "2"] and len(printed.splitlines()) == 3
    # the same requests through LLM.generate: token for token the same (greedy and seeded)
    prompts, params = zip(*g["create_test_prompts"]())
    for rid, out in enumerate(tiny.generate(list(prompts), list(params), use_tqdm=False)):
        step_by_step = finished[str(rid)]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in step_by_step.outputs]
        assert [c.text for c in out.outputs] == [c.text for c in step_by_step.outputs]
    assert finished["0"].outputs[0].logprobs is not None and finished["0"].prompt_logprobs[0] is None


METRICS = '''
from minillm import LLM, SamplingParams
from minillm import Counter, Gauge, Histogram, Vector   # was: from vllm.v1.metrics.reader import ...

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is", "The future of AI is",
           "Once upon a time, in a land far away,"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, ignore_eos=True, seed=0)

llm = LLM(model=MODEL, disable_log_stats=False, block_size=4, num_gpu_blocks_override=10)
outputs = llm.generate(prompts, sampling_params)
for metric in llm.get_metrics():
    if isinstance(metric, Gauge):
        print(f"{metric.name} (gauge) = {metric.value}")
    elif isinstance(metric, Counter):
        print(f"{metric.name} (counter) = {metric.value}")
    elif isinstance(metric, Vector):
        print(f"{metric.name} (vector) = {metric.values}")
    elif isinstance(metric, Histogram):
        print(f"{metric.name} (histogram) sum = {metric.sum} count = {metric.count}")
'''


def test_metrics_count_what_ran(folder, tmp_path):
    g, printed = run_program(METRICS, MODEL=folder, WORKDIR=str(tmp_path))
    llm, outputs = g["llm"], g["outputs"]
    metrics = {m.name: m for m in llm.get_metrics()}
    kinds = {name: type(m).__name__ for name, m in metrics.items()}
    assert kinds == {"vllm:prompt_tokens": "Counter", "vllm:generation_tokens": "Counter", "vllm:num_preemptions": "Counter",
                     "vllm:num_requests_running": "Gauge", "vllm:num_requests_waiting": "Gauge",
                     "vllm:time_to_first_token_seconds": "Histogram", "vllm:e2e_request_latency_seconds": "Histogram"}
    assert metrics["vllm:prompt_tokens"].value == sum(len(o.prompt_token_ids) for o in outputs)
    assert metrics["vllm:generation_tokens"].value == 5 * 12
    preemptions = llm.llm_engine.scheduler.num_preemptions
    assert preemptions > 0 and metrics["vllm:num_preemptions"].value == preemptions  # 10 blocks of 4 are too few
    assert metrics["vllm:num_requests_running"].value == metrics["vllm:num_requests_waiting"].value == 0
    ttft, e2e = metrics["vllm:time_to_first_token_seconds"], metrics["vllm:e2e_request_latency_seconds"]
    assert ttft.count == e2e.count == 5 and ttft.buckets["+Inf"] == 5 and list(ttft.buckets)[:2] == ["0.001", "0.005"]
    assert list(ttft.buckets.values()) == sorted(ttft.buckets.values())  # cumulative
    assert ttft.sum == pytest.approx(sum(o.metrics.first_token_latency for o in outputs)) and e2e.sum >= ttft.sum
    assert ttft.labels == {"model_name": g["MODEL"], "engine": "0"}
    for o in outputs:  # each request's timestamps, in order
        m = o.metrics
        assert m.num_generation_tokens == 12 and m.arrival_time > 0
        assert 0 < m.queued_ts <= m.scheduled_ts <= m.first_token_ts <= m.last_token_ts and m.first_token_latency > 0
    assert "vllm:generation_tokens (counter) = 60" in printed
    llm.generate(g["prompts"][:1], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)  # counters go on
    assert {m.name: m for m in llm.get_metrics()}["vllm:generation_tokens"].value == 63


REPRODUCIBILITY = '''
import random

import numpy as np
import torch

from minillm import LLM, SamplingParams

llm = LLM(model=MODEL, seed=SEED, num_gpu_blocks_override=64)
print(random.randint(0, 10**6), np.random.randint(0, 10**6), torch.randint(0, 10**6, (1,)).item())
prompts = ["Hello, my name is", "The capital of France is"]
outputs = llm.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8), use_tqdm=False)
for output in outputs:
    print(output.outputs[0].token_ids)
'''


def test_seed_makes_runs_reproducible_and_seeds_the_global_generators(folder, tmp_path):
    import numpy as np
    first = run_program(REPRODUCIBILITY, MODEL=folder, SEED=42, WORKDIR=str(tmp_path))[1]
    random.seed(0)
    second = run_program(REPRODUCIBILITY, MODEL=folder, SEED=42, WORKDIR=str(tmp_path))[1]
    assert first == second
    random.seed(42), np.random.seed(42), torch.manual_seed(42)
    assert first.splitlines()[0] == f"{random.randint(0, 10**6)} {np.random.randint(0, 10**6)} {torch.randint(0, 10**6, (1,)).item()}"
    other = run_program(REPRODUCIBILITY, MODEL=folder, SEED=7, WORKDIR=str(tmp_path))[1]
    assert other.splitlines()[1:] != first.splitlines()[1:]  # unseeded requests follow the engine's seed
    state = random.getstate()
    LLM(folder, seed=None, **SMALL)
    assert random.getstate() == state  # seed=None seeds nothing


PROFILING = '''
from minillm import LLM, SamplingParams

llm = LLM(model=MODEL, num_gpu_blocks_override=64,
          profiler_config={"profiler": "torch", "torch_profiler_dir": PROFILE_DIR})
llm.start_profile()
outputs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=2), use_tqdm=False)
llm.stop_profile()
'''


def test_start_and_stop_profile_write_a_torch_profiler_trace(folder, tmp_path, tiny, monkeypatch):
    run_program(PROFILING, MODEL=folder, PROFILE_DIR=str(tmp_path / "traces"), WORKDIR=str(tmp_path))
    assert [f for f in os.listdir(tmp_path / "traces") if f.endswith(".pt.trace.json.gz")]
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    with pytest.raises(RuntimeError, match="Profiler is not enabled"):
        tiny.start_profile()
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "old"))  # vLLM's older spelling
    tiny.start_profile()
    tiny.stop_profile()
    assert os.listdir(tmp_path / "old")
    with pytest.raises(ValueError, match="profiler='cuda' is not supported"):
        EngineArgs(profiler_config={"profiler": "cuda"})


# ==== engine arguments through LLM(...) =====================================================

def test_llm_takes_vllms_engine_arguments_and_refuses_what_it_cannot_honour(folder):
    llm = LLM(folder, tensor_parallel_size=1, generation_config="vllm", hf_overrides={"max_position_embeddings": 64},
              tokenizer_mode="auto", load_format="safetensors", config_format="hf", trust_remote_code=True,
              disable_log_stats=True, max_cpu_loras=4, compilation_config={"level": 3}, distributed_executor_backend="mp",
              quantization=None, cpu_offload_gb=0, logits_processors=[], kv_cache_memory_bytes=1 << 20)
    engine = llm.llm_engine
    assert engine.max_model_len == 64 and engine.cfg.max_position_embeddings == 64  # hf_overrides patched config.json
    assert engine.runner.num_blocks == (1 << 20) // minillm.kv_bytes_per_block(engine.cfg, 16, torch.float32)
    assert llm.get_default_sampling_params() == SamplingParams()  # generation_config="vllm": none of the checkpoint's
    with pytest.raises(ValueError, match=r"^quantization='awq' is not supported"):
        LLM(folder, quantization="awq")
    with pytest.raises(TypeError, match="max_num_seqz"):
        LLM(folder, max_num_seqz=4)


def test_every_public_name_is_importable_from_minillm():
    # vLLM's `from vllm.x.y import Name` becomes `from minillm import Name`
    from minillm import (LLM, CompletionOutput, Counter, EngineArgs, FlexibleArgumentParser, Gauge, Histogram,  # noqa: F401
                         LLMEngine, Logprob, LoRARequest, Metric, ProfilerConfig, RequestOutput, RequestOutputKind,
                         RequestStateStats, SamplingParams, TextPrompt, TokensPrompt, Vector)
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}


# ==== vLLM's offline rules, one by one =======================================================

def free_run(llm, prompt="The meaning of life is", n=30, **kw):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw), use_tqdm=False)[0].outputs[0]


def test_stop_string_that_completes_first_wins():
    seq = lambda stops, text: argparse.Namespace(params=SamplingParams(stop=stops), text=text, finish_reason=None,
                                                 stop_reason=None)
    for stops, text, old_len, want, cut in [(["a", "is"], " The user is a", 9, "is", " The user "),
                                            (["abc", "b"], "abc", 0, "b", "a"),
                                            (["xy", "zx"], "..zxy", 2, "zx", ".."),  # both end... zx first
                                            (["cd", "bcd"], "abcd", 0, "cd", "ab")]:  # a tie: list order
        s = seq(stops, text)
        assert minillm.find_stop_string(s, old_len) and (s.stop_reason, s.text) == (want, cut)


def test_stop_token_and_eos_text_is_left_out_unless_asked_for(tiny):
    tok = tiny.get_tokenizer()
    free = free_run(tiny)
    t = free.token_ids[6]
    j = free.token_ids.index(t)
    for include in (False, True):
        out = tiny.generate("The meaning of life is", SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[t],
                            skip_special_tokens=False, include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == free.token_ids[:j + 1] and out.stop_reason == t
        assert out.text == tok.decode(free.token_ids[:j + 1 if include else j])


def make_sequence(engine, token_ids, **params):
    engine.add_request("probe", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8, **params))
    seq = engine.requests["probe"][0]
    engine.abort_request("probe")
    seq.finish_reason = None
    for t in token_ids:
        seq.token_ids.append(t)
        if engine.process_token(seq, seq.num_tokens - 1):
            break
    return seq


def test_generation_configs_other_eos_ids_stop_with_their_id_as_stop_reason(tiny):
    engine = tiny.llm_engine
    assert engine.eos_token_id == EOT and {EOT, END_OF_TEXT} <= engine.eos_ids
    hello = tiny.get_tokenizer().encode("Hello", add_special_tokens=False)
    assert (lambda s: (s.finish_reason, s.stop_reason, s.text))(make_sequence(engine, hello + [EOT])) == ("stop", None, "Hello")
    assert (lambda s: (s.stop_reason, s.text))(make_sequence(engine, hello + [END_OF_TEXT])) == (END_OF_TEXT, "Hello")
    kept = make_sequence(engine, hello + [END_OF_TEXT], include_stop_str_in_output=True, skip_special_tokens=False)
    assert kept.text == "Hello<|end_of_text|>"
    ignored = make_sequence(engine, [END_OF_TEXT, EOT], ignore_eos=True)
    assert ignored.finish_reason is None
    early = make_sequence(engine, [EOT, END_OF_TEXT], min_tokens=2)  # before min_tokens an EOS is plain text
    assert early.finish_reason == "stop" and early.stop_reason == END_OF_TEXT and early.num_output_tokens == 2


def test_stop_strings_are_looked_for_only_past_min_tokens(tiny):
    tok = tiny.get_tokenizer()
    free = free_run(tiny, skip_special_tokens=False)
    # an output token m whose text is a stop string found first right there
    for m in range(3, 20):
        piece = tok.decode([free.token_ids[m - 1]])
        before = tok.decode(free.token_ids[:m - 1])
        if piece.strip() and "\ufffd" not in piece and piece not in before + piece[:-1]:
            break
    else:
        pytest.fail("no output token of the free run makes a usable stop string")
    sp = lambda k: SamplingParams(temperature=0, max_tokens=30, stop=[piece], min_tokens=k, ignore_eos=True,
                                  skip_special_tokens=False)
    at = tiny.generate("The meaning of life is", sp(m - 1), use_tqdm=False)[0].outputs[0]
    assert len(at.token_ids) == m and at.stop_reason == piece  # output m tokens long > min_tokens: checked
    past = tiny.generate("The meaning of life is", sp(m), use_tqdm=False)[0].outputs[0]
    assert len(past.token_ids) > m  # m tokens == min_tokens: not checked yet


def test_sampling_params_normalize_as_vllms():
    assert SamplingParams(seed=-1).seed is None
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True).prompt_logprobs) == (1, 1)
    with pytest.warns(UserWarning, match="raised to 0.01"):
        assert SamplingParams(temperature=1e-6).temperature == 0.01
    g = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)  # greedy ignores them
    with pytest.raises(ValueError, match=r"^n must be 1 when using greedy sampling, got 2\.$"):
        SamplingParams(n=2, temperature=0)
    with pytest.raises(ValueError, match="stop must be empty with detokenize=False"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=3)  # (DELTA streams: test_delta_output_kind_streams_only_what_is_new)
    SamplingParams(spaces_between_special_tokens=False, extra_args={"mine": 1})  # accepted


def test_a_temperature_below_sampling_eps_is_greedy(tiny):
    sp = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    sp.temperature = 5e-6  # set after construction: greedy, as vLLM's sampler decides at run time
    assert tiny.generate("Once upon a time", sp, use_tqdm=False)[0].outputs[0].token_ids == \
        free_run(tiny, "Once upon a time", 10).token_ids
    sp.n = 2
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        tiny.generate("Once upon a time", sp, use_tqdm=False)


def test_detokenize_false_gives_ids_without_text(tiny):
    free = free_run(tiny, n=6, logprobs=1)
    out = free_run(tiny, n=6, logprobs=1, detokenize=False)
    assert out.token_ids == free.token_ids and out.text == "" and free.text
    assert all(lp.decoded_token is None for entry in out.logprobs for lp in entry.values())


def test_request_ids_count_prompts_not_completions(tiny):
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=2)
    first = tiny.generate(["a", "b"], sp, use_tqdm=False)
    second = tiny.generate(["c"], sp, use_tqdm=False)
    ids = [int(o.request_id) for o in first + second]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2] and all(len(o.outputs) == 2 for o in first)


def test_max_logprobs_caps_what_a_request_may_ask(folder):
    llm = LLM(folder, max_logprobs=5, **SMALL)
    assert llm.generate("hi", SamplingParams(max_tokens=2, logprobs=5, prompt_logprobs=5), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params: requested logprobs=6, more than max_logprobs=5"):
        llm.generate("hi", SamplingParams(max_tokens=2, logprobs=6), use_tqdm=False)
    with pytest.raises(ValueError, match="requested prompt_logprobs=-1"):  # -1 is the whole vocabulary
        llm.generate("hi", SamplingParams(max_tokens=2, prompt_logprobs=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="requested logprobs=21"):  # vLLM's default cap is 20
        minillm.LLMEngine.check_params(argparse.Namespace(max_logprobs=20, cfg=llm.llm_engine.cfg, tokenizer=llm.get_tokenizer()),
                                       SamplingParams(logprobs=21), "sampling_params")
    uncapped = argparse.Namespace(max_logprobs=-1, cfg=llm.llm_engine.cfg, tokenizer=llm.get_tokenizer(), logits_hook=None)
    assert minillm.LLMEngine.check_params(uncapped, SamplingParams(logprobs=-1), "sp").logprobs == -1


def test_decoded_token_of_a_split_character_is_completed_with_the_tokens_before_it(tiny):
    tok = tiny.get_tokenizer()
    text = "Gothic: 𝔊𝔬𝔱𝔥𝔦𝔠 and 😀!"
    ids = [tok.bos_id] + tok.encode(text, add_special_tokens=False)
    split = [t for t in ids if tok.decode([t]).endswith("\ufffd")]
    assert split  # some characters are split over tokens
    out = tiny.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    decoded = [entry[t].decoded_token for t, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    assert "".join(decoded) == tok.decode(ids[1:]) == text
    assert minillm.decoded_token(tok, split[0], []) == ""  # nothing before it to complete it with


def test_output_kind_final_only_streams_nothing_from_llm_engine(tiny):
    engine = tiny.llm_engine
    engine.add_request("s", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("f", "Hello", SamplingParams(max_tokens=4, ignore_eos=True, output_kind=minillm.RequestOutputKind.FINAL_ONLY))
    seen = []
    while engine.has_unfinished_requests():
        seen += [(o.request_id, o.finished) for o in engine.step()]
    assert [x for x in seen if x[0] == "f"] == [("f", True)] and len([x for x in seen if x[0] == "s"]) == 4



# ==== round three (issue 24): the last behaviours and arguments that stopped real scripts =====================

STREAMING = """
from minillm import EngineArgs, LLMEngine, SamplingParams   # was: from vllm import ...
from minillm import RequestOutputKind                       # was: from vllm.sampling_params import RequestOutputKind

engine = LLMEngine.from_engine_args(EngineArgs(model=MODEL, num_gpu_blocks_override=64))
params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=0,
                        output_kind=RequestOutputKind.DELTA)
engine.add_request("0", "The capital of France is", params)
streamed, token_ids, logprobs, prompt_logprobs = "", [], [], []
while engine.has_unfinished_requests():
    for output in engine.step():
        delta = output.outputs[0]
        print(delta.text, end="", flush=True)
        streamed += delta.text
        token_ids += delta.token_ids
        logprobs += delta.logprobs
        prompt_logprobs.append(output.prompt_logprobs)
"""


def test_delta_output_kind_streams_only_what_is_new(folder, tmp_path, tiny):
    # vLLM's streaming contract (vllm/sampling_params.py RequestOutputKind.DELTA, "Return only deltas in each
    # RequestOutput"; vllm/v1/engine/output_processor.py RequestState.make_request_output): each output of a DELTA
    # request carries only the text, token ids and logprobs new since its last one; joined they are the whole.
    g, printed = run_program(STREAMING, MODEL=folder, WORKDIR=str(tmp_path))
    whole = tiny.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert g["token_ids"] == whole.token_ids and g["streamed"] == whole.text == printed
    assert len(g["logprobs"]) == 12
    assert g["prompt_logprobs"][0] is not None and all(p is None for p in g["prompt_logprobs"][1:])  # sent once


def test_a_length_stop_inside_a_character_withholds_it(tiny):
    # vLLM's incremental detokenizer (vllm/v1/engine/detokenizer.py; tokenizers' DecodeStream) holds back the bytes
    # of an incomplete character, and a request that stops there keeps them out of its text: no trailing U+FFFD.
    tok = tiny.get_tokenizer()
    first = tok.encode("😀", add_special_tokens=False)[0]  # (its first byte-level token: not a whole character)
    assert tok.decode([first]).endswith("\ufffd")
    out = tiny.generate("Smile:", SamplingParams(max_tokens=1, allowed_token_ids=[first]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [first] and out.text == "" and out.finish_reason == "length"


def test_bad_words_default_and_ban_token_sequences(tiny):
    # vLLM: SamplingParams().bad_words is [] (vllm/sampling_params.py), and a bad word is its token ids, with and
    # without a leading space (SamplingParams.update_from_tokenizer),
    # whose last token is banned after the others (vllm/v1/sample/ops/bad_words.py; tests/v1/sample/test_sampler.py
    # test_sampler_bad_words) -- checked on the output's token ids, not on its text.
    assert SamplingParams().bad_words == []
    tok = tiny.get_tokenizer()
    free = free_run(tiny, n=20)
    encode = lambda text: tok.encode(text, add_special_tokens=False)
    forms = lambda t: (encode(tok.decode([t]).strip()), encode(" " + tok.decode([t]).strip()))
    # a word that is one token bare and one with a space (both banned); one whose spaced form tokenizes
    # to a different length is banned bare only, as vLLM's SamplingParams._bad_words_token_ids decides
    k = next(i for i, t in enumerate(free.token_ids) if i > 0 and [len(f) for f in forms(t)] == [1, 1])
    word = tok.decode([free.token_ids[k]])
    banned = free_run(tiny, n=20, bad_words=[word])
    for ids in forms(free.token_ids[k]):
        assert not any(banned.token_ids[i:i + len(ids)] == ids for i in range(len(banned.token_ids)))
    assert banned.token_ids[:k] == free.token_ids[:k] != free.token_ids
    # a two-token sequence: its first token alone stays allowed; only the pair is never completed
    a, b = free.token_ids[k], free.token_ids[k + 1]
    pair = tok.decode([a, b])
    if tok.encode(pair.lstrip(), add_special_tokens=False) == [a, b] or tok.encode(" " + pair.lstrip(), add_special_tokens=False) == [a, b]:
        out = free_run(tiny, n=20, bad_words=[pair])
        assert out.token_ids[:k + 1] == free.token_ids[:k + 1] and out.token_ids[k + 1] != b


def test_request_output_ignores_keyword_arguments_it_does_not_know():
    # vLLM's RequestOutput.__init__(..., **kwargs) logs and ignores unknown arguments (vllm/outputs.py), so code
    # written for a newer vLLM (kv_transfer_params=..., a field added later) still builds one.
    from minillm import CompletionOutput, RequestOutput
    out = RequestOutput("0", "Hi", [1, 2], [CompletionOutput(0, "!", [3])], True, kv_transfer_params=None, encoder_prompt=None)
    assert out.finished and out.outputs[0].text == "!" and not hasattr(out, "kv_transfer_params")


def test_zero_priorities_run_under_fcfs(tiny):
    # vLLM (vllm/v1/engine/processor.py, _validate_params / LLM._validate_and_add_requests): priority=None or all
    # zeros is fine under scheduling_policy="fcfs"; a non-zero one needs "priority"; its length must match.
    prompts = ["Hello", "The sky is"]
    sp = SamplingParams(temperature=0, max_tokens=3)
    plain = [o.outputs[0].token_ids for o in tiny.generate(prompts, sp, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in tiny.generate(prompts, sp, priority=[0, 0], use_tqdm=False)] == plain
    assert [o.outputs[0].token_ids for o in tiny.generate(prompts, sp, priority=None, use_tqdm=False)] == plain
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        tiny.generate(prompts, sp, priority=[0, 1], use_tqdm=False)
    for wrong in ([], [0], [0, 0, 0]):
        with pytest.raises(ValueError, match="must be the same"):
            tiny.generate(prompts, sp, priority=wrong, use_tqdm=False)


def test_engine_arguments_of_vllm_programs(folder, recwarn):
    # vllm/engine/arg_utils.py: cpu_offload_gb (GiB of weights kept on the host), load_format="mistral",
    # distributed_executor_backend="external_launcher" (examples/offline_inference/torchrun_example.py)
    llm = LLM(folder, cpu_offload_gb=4, distributed_executor_backend="external_launcher", device="cpu", **SMALL)
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="consolidated.safetensors.*config.json"):
        LLM(folder, load_format="mistral")
    with pytest.raises(ValueError, match="external_launcher"):
        EngineArgs(folder, distributed_executor_backend="external_launcher", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="cpu_offload_gb"):
        EngineArgs(folder, cpu_offload_gb=-1)
    if torch.cuda.is_available():
        with pytest.warns(UserWarning, match="stay on the GPU"):
            EngineArgs(folder, cpu_offload_gb=4, device="cuda")


def test_hf_overrides_apply_to_a_gguf_models_config(tmp_path):
    # vLLM builds an HF config from a GGUF's metadata and applies hf_overrides to it (vllm/transformers_utils/
    # config.py, get_config), so config.json's names override what the metadata says.
    from test_gguf_families import make_family_checkpoint, write_gguf
    model = make_family_checkpoint(str(tmp_path / "hf"), "llama")
    write_gguf(tmp_path / "m.gguf", model, "llama")
    llm = LLM(str(tmp_path / "m.gguf"), hf_overrides={"max_position_embeddings": 64, "rope_theta": 5000.0}, **SMALL)
    cfg = llm.llm_engine.cfg
    assert cfg.max_position_embeddings == 64 and cfg.rope_theta == 5000.0 and llm.llm_engine.max_model_len == 64
    with pytest.raises(ValueError, match="name no field"):
        LLM(str(tmp_path / "m.gguf"), hf_overrides={"sliding_windoww": 4}, **SMALL)


def test_names_vllm_programs_import(tiny):
    # vllm/__init__.py (__version__), vllm/platforms (current_platform), vllm/distributed/parallel_state.py
    # (cleanup_dist_env_and_memory), vllm/config (VllmConfig), older vllm's guided_fields.GuidedDecodingRequest
    from minillm import (GuidedDecodingRequest, VllmConfig, __version__, cleanup_dist_env_and_memory,  # noqa: F401
                         current_platform)
    import tomllib
    assert __version__ == tomllib.load(open(os.path.join(os.path.dirname(minillm.__file__), "pyproject.toml"), "rb"))["project"]["version"]
    assert current_platform.is_cuda() == torch.cuda.is_available() != current_platform.is_cpu()
    assert current_platform.device_type in ("cuda", "cpu") and isinstance(current_platform.get_device_name(), str)
    cleanup_dist_env_and_memory()
    sp = SamplingParams(temperature=0, max_tokens=4, guided_decoding=GuidedDecodingRequest(guided_choice=["yes", "no"]))
    assert tiny.generate("Answer:", sp, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_reset_prefix_cache_can_reset_running_requests(tiny):
    # vLLM's LLMEngine.reset_prefix_cache(reset_running_requests=True) preempts the running requests and empties the
    # cache (examples/offline_inference/llm_engine_reset_kv.py; tests/v1/e2e/test_reset_prefix_cache_e2e.py): the
    # outputs are those of an uninterrupted run.
    engine, sp = tiny.llm_engine, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = tiny.generate("What does the fox say? " * 4, sp, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("r", "What does the fox say? " * 4, sp)
    outputs, steps = [], 0
    while engine.has_unfinished_requests():
        outputs += engine.step()
        steps += 1
        if steps == 3:
            assert engine.reset_prefix_cache() is False  # a running request holds blocks
            assert engine.reset_prefix_cache(reset_running_requests=True) is True
            assert not engine.block_manager.cached
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == expected


def test_max_model_len_past_the_context_and_a_cache_too_small(folder, monkeypatch):
    # vLLM: a max_model_len beyond the model's context is refused unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1
    # (vllm/config/model.py, _get_and_verify_max_len); a KV cache sized from memory that cannot hold one request of
    # max_model_len tokens is refused at start-up (vllm/v1/core/kv_cache_utils.py, check_enough_kv_cache_memory).
    with pytest.raises(ValueError, match=r"max_model_len \(1024\).*context \(512"):
        LLM(folder, max_model_len=1024, **SMALL)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.warns(UserWarning, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        assert LLM(folder, max_model_len=1024, **SMALL).llm_engine.max_model_len == 1024
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    per_block = minillm.kv_bytes_per_block(LLM(folder, **SMALL).llm_engine.cfg, 16, torch.float32)
    with pytest.raises(ValueError, match=r"holds 64 tokens.*max_model_len=512"):
        LLM(folder, kv_cache_memory_bytes=4 * per_block)
    with pytest.warns(UserWarning, match="num_gpu_blocks_override=4 holds 64 tokens"):
        LLM(folder, num_gpu_blocks_override=4)


def test_stop_token_ids_holding_strings_say_what_was_meant():
    # minillm is stricter than vLLM here (vLLM's stop_token_ids are not type-checked): the error says stop=[...]
    with pytest.raises(ValueError, match=r"stop=\['</s>'\]"):
        SamplingParams(stop_token_ids=["</s>"])
