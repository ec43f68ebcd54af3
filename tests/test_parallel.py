"""Tensor and data parallelism on the CPU (gloo). TP = 2 against TP = 1 token for token, logprobs within 1e-4, in
float32 on tiny random checkpoints: GQA with the KV heads split between the ranks, and fewer KV heads than ranks
with a vocabulary that does not split; under preemption, with a LoRA adapter, with sampling and penalties. Sizes that
cannot work are refused before any process starts; the workers end with the LLM (close, `with`, interpreter exit,
Ctrl-C), survive an exception between steps and a Ctrl-C inside one, and a worker that dies is an error, not a hang.
DP = 2 (torchrun on one host) writes the same JSONL as one process."""
import argparse
import json
import multiprocessing.connection
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace

import psutil
import pytest
import torch

import minillm
from cli import main as cli_main
from minillm import LLM, LoRARequest, SamplingParams, tp_plan
import formats
from parallel import TP, for_workers, overrides_as_dict, step_from_json, step_to_json
from test_engine import ROOT, make_checkpoint, random_prompts
from test_lora import make_adapter

# 24 blocks of 4 slots cannot hold the workload's sequences at once (preemption); a 16-token step budget chunks
# the long prompts
CACHE = dict(device="cpu", block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=16, enable_lora=True,
             max_loras=2, max_lora_rank=8)


def workers() -> list:
    """The processes this one has spawned (tensor-parallel workers, data-parallel ranks), not multiprocessing's
    resource tracker."""
    return [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


class Engines:
    """A GQA checkpoint (4 query heads, 2 KV heads: one per rank at TP = 2), an adapter on every projection, and an
    engine at TP = 1 and one at TP = 2 on it. A process holds one tensor-parallel LLM at a time (its process group is
    the default one): a test that makes its own calls release() first, and tp2() makes a new one when needed."""

    def __init__(self, root):
        self.folder = str(root / "base")
        base = make_checkpoint(self.folder, vocab_size=2048, tie_word_embeddings=False)
        make_adapter(base, str(root / "adapter"), seed=3, r=8, lora_alpha=16,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        self.adapter = LoRARequest("all", 1, str(root / "adapter"))
        self.tp1, self.shared = LLM(self.folder, **CACHE), None

    def tp2(self) -> LLM:
        if self.shared is None:
            self.shared = LLM(self.folder, tensor_parallel_size=2, **CACHE)
        return self.shared

    def release(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    engines = Engines(tmp_path_factory.mktemp("tp"))
    yield engines
    engines.release()


def workload(seed=1):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 23, 9, 31, 2], seed=seed)]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.3, logprobs=0),
              SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=9, ignore_eos=True)]
    return prompts, params


def assert_same(got, want):
    """The same tokens, and the same logprobs (of every reported token and prompt token) within 1e-4."""
    def close(a, b):
        for x, y in zip(a or [], b or [], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        close(g.prompt_logprobs, w.prompt_logprobs)
        for gc, wc in zip(g.outputs, w.outputs):
            close(gc.logprobs, wc.logprobs)


# ---- TP = 2 equals TP = 1 ---------------------------------------------------------------------


def test_tp2_equals_tp1_under_preemption(engines):
    tp2 = engines.tp2()
    before = tp2.llm_engine.scheduler.num_preemptions
    want, got = engines.tp1.generate(*workload(), use_tqdm=False), tp2.generate(*workload(), use_tqdm=False)
    assert tp2.llm_engine.scheduler.num_preemptions > before
    assert_same(got, want)
    assert len({tuple(o.outputs[0].token_ids) for o in got}) == len(got)


def test_tp2_equals_tp1_with_a_lora_adapter(engines):
    prompts, params = workload(seed=2)
    loras = [engines.adapter, None, engines.adapter, engines.adapter, None]  # adapter and base rows in one step
    want, got = (llm.generate(prompts, params, lora_request=loras, use_tqdm=False) for llm in (engines.tp1, engines.tp2()))
    want = list(want)
    assert_same(list(got), want)
    base = engines.tp2().generate(prompts[0], params[0], use_tqdm=False)[0].outputs[0].token_ids
    assert base != want[0].outputs[0].token_ids  # the adapter changes what the model says


def test_tp2_equals_tp1_with_logits_controls(engines):
    """The engine's masks (logit_bias, allowed_token_ids) act on rank 0's gathered logits only."""
    prompts = workload(seed=5)[0][:3]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, allowed_token_ids=list(range(100, 140))),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={7: 100.0}),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    want, got = engines.tp1.generate(prompts, params, use_tqdm=False), engines.tp2().generate(prompts, params, use_tqdm=False)
    assert_same(got, want)
    assert all(100 <= t < 140 for t in got[0].outputs[0].token_ids) and set(got[1].outputs[0].token_ids) == {7}


def test_tp2_prompt_logits_equal_tp1(engines):
    ids = random_prompts([37], seed=4)[0]
    for lora_request in (None, engines.adapter):
        want, got = engines.tp1.prompt_logits(ids, lora_request), engines.tp2().prompt_logits(ids, lora_request)
        assert got.shape == want.shape == (37, 2048)
        assert (got - want).abs().max().item() < 1e-4


# ---- what crosses the pipes: JSON, never a pickle ---------------------------------------------------------


def test_a_step_input_crosses_the_pipe_as_json_and_comes_back_equal(engines):
    step = minillm.StepInput(
        input_ids=[5, 9, 11, 3], positions=[0, 1, 2, 7], query_lens=[3, 1], table_rows=[4, 0],
        table_updates=[4, 0, 17, 0, 1, 2], lora=[(engines.adapter, 3), (None, 1)], pending=[(3, 1)],
        sample_rows=[2, 3], params=[SamplingParams(), SamplingParams(seed=1)], generators=[None, torch.Generator()],
        blocked=[[7], []], penalty_ids=[([5, 9], [11]), ([3], [])], logprob_rows=[1], prompt_rows=[0, 1],
        prompt_targets=[9, 11], num_logprobs=3)
    assert all(getattr(step, f.name) for f in fields(step))  # every field filled (a new one must be here too)
    with pytest.raises(ValueError, match="stay on rank 0"):  # objects, the sampler's: for_workers empties them
        step_to_json(step)
    def across(sent):
        return step_from_json(json.loads(json.dumps(step_to_json(sent))))  # (JSON makes tuples lists)
    back = across(replace(step, params=[], generators=[]))
    assert back == replace(step, params=[], generators=[])
    assert back.pending == [(3, 1)] and back.penalty_ids[0] == ([5, 9], [11])  # tuples again, as == checked
    assert back.lora == [(engines.adapter, 3), (None, 1)] and isinstance(back.lora[0][0], LoRARequest)
    assert across(for_workers(step)) == for_workers(step)  # what the workers get


def test_nothing_crosses_the_pipes_as_a_pickle(engines, monkeypatch):
    """A tensor-parallel LLM's start, its steps with a LoRA adapter, and its close, with pickling refused in this
    process: the pipes' pickling send and recv, and pickle.dumps / loads. Spawn still pickles tp_worker's name
    and its arguments, with a Pickler of its own: they are numbers and the pipe's end (a file descriptor)."""
    prompts, params = workload(seed=2)
    loras = [engines.adapter, None, engines.adapter, engines.adapter, None]
    want = engines.tp1.generate(prompts, params, lora_request=loras, use_tqdm=False)
    engines.release()

    def refused(*args, **kwargs):
        raise AssertionError("a pickle on the tensor-parallel pipes")
    started, start = [], multiprocessing.context.SpawnProcess.start
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", lambda p: (started.append(p._args), start(p)))
    pipe = multiprocessing.connection.Connection
    for owner, name in ((pipe, "send"), (pipe, "recv"), (pickle, "dumps"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refused)
    with LLM(engines.folder, tensor_parallel_size=2, **CACHE) as llm:
        assert_same(llm.generate(prompts, params, lora_request=loras, use_tqdm=False), want)
    assert workers() == []
    (args,) = started  # (rank, size, port, pipe)
    assert [type(a) for a in args] == [int, int, int, multiprocessing.connection.Connection]


def test_a_function_hf_overrides_reaches_the_workers_as_json(engines, tmp_path):
    """vLLM's hf_overrides may be a function of the config; the workers get the dict of what it changes."""
    def overrides(config):  # (a local function: it could not be pickled either)
        config.rope_parameters["rope_theta"] = 100.0  # (in place, inside a dict of config.json)
        return config
    changed = overrides_as_dict(engines.folder, overrides)
    assert changed == {"rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}}
    assert overrides_as_dict(engines.folder, {"rope_theta": 5.0}) == {"rope_theta": 5.0}
    with pytest.raises(ValueError, match=r"removes \['use_cache'\]"):
        overrides_as_dict(engines.folder, lambda c: (delattr(c, "use_cache"), c)[1])
    from test_gguf_families import make_family_checkpoint, write_gguf  # a GGUF's config, from its metadata
    write_gguf(tmp_path / "m.gguf", make_family_checkpoint(str(tmp_path / "hf"), "llama"), "llama")
    gguf, short = str(tmp_path / "m.gguf"), lambda c: argparse.Namespace(**{**vars(c), "max_position_embeddings": 64})
    assert overrides_as_dict(gguf, short) == {"max_position_embeddings": 64}
    assert formats.read_gguf(gguf, {"max_position_embeddings": 64})[0] == formats.read_gguf(gguf, short)[0]

    ids = random_prompts([37], seed=4)[0]
    want = LLM(engines.folder, hf_overrides=overrides, **CACHE).prompt_logits(ids, None)
    assert (want - engines.tp1.prompt_logits(ids, None)).abs().max().item() > 1e-3  # it changes the model
    engines.release()
    with LLM(engines.folder, tensor_parallel_size=2, hf_overrides=overrides, **CACHE) as llm:
        assert (llm.prompt_logits(ids, None) - want).abs().max().item() < 1e-4


# ---- the workers' lifecycle ----------------------------------------------------------------------


class Boom(Exception):
    pass


class FailingBar:  # generate's progress bar, failing between two steps
    def __init__(self, **_): pass
    def update(self, n): raise Boom
    def set_postfix_str(self, s): pass
    def close(self): pass


def test_exceptions_inside_generate_leave_the_workers_in_step(engines, monkeypatch):
    tp2 = engines.tp2()
    want, pids = engines.tp1.generate(*workload(), use_tqdm=False), [p.pid for p in workers()]
    assert len(pids) == 1
    with pytest.raises(Boom):
        tp2.generate(*workload(), use_tqdm=FailingBar)
    assert_same(tp2.generate(*workload(), use_tqdm=False), want)

    # Ctrl-C in the middle of a step on rank 0, inside its sampler, between the forward pass and the tokens'
    # broadcast: the step runs to its end on every rank, then generate raises KeyboardInterrupt. (Sent inside the
    # step, where TPWorkers.run holds it back: sent before, Python would raise it at once, and if that moment fell
    # in a finalizer the garbage collector was running, the interrupt would be lost, "ignored in __del__".)
    runner, pick_tokens, calls = tp2.llm_engine.runner, tp2.llm_engine.runner.pick_tokens, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return pick_tokens(*args)
    monkeypatch.setattr(runner, "pick_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tp2.generate(*workload(), use_tqdm=False)
    assert len(calls) == 3
    monkeypatch.undo()
    assert_same(tp2.generate(*workload(), use_tqdm=False), want)
    assert [p.pid for p in workers()] == pids


def test_close_and_with_end_the_workers(engines):
    llm = engines.tp2()
    with pytest.raises(RuntimeError, match="one at a time"):  # one tensor-parallel LLM per process
        LLM(engines.folder, tensor_parallel_size=2, **CACHE)
    with llm:
        assert len(workers()) == 1
    assert workers() == []
    llm.close()  # (again: nothing to do)
    with pytest.raises(RuntimeError, match="the LLM was closed"):
        llm.generate(*workload(), use_tqdm=False)
    engines.release()


def test_an_error_inside_a_step_stops_the_workers(engines, monkeypatch):
    tp2 = engines.tp2()
    # rank 0 fails inside the step's sample, after the workers took the call: the ranks are out of step
    monkeypatch.setattr(tp2.llm_engine.runner, "pick_tokens", lambda *args: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):  # so the workers are stopped
        tp2.generate(*workload(), use_tqdm=False)
    assert workers() == []
    with pytest.raises(RuntimeError, match="tensor-parallel workers were stopped .*Boom.*create a new LLM"):
        tp2.generate(*workload(), use_tqdm=False)
    engines.release()


def test_a_worker_that_dies_is_an_error_not_a_hang(engines, monkeypatch):
    tp2 = engines.tp2()
    (worker,) = workers()
    runner, sample = tp2.llm_engine.runner, tp2.llm_engine.runner.sample

    def killing(*args):  # the worker dies in the middle of a step: rank 0's next collective finds it gone
        worker.kill()
        while worker.status() != psutil.STATUS_ZOMBIE:  # dead (and left for its parent to reap)
            time.sleep(0.01)
        return sample(*args)
    monkeypatch.setattr(runner, "sample", killing)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"tensor-parallel worker 1 \\(pid {worker.pid}\\) failed: .*code -9"):
        tp2.generate(*workload(), use_tqdm=False)
    assert time.monotonic() - start < 30 and workers() == []
    engines.release()


WITHOUT_CLOSE = """
import sys
import psutil
from minillm import LLM, SamplingParams
# at the top of the script, with no `if __name__ == "__main__":` guard, as the seed page's example is written
llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", num_gpu_blocks_override=16)
print(llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids)
print(*[p.pid for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())], flush=True)
raise KeyboardInterrupt  # no close(): the interpreter's exit must end the worker
"""


def test_workers_end_with_the_interpreter_after_a_keyboard_interrupt(engines, tmp_path):
    (tmp_path / "script.py").write_text(WITHOUT_CLOSE)
    run = subprocess.run([sys.executable, str(tmp_path / "script.py"), engines.folder], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == -signal.SIGINT, run.stderr  # (an uncaught KeyboardInterrupt: Python dies of the SIGINT)
    pids = [int(p) for p in run.stdout.splitlines()[-1].split()]
    assert len(pids) == 1
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


# ---- other shapes, the seed's example, bad sizes -----------------------------------------------------------


def test_fewer_kv_heads_than_ranks_and_a_vocabulary_that_does_not_split(engines, tmp_path):
    folder = str(tmp_path / "mqa")
    make_checkpoint(folder, vocab_size=1999, num_key_value_heads=1)
    cfg = minillm.load_hf_checkpoint(folder, "meta", torch.float32)[0]
    (local, rank0), (_, rank1) = tp_plan(cfg, TP(0, 2)), tp_plan(cfg, TP(1, 2))
    assert (local.num_heads, local.num_kv_heads) == (2, 1)
    assert rank0["k_proj"] == rank1["k_proj"]  # the one KV head, copied to both ranks
    assert rank1["lm_head"].start + rank1["lm_head"].size == 2000  # one padding row past the vocabulary
    weights = minillm.load_hf_checkpoint(folder, "cpu", torch.float32, plan=TP(1, 2).cut)[1]  # rank 1 reads its rows only
    assert weights["layers.0.self_attn.q_proj.weight"].shape == (2 * 16, 64)  # 2 of 4 heads of 16 dims
    assert weights["layers.0.mlp.down_proj.weight"].shape == (64, 80)          # half of F's input columns
    assert weights["embed_tokens.weight"].shape == (1000, 64) and not weights["embed_tokens.weight"][-1].any()
    prompts, params = workload(seed=3)
    want = LLM(folder, **CACHE).generate(prompts, params, use_tqdm=False)
    engines.release()
    with LLM(folder, tensor_parallel_size=2, **CACHE) as llm:
        assert_same(llm.generate(prompts, params, use_tqdm=False), want)


def test_the_seed_large_scale_example_with_tensor_parallel_size_2(engines, tmp_path):
    """The seed page's example as written, on a tiny random model with the Llama 3 tokenizer, and 24 prompts."""
    folder = str(tmp_path / "llama")
    make_checkpoint(folder)
    (tmp_path / "prompts.txt").write_text("".join(f"Question {i}: what comes after {i}?\n" for i in range(24)))
    engines.release()

    llm = LLM(model=folder, tensor_parallel_size=2, gpu_memory_utilization=0.9)
    with open(tmp_path / "prompts.txt") as f:
        prompts = [line.strip() for line in f]
    sampling_params = SamplingParams(temperature=0.7, max_tokens=16, stop=["\n\n"])
    outputs = llm.generate(prompts, sampling_params, use_tqdm=True)

    llm.close()
    want = LLM(model=folder).generate(prompts, sampling_params, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in want]


def test_bad_sizes_are_refused_before_any_process_starts(engines, tmp_path, monkeypatch):
    engines.release()
    for size in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an integer of at least 1"):
            LLM(engines.folder, tensor_parallel_size=size, **CACHE)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the model's num_heads \(4\)"):
        LLM(engines.folder, tensor_parallel_size=3, **CACHE)
    odd = str(tmp_path / "odd")
    make_checkpoint(odd, vocab_size=512, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) and tensor_parallel_size=2 must divide one another"):
        LLM(odd, tensor_parallel_size=2, **CACHE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs from cuda:0 on, but this machine has 1"):
        LLM(engines.folder, device="cuda", tensor_parallel_size=2)
    assert workers() == []


# ---- data parallelism ----------------------------------------------------------------------------


def test_data_parallel_writes_the_same_jsonl_as_one_process(engines, tmp_path, capfd):
    """--data-parallel-size 2: torchrun starts the command twice on this host, each an engine of TP = 2 (gloo)."""
    folder = str(tmp_path / "llama")
    make_checkpoint(folder)
    (tmp_path / "prompts.txt").write_text("".join(f"Tell me about the number {i}.\n" for i in range(7)))
    cli = ["--prompts", str(tmp_path / "prompts.txt"), "--model", folder, "--device", "cpu", "--max-tokens", "6"]
    engines.release()
    assert cli_main([*cli, "--output", str(tmp_path / "one.jsonl")]) == 0
    capfd.readouterr()
    assert cli_main([*cli, "--output", str(tmp_path / "two.jsonl"), "--data-parallel-size", "2",
                     "--tensor-parallel-size", "2"]) == 0
    assert "7/7" in capfd.readouterr().err  # rank 0's bar counts both ranks' prompts
    one = (tmp_path / "one.jsonl").read_text()
    assert len(one.splitlines()) == 7 and (tmp_path / "two.jsonl").read_text() == one
    assert cli_main([*cli, "--data-parallel-size", "0"]) == 1
    assert "--data-parallel-size must be at least 1" in capfd.readouterr().err
