"""Engine-level logits processors, LLM(logits_processors=[cls, ...]) as vLLM v1 takes them (structured.py, section 5):
BatchUpdate against a literal replay of the rows, the live output ids, a forcing processor through generate under
preemption and n > 1, validate_params, names as strings, the argmax-invariant rule, and exceptions. On a tiny random
checkpoint with a 1000-token vocabulary."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import structured as so
from minillm import LLM, EngineArgs, FlexibleArgumentParser, LogitsProcessor, SamplingParams, process_dict_updates
from test_engine import make_checkpoint, random_prompts
from test_robustness import Boom, assert_clean, fail_on_call

CACHE = dict(block_size=4, num_gpu_blocks_override=24)  # 96 token slots: the workload below preempts
TARGET = 77


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lp"))
    make_checkpoint(folder, vocab_size=1000, bos_token_id=1, eos_token_id=2)
    return folder


class ForceToken(LogitsProcessor):
    """vLLM's DummyLogitsProcessor pattern: rows whose SamplingParams.extra_args hold target_token can only
    produce that token."""

    @classmethod
    def validate_params(cls, params):
        target = (params.extra_args or {}).get("target_token")
        if target is not None and not isinstance(target, int):
            raise ValueError(f"target_token must be an int, got {target!r}")

    def __init__(self, vllm_config, device, is_pin_memory):
        self.config, self.device, self.is_pin_memory = vllm_config, device, is_pin_memory
        self.targets: dict[int, int] = {}  # row -> its token

    def is_argmax_invariant(self):
        return False

    def update_state(self, batch_update):
        process_dict_updates(self.targets, batch_update, lambda params, _, __: (params.extra_args or {}).get("target_token"))

    def apply(self, logits):
        if self.targets:
            rows, cols = torch.tensor(list(self.targets)), torch.tensor(list(self.targets.values()))
            keep = logits[rows, cols].clone()
            logits[rows] = float("-inf")
            logits[rows, cols] = keep
        return logits


class Recorder(LogitsProcessor):
    """Replays every BatchUpdate literally (removed, then added, then moved) and records, at each apply, which
    sequence each row holds and what its output ids say."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, so.OutputTokenIds] = {}
        self.seen = []  # per apply: [((request_id, completion index), output ids)] in row order

    def is_argmax_invariant(self):
        return False

    def update_state(self, u):
        if u is None:
            return
        assert not set(u.removed) & {row for row, *_ in u.added}  # vLLM's rule
        for row in u.removed:
            del self.rows[row]  # (raises if the row was empty)
        for row, params, prompt_ids, output_ids in u.added:
            assert prompt_ids is output_ids.seq.prompt_token_ids and params is output_ids.seq.params
            self.rows[row] = output_ids
        for a, b, direction in u.moved:
            if direction is so.MoveDirectionality.SWAP:
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            else:
                self.rows[b] = self.rows.pop(a)
        assert sorted(self.rows) == list(range(u.batch_size))

    def apply(self, logits):
        assert sorted(self.rows) == list(range(logits.shape[0]))
        self.seen.append([((v.seq.request_id, v.seq.index), list(v)) for _, v in sorted(self.rows.items())])
        return logits


class ClaimsArgmaxInvariant(ForceToken):
    """Forces TARGET on every row while claiming to be argmax-invariant: greedy rows must not see it."""
    calls = 0

    def is_argmax_invariant(self):
        return True

    def update_state(self, batch_update):
        self.targets = {row: TARGET for row in range(batch_update.batch_size)} if batch_update else self.targets

    def apply(self, logits):
        type(self).calls += 1
        return super().apply(logits)


class Explode(LogitsProcessor):
    """Raises Boom in its `method`'s k-th call (class attributes, set by the test)."""
    method, k, calls = None, 0, 0

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self):
        return False

    def tick(self, method):
        if method == type(self).method:
            type(self).calls += 1
            if type(self).calls == type(self).k:
                raise Boom("injected")

    def update_state(self, batch_update):
        self.tick("update_state")

    def apply(self, logits):
        self.tick("apply")
        return logits


def workload(forced=(1, 3, 4)):
    """Six requests of 24-28 tokens (more than the cache holds at once): greedy and seeded sampling, n = 2, some
    forced to TARGET."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts([8, 5, 9, 6, 7, 4], seed=1)]
    params = [SamplingParams(temperature=0, max_tokens=18, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=11, n=2, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=19, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=9, max_tokens=20, ignore_eos=True)]
    for i in forced:
        params[i].extra_args = {"target_token": TARGET}
    return prompts, params


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def plain(folder):
    """The workload's outputs without processors."""
    return tokens(LLM(folder, **CACHE).generate(*workload(), use_tqdm=False))


# -- BatchUpdate --

def replay(previous, update, documented_order=True):
    """The rows after `update`, read removed-added-moved (or as process_dict_updates reads it)."""
    rows = {i: "?" if k is None else k for i, k in enumerate(previous)}  # "?": unknown, must be cleared
    if update is None:
        return rows
    if not documented_order:
        process_dict_updates(rows, update, lambda key, _, __: key)
        return rows
    for i in update.removed:
        rows.pop(i, None)
    for i, key, *_ in update.added:
        rows[i] = key
    for a, b, d in update.moved:
        ka, kb = rows.pop(a, None), rows.pop(b, None)
        if ka is not None:
            rows[b] = ka
        if kb is not None and d is so.MoveDirectionality.SWAP:
            rows[a] = kb
    return rows


def test_batch_update_examples():
    info = lambda key: (key, [0], [])
    assert so.batch_update(["a", "b"], ["a", "b"], info) is None
    u = so.batch_update(["a", "b", "c"], ["a", "c"], info)  # b finished: c moves up, keeping its state
    assert (u.batch_size, u.removed, u.added, u.moved) == (2, [1], [], [(2, 1, so.MoveDirectionality.UNIDIRECTIONAL)])
    u = so.batch_update(["a", "b"], ["b", "x", "a"], info)  # a new row, a swap
    assert u.added == [(2, "x", [0], [])] and u.moved == [(1, 0, so.MoveDirectionality.SWAP), (2, 1, so.MoveDirectionality.SWAP)]
    u = so.batch_update([None, None, None], ["x"], info)  # after reset: everything anew, the rest cleared
    assert (u.removed, u.added, u.moved) == ([1, 2], [(0, "x", [0], [])], [])


keys = st.lists(st.sampled_from("abcdefghij"), unique=True, max_size=8)


@settings(max_examples=300, deadline=None)
@given(keys, keys, st.lists(st.booleans(), max_size=8))
def test_batch_update_takes_the_rows_to_the_new_batch(previous, current, unknown):
    previous = [None if i < len(unknown) and unknown[i] else k for i, k in enumerate(previous)]
    u = so.batch_update(previous, current, lambda key: (key, None, []))
    want = dict(enumerate(current))
    assert replay(previous, u) == want and replay(previous, u, documented_order=False) == want
    if u is not None:
        added = [i for i, *_ in u.added]
        assert u.batch_size == len(current) and not set(u.removed) & set(added)
        assert sorted(k for _, k, *_ in u.added) == sorted(set(current) - set(previous))  # kept rows keep their state


def test_output_token_ids_is_a_live_view_without_placeholders():
    class Seq:
        prompt_token_ids = [1, 2]
        token_ids = [1, 2, 7, 8, -1]  # the last one still on the device
    seq = Seq()
    view = so.OutputTokenIds(seq)
    assert len(view) == 2 and view == [7, 8] and view[-1] == 8 and view[:5] == [7, 8] and list(reversed(view)) == [8, 7]
    with pytest.raises(IndexError):
        view[2]
    seq.token_ids[-1] = 9
    seq.token_ids.append(10)
    assert view == [7, 8, 9, 10] and view[2] == 9 and repr(view) == "[7, 8, 9, 10]"


# -- through the engine --

def test_a_forcing_processor_through_generate(folder, plain):
    llm = LLM(folder, logits_processors=[ForceToken], **CACHE)
    out = tokens(llm.generate(*workload(), use_tqdm=False))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for i, completions in enumerate(out):
        if i in (1, 3, 4):  # forced, each of n = 2 completions too
            assert all(set(c) == {TARGET} for c in completions) and len(completions) == (2 if i == 3 else 1)
        else:  # as without the processor
            assert completions == plain[i]
    assert_clean(llm)
    p = llm.llm_engine.logits_hook.processors.non_argmax_invariant[0]
    cfg = p.config
    assert (cfg.scheduler_config.max_num_seqs, cfg.model_config.get_vocab_size(), cfg.model_config.max_model_len) == (256, 1000, 512)
    assert cfg.speculative_config is None and cfg.parallel_config.tensor_parallel_size == 1
    assert p.device == torch.device("cpu") and p.is_pin_memory is False


def test_every_batch_update_matches_the_rows_and_output_ids_are_complete(folder):
    """Through LLMEngine, with preemption, n = 2, and an abort half way: at every apply the rows a processor built
    from the updates are the step's real rows, and each row's output ids are its tokens so far."""
    llm = LLM(folder, logits_processors=[Recorder, ForceToken], **CACHE)
    e = llm.llm_engine
    real, apply = [], e.logits_hook.processors.apply
    e.logits_hook.processors.apply = lambda logits, seqs: real.append([(s.request_id, s.index) for s in seqs]) or apply(logits, seqs)
    for i, (p, sp) in enumerate(zip(*workload())):
        e.add_request(str(i), p, sp)
    done, steps = {}, 0
    while e.has_unfinished_requests():
        done.update((o.request_id, o) for o in e.step() if o.finished)
        steps += 1
        if steps == 12:
            e.abort_request("4")
    recorder = e.logits_hook.processors.non_argmax_invariant[0]
    assert e.scheduler.num_preemptions > 0 and len(real) > 20
    assert [[row for row, _ in rows] for rows in recorder.seen] == real
    final = {(rid, c.index): c.token_ids for rid, o in done.items() for c in o.outputs}
    assert len(final) == 7 and "4" not in done  # 8 completions, less the aborted one
    history = {}
    for rows in recorder.seen:
        for key, ids in rows:
            history.setdefault(key, []).append(ids)
    for key, views in history.items():
        if key in final:  # each step saw the tokens so far: none missing, none pending
            assert views == [final[key][:n] for n in range(len(final[key]))], key
    assert all(set(final[(rid, c)]) == {TARGET} for rid, c in final if rid in ("1", "3"))


def test_validate_params_names_the_request_before_any_work(folder):
    llm = LLM(folder, logits_processors=[Recorder, ForceToken], **CACHE)
    bad = SamplingParams(max_tokens=3, extra_args={"target_token": "77"})
    with pytest.raises(ValueError, match=r"^sampling_params 1: ForceToken: target_token must be an int, got '77'"):
        llm.generate([{"prompt_token_ids": [5, 6]}] * 2, [SamplingParams(max_tokens=3), bad], use_tqdm=False)
    e = llm.llm_engine
    assert_clean(llm)
    assert e.logits_hook.processors.rows == [] and e.logits_hook.processors.non_argmax_invariant[0].seen == []
    with pytest.raises(ValueError, match="^sampling_params: ForceToken"):
        e.add_request("x", [5, 6], bad)
    assert not e.requests
    out = llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=3, extra_args={"target_token": 9}), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [9, 9, 9]


@pytest.mark.parametrize("name", ["test_logits_processors:ForceToken", "test_logits_processors.ForceToken"])
def test_a_class_given_by_name(folder, plain, name):
    llm = LLM(folder, logits_processors=[name], **CACHE)
    assert llm.llm_engine.logits_hook.processors.classes == [ForceToken]
    out = tokens(llm.generate(*workload(forced=[0]), use_tqdm=False))
    assert out[0] == [[TARGET] * 18] and out[1:] == plain[1:]
    args = FlexibleArgumentParser()
    EngineArgs.add_cli_args(args)
    assert EngineArgs.from_cli_args(args.parse_args(["--logits-processors", name])).logits_processors == [name]


@pytest.mark.parametrize("entries, error, message", [
    ([lambda out, logits: logits], TypeError, r"logits_processors\[0\]: expected a subclass of LogitsProcessor .*a per-request function goes in SamplingParams"),
    ([ForceToken, dict], TypeError, r"logits_processors\[1\]: expected a subclass of LogitsProcessor"),
    ([42], TypeError, r"logits_processors\[0\].* got 42"),
    (["ForceToken"], ValueError, r"logits_processors\[0\]: 'ForceToken' is not a qualified class name"),
    (["no_such_module_here:Thing"], ValueError, r"logits_processors\[0\]: cannot load 'no_such_module_here:Thing'"),
    (["test_logits_processors:Nothing"], ValueError, r"cannot load 'test_logits_processors:Nothing'"),
    (ForceToken, TypeError, r"logits_processors: expected a list"),
])
def test_anything_else_is_a_clear_error(entries, error, message):
    with pytest.raises(error, match=message):
        so.EngineLogitsProcessors(entries, None, torch.device("cpu"))


def test_not_a_processor_is_refused_by_llm(folder):
    with pytest.raises(TypeError, match=r"logits_processors\[0\]: expected a subclass of LogitsProcessor"):
        LLM(folder, logits_processors=[object], **CACHE)
    assert EngineArgs(logits_processors=[]).logits_processors == []  # none: as vLLM's default


def test_argmax_invariant_processors_skip_greedy_rows(folder, plain):
    """vLLM's rule: greedy rows take their argmax before argmax-invariant processors run. This one lies (it forces
    TARGET everywhere): it is not even called in an all-greedy step, and greedy rows never feel it."""
    ClaimsArgmaxInvariant.calls = 0
    llm = LLM(folder, logits_processors=[ClaimsArgmaxInvariant], **CACHE)
    prompts, params = workload(forced=())
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    out = tokens(llm.generate([prompts[i] for i in greedy], [params[i] for i in greedy], use_tqdm=False))
    assert out == [plain[i] for i in greedy] and ClaimsArgmaxInvariant.calls == 0
    out = tokens(llm.generate(prompts, params, use_tqdm=False))
    assert ClaimsArgmaxInvariant.calls > 0
    for i, completions in enumerate(out):
        assert completions == plain[i] if i in greedy else all(set(c) == {TARGET} for c in completions)


@pytest.mark.parametrize("method, k", [("apply", 3), ("update_state", 5), ("update_state", 1), ("sample", 4)])
def test_an_exception_leaves_a_fresh_llm(folder, method, k):
    """A processor (or the sampler) raises mid-run. ForceToken, before Explode in the list, has taken that step's
    rows: the next generate, with fewer rows, must see none of them (a stale forced row would hit a row past the
    batch), and equal what a fresh LLM gives."""
    Explode.method, Explode.k, Explode.calls = method, k, 0
    llm = LLM(folder, logits_processors=[ForceToken, Explode], **CACHE)
    undo = fail_on_call(llm.llm_engine.runner, "sample", k) if method == "sample" else lambda: None
    with pytest.raises(Boom):
        llm.generate(*workload(forced=(3, 4, 5)), use_tqdm=False)
    undo()
    Explode.method = None
    assert_clean(llm)
    prompts, params = workload(forced=(1,))
    again = tokens(llm.generate(prompts[:2], params[:2], use_tqdm=False))
    assert again == tokens(LLM(folder, logits_processors=[ForceToken, Explode], **CACHE).generate(prompts[:2], params[:2], use_tqdm=False))
    assert set(again[1][0]) == {TARGET}
    assert_clean(llm)
