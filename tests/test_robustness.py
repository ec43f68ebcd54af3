"""When things go wrong: an exception at any stage of a step (KeyboardInterrupt included) leaves the engine as a
fresh one, bad input is refused before anything is queued, and property-based tests of the BlockManager and
Scheduler hold their invariants over random workloads."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import minillm
from minillm import LLM, BlockManager, SamplingParams, Scheduler, Sequence
from test_engine import VARIANTS, make_checkpoint, random_prompts, run_cli

CACHE = dict(block_size=4, num_gpu_blocks_override=24)  # small: the workload below preempts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("robust"))
    make_checkpoint(folder, **VARIANTS["gqa_llama3_tied"])
    return folder


def workload():
    """Shared prefixes (the prefix cache hands out blocks), greedy and seeded sampling, n > 1, logprobs."""
    shared = random_prompts([9], seed=5)[0]
    prompts = [{"prompt_token_ids": shared + p} for p in random_prompts([3, 6, 1, 5], seed=6)] + ["Hello there"]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=4, n=2, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=4, stop=["x"])]
    return prompts, params


def summary(outputs):
    return [(o.request_id is not None, [(c.text, c.token_ids, c.finish_reason, None if c.cumulative_logprob is None
                                         else round(c.cumulative_logprob, 3)) for c in o.outputs]) for o in outputs]


def assert_clean(llm):
    e = llm.llm_engine
    assert not e.requests and not (e.scheduler.waiting or e.scheduler.running) and e.in_flight is None
    bm = e.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks) and len(bm.free_block_ids) == len(bm.blocks)
    assert not bm.uncommitted and all(bm.blocks[b].hash == h for h, b in bm.cached.items())


@pytest.fixture(scope="module")
def want(folder):
    return summary(LLM(folder, **CACHE).generate(*workload(), use_tqdm=False))


class Boom(Exception):
    pass


def fail_on_call(obj, name, k, error=Boom, after=False):
    """Make obj.name raise on its k-th call (before doing its work, or after it with after=True)."""
    original, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and not after:
            raise error("injected")
        out = original(*args, **kwargs)
        if calls[0] == k:
            raise error("injected")
        return out
    setattr(obj, name, wrapper)
    return lambda: vars(obj).pop(name, None)


STAGES = [  # (object to patch, method, raise after its work?)
    ("scheduler", "schedule", False),            # scheduling
    ("block_manager", "allocate", True),         # blocks taken and cached, before the forward
    ("runner", "run_model", False),              # before the forward: cached blocks whose K/V are never written
    ("runner", "run_model", True),               # after the forward, before sampling
    ("runner", "sample", False),                 # in the sampler
    ("engine", "land", False),                   # while the in-flight tokens land ...
    ("engine", "process_token", False),          # ... half of them landed
    ("engine", "collect_outputs", False),        # the step is done, its outputs are not
]


@pytest.mark.parametrize("where,name,after", STAGES)
@pytest.mark.parametrize("k,error", [(1, Boom), (2, KeyboardInterrupt), (5, Boom)])
def test_an_exception_anywhere_leaves_a_fresh_engine(folder, want, where, name, after, k, error):
    llm = LLM(folder, **CACHE)
    e = llm.llm_engine
    target = {"engine": e, "scheduler": e.scheduler, "block_manager": e.block_manager, "runner": e.runner}[where]
    undo = fail_on_call(target, name, k, error, after)
    with pytest.raises(error):
        llm.generate(*workload(), use_tqdm=False)
    undo()
    assert_clean(llm)
    assert summary(llm.generate(*workload(), use_tqdm=False)) == want  # as a fresh engine, stale cache entries or not
    assert_clean(llm)


def test_a_progress_bar_that_raises_aborts_only_that_call(folder, want):
    class Bar:
        def __init__(self, **kwargs):
            pass

        def update(self, n):
            raise KeyboardInterrupt

        set_postfix_str = close = lambda self, *a: None
    llm = LLM(folder, **CACHE)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(*workload(), use_tqdm=Bar)
    assert_clean(llm)
    assert summary(llm.generate(*workload(), use_tqdm=False)) == want


def test_a_failed_step_leaves_llm_engine_requests_queued_and_correct(folder):
    """LLMEngine users keep their requests after a failed step: they are recomputed from the tokens they know."""
    prompts, params = workload()
    ref = LLM(folder, **CACHE).llm_engine
    engine = LLM(folder, **CACHE).llm_engine
    for e in (ref, engine):
        for i, (p, sp) in enumerate(zip(prompts[:2], params[:2])):
            e.add_request(str(i), p, sp)
    engine.step(), engine.step()
    undo = fail_on_call(engine.runner, "run_model", 1)
    with pytest.raises(Boom):
        engine.step()
    undo()
    results = {}
    for e in (ref, engine):
        while e.has_unfinished_requests():
            results.setdefault(id(e), {}).update({o.request_id: o.outputs[0].token_ids for o in e.step() if o.finished})
    assert results[id(engine)]["0"] == results[id(ref)]["0"]  # greedy: the same tokens as an undisturbed run
    assert len(results[id(engine)]["1"]) == 6


def test_a_request_finished_by_a_failed_step_is_still_reported(folder):
    """The step lands a request's last token, then fails before its output is made: the next step reports it."""
    engine = LLM(folder, **CACHE).llm_engine
    engine.add_request("short", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", {"prompt_token_ids": [8, 9]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    original, failed = engine.collect_outputs, []

    def collect(progressed):
        if not failed and any(all(s.finish_reason for s in engine.requests[r]) for r in progressed):
            failed.append(True)
            raise Boom("injected")
        return original(progressed)
    engine.collect_outputs = collect
    finished = {}
    for _ in range(50):
        if not engine.has_unfinished_requests():
            break
        try:
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        except Boom:
            pass
    assert failed and sorted(finished) == ["long", "short"] and not engine.has_unfinished_requests()
    assert [len(finished[r].outputs[0].token_ids) for r in ("short", "long")] == [2, 6]


# ---- bad input: refused before anything is queued, naming the culprit --------------------------


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("smallvocab"))  # the Llama 3 tokenizer knows 128k ids, the model 1000
    make_checkpoint(folder, vocab_size=1000, bos_token_id=1, eos_token_id=2)
    return folder


BAD_INPUTS = [  # (prompts, sampling_params, priority, error, message)
    (["a", "b"], [SamplingParams(), {"temperature": 0}], None, TypeError, "sampling_params 1: expected a SamplingParams"),
    (["a", "b"], [SamplingParams(), None], None, TypeError, "sampling_params 1"),
    (["a"], "not params", None, TypeError, "sampling_params: expected"),
    (["a", "b"], SamplingParams(), ["a", 0], TypeError, "priority 0: expected an integer"),
    (["a", "b"], SamplingParams(), [0, 1.5], TypeError, "priority 1"),
    ([{"prompt_token_ids": [5, 6]}, "hello world"], None, None, ValueError, "prompt 1: its tokens must be integers in \\[0, 1000\\)"),
    ([{"prompt_token_ids": [5, True]}], None, None, ValueError, "prompt 0: prompt_token_ids"),
]


@pytest.mark.parametrize("prompts,params,priority,error,message", BAD_INPUTS)
def test_bad_input_is_refused_before_any_work(small_vocab, prompts, params, priority, error, message):
    llm = LLM(small_vocab, scheduling_policy="priority", **CACHE)
    with pytest.raises(error, match=message):
        llm.generate(prompts, params, priority=priority, use_tqdm=False)
    assert_clean(llm)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=2.0), "n must be an integer"), (dict(n=True), "n must"), (dict(seed=2**70), "seed must"),
    (dict(seed=1.5), "seed must"), (dict(temperature=math.nan), "temperature must be a finite"),
    (dict(temperature=math.inf), "temperature"), (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(top_p=math.nan), "top_p"), (dict(min_p=math.inf), "min_p"), (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(stop=[7]), "stop must be"), (dict(stop=7), "stop must be"), (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(top_k=2.0), "top_k"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_reject_non_finite_and_mistyped_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_field_changed_after_construction_is_checked_by_generate(small_vocab):
    llm = LLM(small_vocab, **CACHE)
    sp = SamplingParams()
    sp.temperature = float("nan")
    with pytest.raises(ValueError, match="sampling_params 1: temperature"):
        llm.generate([{"prompt_token_ids": [5]}] * 2, [SamplingParams(), sp], use_tqdm=False)
    assert_clean(llm)


def test_top_k_past_the_vocabulary_keeps_every_token(small_vocab):
    llm = LLM(small_vocab, **CACHE)
    prompt = [{"prompt_token_ids": [5, 6, 7]}]
    big, off = (llm.generate(prompt, SamplingParams(temperature=1.0, seed=1, top_k=k, max_tokens=6, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids for k in (10**6, 0))
    assert big == off and len(big) == 6


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda"], "no CUDA GPU"), (["--device", "gpu"], "device must be"),
    (["--output", "/nonexistent/dir/out.jsonl", "--model", "/nonexistent/model"], "/nonexistent/dir/out.jsonl"),
    (["--max-tokens", "0"], "max_tokens must be"),
])
def test_cli_checks_everything_before_loading_the_model(tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    r = run_cli("--prompts", str(prompts), *args)
    assert r.returncode == 1 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_names_a_prompts_file_that_is_not_utf8(tmp_path):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    r = run_cli("--prompts", str(prompts))
    assert r.returncode == 1 and str(prompts) in r.stderr and "UTF-8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- property-based: the BlockManager and the Scheduler over random workloads --------------------


def check_invariants(bm: BlockManager, sched: Scheduler):
    owners = {}
    for seq in sched.running:
        for b in seq.block_table:
            owners[b] = owners.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for block in bm.blocks:
        assert block.ref_count == owners.get(block.block_id, 0), "reference count != owners"
        assert (block.ref_count == 0) == (block.block_id in bm.free_block_ids), "a block both free and owned"
    for h, b in bm.cached.items():
        assert bm.blocks[b].hash == h
    assert sum(b.hash is not None for b in bm.blocks) == len(bm.cached)


def simulate(prompts, max_tokens, arrivals, priorities, block_size, num_blocks, max_num_seqs, budget, caching):
    """Run the scheduler on a fake model whose 'K/V' is the token id written in each slot. A sequence's next
    token is a hash of what it reads back through its block table, so a block handed out with the wrong
    contents (a prefix-cache mistake) changes its output. Returns {seq_id: output token ids}."""
    bm = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(bm, max_num_seqs, budget)
    kv, outputs, seqs = {}, {}, []
    for i, (p, m, prio) in enumerate(zip(prompts, max_tokens, priorities)):
        seqs.append(Sequence(i, str(i), 0, None, p, SamplingParams(max_tokens=m), prio, None, num_blocks * block_size))
    for step in range(10_000):
        for seq in seqs:
            if arrivals[seq.seq_id] == step:
                sched.add(seq)
        if step > max(arrivals) and not (sched.waiting or sched.running):
            break
        batch = sched.schedule()
        for seq, n in batch:  # the whole step's K/V is written before anything reads it (as each layer does)
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                kv[seq.block_table[pos // block_size] * block_size + pos % block_size] = seq.token_ids[pos]
        for seq, n in batch:
            seq.num_computed_tokens += n
            seen = [kv[seq.block_table[p // block_size] * block_size + p % block_size] for p in range(seq.num_computed_tokens)]
            assert seen == seq.token_ids[:seq.num_computed_tokens], "a block table reads K/V of other tokens"
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(hash(tuple(seen)) % 50)
                if seq.num_tokens >= seq.max_len:
                    outputs[seq.seq_id] = seq.output_token_ids
                    sched.finish(seq)
        bm.commit()
        check_invariants(bm, sched)
    assert len(outputs) == len(seqs), "every request finishes"
    assert all(b.ref_count == 0 for b in bm.blocks) and len(bm.free_block_ids) == num_blocks
    return outputs


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    prefix = draw(st.lists(st.integers(0, 5), max_size=12))
    n = draw(st.integers(1, 6))
    prompts = [prefix + draw(st.lists(st.integers(0, 5), min_size=0 if prefix else 1, max_size=10)) for _ in range(n)]
    copies = draw(st.integers(1, 3))  # n > 1: the same prompt several times
    prompts = [p for p in prompts for _ in range(copies if draw(st.booleans()) else 1)]
    max_tokens = [draw(st.integers(1, 8)) for _ in prompts]
    need = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    return dict(prompts=prompts, max_tokens=max_tokens, arrivals=[draw(st.integers(0, 6)) for _ in prompts],
                priorities=[draw(st.integers(0, 2)) for _ in prompts], block_size=block_size,
                num_blocks=need + draw(st.integers(0, 12)),  # down to the smallest cache that fits one request
                max_num_seqs=draw(st.integers(1, 4)), budget=draw(st.integers(1, 24)), caching=draw(st.booleans()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_block_manager_and_scheduler_invariants(w):
    got = simulate(**w)
    roomy = dict(w, num_blocks=10_000, max_num_seqs=64, budget=10_000, caching=False)
    assert got == simulate(**roomy)  # the same outputs as an unconstrained run
