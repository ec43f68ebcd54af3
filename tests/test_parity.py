"""vLLM parity (issue 6): prefix caching, n > 1, logprobs, penalties, chat, priority preemption. HF transformers
is the oracle on a tiny random checkpoint; plain loops are the reference for the penalty formulas."""
import json
import os

import pytest
import torch

import minillm
from minillm import LLM, SamplingParams
from test_engine import VARIANTS, make_checkpoint, random_prompts, run_cli

# A Llama 3-style chat template: BOS from the template, a system message first, raise_exception for bad roles.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the Llama 3 tokenizer and a tokenizer_config.json holding a chat template."""
    folder = str(tmp_path_factory.mktemp("parity"))
    hf = make_checkpoint(folder, **VARIANTS["gqa_llama3_tied"])
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return folder, hf


SMALL = dict(block_size=4, num_gpu_blocks_override=256)  # 1 GiB of cache would be a million tiny blocks


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def peak_blocks_in_use(llm):
    """Wraps llm's scheduler to record the most blocks held at once (cached-but-free blocks are not held)."""
    peak, schedule = [0], llm.llm_engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        peak[0] = max(peak[0], sum(b.ref_count > 0 for b in llm.llm_engine.block_manager.blocks))
        return out
    llm.llm_engine.scheduler.schedule = counting_schedule
    return peak


# ---- prefix caching --------------------------------------------------------------------------


def test_prefix_caching_shares_a_system_prefix_and_changes_nothing(tiny):
    folder, _ = tiny
    prefix = random_prompts([40], seed=5)[0]
    prompts = [prefix + s for s in random_prompts([3, 5, 7, 9, 4, 6], seed=6)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    on, off = LLM(folder, **SMALL), LLM(folder, **SMALL, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in off.generate(token_prompts(prompts), sp, use_tqdm=False)]
    first = on.generate(token_prompts(prompts), sp, use_tqdm=False)
    # the first prompt computes the prefix; the others, scheduled in the same step, take its 10 blocks
    assert [o.num_cached_tokens for o in first] == [0, 40, 40, 40, 40, 40]
    assert [o.outputs[0].token_ids for o in first] == want
    # again: every full block of each prompt is cached now, but the last token is always computed
    again = on.generate(token_prompts(prompts), sp, use_tqdm=False)
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 4 * 4 for p in prompts]
    assert [o.outputs[0].token_ids for o in again] == want
    assert all(b.ref_count == 0 for b in on.llm_engine.block_manager.blocks)


def test_prefix_cache_eviction_under_a_small_cache_keeps_results_right(tiny):
    folder, _ = tiny
    # 24 blocks of 4 slots hold about 96 tokens: each round evicts the last one's blocks, and preempts
    kw = dict(block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=16)
    on, off = LLM(folder, **kw), LLM(folder, **kw, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    shared = random_prompts([20], seed=7)[0]
    a = [shared + s for s in random_prompts([5, 9, 2], seed=8)]
    b = random_prompts([30, 25, 18], seed=9)
    rounds = []
    for batch in (a, b, a, a):
        got = on.generate(token_prompts(batch), sp, use_tqdm=False)
        want = off.generate(token_prompts(batch), sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        rounds.append(([o.num_cached_tokens for o in got], set(on.llm_engine.block_manager.cached)))
    assert on.llm_engine.scheduler.num_preemptions > 0
    assert not rounds[1][1] >= rounds[0][1]  # round b evicted blocks of round a
    assert rounds[0][0] == [0, 20, 20] and sum(rounds[3][0]) > 20  # a repeated round finds more blocks
    bm = on.llm_engine.block_manager
    assert len(bm.free_block_ids) == 24 and all(bm.blocks[i].hash == h for h, i in bm.cached.items())


# ---- logprobs and prompt_logprobs ------------------------------------------------------------


def check_entry(entry, token, ref_row, k):
    """entry: {token_id: Logprob} from minillm; ref_row: HF's log_softmax (V,) at that position."""
    assert abs(entry[token].logprob - ref_row[token].item()) < 1e-4
    lp = ref_row[token]  # rank 1 + the tokens more likely; a 128k vocabulary has near-ties, so within 1e-4
    assert int((ref_row > lp + 1e-4).sum()) + 1 <= entry[token].rank <= int((ref_row >= lp - 1e-4).sum())
    top = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)
    assert [lp.rank for lp in top] == list(range(1, k + 1))  # ranked 1..k, most likely first
    assert torch.allclose(torch.tensor([lp.logprob for lp in top]), ref_row.topk(k).values, atol=1e-4)
    for t, lp in entry.items():
        assert abs(lp.logprob - ref_row[t].item()) < 1e-4
    assert set(entry) <= set(ref_row.topk(k + 2).indices.tolist()) | {token}


def test_logprobs_and_prompt_logprobs_match_hf(tiny):
    folder, hf = tiny
    # chunked prefill (8-token steps) and a cache of 9 blocks of 4: both prompts' logprobs survive preemption
    llm = LLM(folder, block_size=4, num_gpu_blocks_override=9, max_num_batched_tokens=8)
    prompts = random_prompts([23, 9], seed=10)
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    outs = llm.generate(token_prompts(prompts), sp, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        full = prompt + c.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)  # (T, V)
        assert len(c.logprobs) == len(c.token_ids) and len(out.prompt_logprobs) == len(prompt)
        for j, token in enumerate(c.token_ids):
            check_entry(c.logprobs[j], token, ref[len(prompt) + j - 1], 5)
            assert c.logprobs[j][token].decoded_token == llm.get_tokenizer().decode([token], skip_special_tokens=False)
        assert abs(c.cumulative_logprob - sum(c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids))) < 1e-4
        assert out.prompt_logprobs[0] is None
        for t in range(1, len(prompt)):
            check_entry(out.prompt_logprobs[t], prompt[t], ref[t - 1], 3)
    plain = llm.generate(token_prompts(prompts[:1]), SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None and plain.prompt_logprobs is None


# ---- penalties -------------------------------------------------------------------------------


def reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's formulas, one token at a time: repetition over prompt and output tokens, the others over output
    (tokens in neither are left as they are)."""
    logits = logits.clone()
    for t in set(prompt) | set(output):
        logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        logits[t] -= frequency * output.count(t) + presence * (t in output)
    return logits


def test_apply_penalties_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, generator=g) * 2
    prompts, outputs = [[1, 2, 3, 3], [5], [7, 8]], [[2, 2, 9], [], [8, 8, 8, 11]]
    pres, freq, rep = [0.5, -1.0, 0.0], [0.3, 0.0, 1.5], [1.3, 0.8, 1.0]
    mask = torch.zeros(3, 30, dtype=torch.bool)
    counts = torch.zeros(3, 30)
    for i in range(3):
        mask[i, prompts[i]] = True
        for t in outputs[i]:
            counts[i, t] += 1
    got = minillm.apply_penalties(logits, mask, counts, torch.tensor(pres), torch.tensor(freq), torch.tensor(rep))
    for i in range(3):
        want = reference_penalties(logits[i], prompts[i], outputs[i], pres[i], freq[i], rep[i])
        assert torch.allclose(got[i], want, atol=1e-6), i


def test_penalized_greedy_generation_matches_hf_with_reference_penalties(tiny):
    folder, hf = tiny
    llm = LLM(folder, **SMALL)
    prompts = random_prompts([12, 7], seed=11)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=0.4, frequency_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.8)]
    outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    plain = llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt, sp, out, unpenalized in zip(prompts, params, outs, plain):
        output = []
        for _ in range(10):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + output]), logits_to_keep=1).logits[0, -1].float()
            logits = reference_penalties(logits, prompt, output, sp.presence_penalty, sp.frequency_penalty,
                                         sp.repetition_penalty)
            output.append(int(logits.argmax()))
        assert out.outputs[0].token_ids == output
        assert output != unpenalized.outputs[0].token_ids  # the penalties changed something


# ---- n > 1 -----------------------------------------------------------------------------------


def test_n_completions_share_blocks_differ_and_reproduce(tiny):
    folder, _ = tiny
    prompt = token_prompts(random_prompts([37], seed=12))
    sp = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    shared, separate = LLM(folder, **SMALL), LLM(folder, **SMALL, enable_prefix_caching=False)
    peak_shared, peak_separate = peak_blocks_in_use(shared), peak_blocks_in_use(separate)
    out = shared.generate(prompt, sp, use_tqdm=False)[0]
    separate.generate(prompt, sp, use_tqdm=False)
    # K/V of 37 + 7 tokens (the last one is never computed) = 11 blocks a completion; shared: the 9 full
    # prompt blocks once, 2 of its own each
    assert peak_separate[0] == 4 * 11 and peak_shared[0] == 9 + 4 * 2
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4  # they differ
    again = shared.generate(prompt, sp, use_tqdm=False)[0]  # from a warm cache now
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    # completion i uses seed + i, as vLLM's child requests do
    third = shared.generate(prompt, SamplingParams(temperature=1.0, seed=13, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert third[0].outputs[0].token_ids == out.outputs[2].token_ids
    unseeded = shared.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len({tuple(c.token_ids) for c in unseeded[0].outputs}) == 3


def test_n_completions_under_preemption_are_the_same_with_caching_off(tiny):
    # children of one request share blocks and sample different tokens; preempted and resumed, each must
    # find only blocks of its own tokens (a block holding a token still on its way from the device has no
    # hash yet)
    folder, _ = tiny
    kw = dict(block_size=4, num_gpu_blocks_override=20, max_num_batched_tokens=16)
    prompts = token_prompts(random_prompts([15, 23], seed=14))  # the first output token ends a block
    # (a random tiny model's distributions are nearly flat: its sampled tokens hardly depend on the K/V, but
    # their logprobs do)
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=0)
    on, off = LLM(folder, **kw), LLM(folder, **kw, enable_prefix_caching=False)
    got, want = on.generate(prompts, sp, use_tqdm=False), off.generate(prompts, sp, use_tqdm=False)
    assert on.llm_engine.scheduler.num_preemptions > 0 and off.llm_engine.scheduler.num_preemptions > 0
    for o, w in zip(got, want):
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in w.outputs]
        for c, d in zip(o.outputs, w.outputs):
            assert torch.allclose(torch.tensor([next(iter(e.values())).logprob for e in c.logprobs]),
                                  torch.tensor([next(iter(e.values())).logprob for e in d.logprobs]), atol=1e-4)


# ---- chat ------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi! ünïcödé  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2 = ?"}],
]


def hf_ids(hf_tok, conversation):
    return hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_chat_template_renders_as_transformers_does(tiny):
    from transformers import AutoTokenizer
    folder, _ = tiny
    llm = LLM(folder, num_gpu_blocks_override=64)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            assert llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False) == want
        want_ids = hf_ids(hf_tok, conversation)
        assert llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=True) == want_ids
        assert want_ids.count(llm.get_tokenizer().bos_id) == 1  # the template's BOS, no second one
    outs = llm.chat(CONVERSATIONS, SamplingParams(max_tokens=3), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [hf_ids(hf_tok, c) for c in CONVERSATIONS]
    assert len(llm.chat(CONVERSATIONS[0], SamplingParams(max_tokens=3), use_tqdm=False)) == 1  # one conversation
    with pytest.raises(ValueError, match="conversation 1: unknown role: robot"):
        llm.chat([CONVERSATIONS[0], [{"role": "robot", "content": "beep"}]], use_tqdm=False)
    assert not (llm.llm_engine.scheduler.waiting or llm.llm_engine.scheduler.running)


def test_default_model_chat_template_from_gguf_matches_transformers():
    from transformers import AutoTokenizer
    path = minillm.default_model_path()
    ours = minillm.load_tokenizer(path)
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == hf_tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(conversation, add_generation_prompt=True) == hf_ids(hf_tok, conversation)


def test_cli_chat_answers_on_the_default_model(tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("What is the capital of France?\n")
    r = run_cli("--chat", "--prompts", str(questions), "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("--- What is the capital of France?\n") and "Paris" in r.stdout


# ---- priority preemption ---------------------------------------------------------------------


def test_a_waiting_request_preempts_worse_running_ones(tiny):
    folder, _ = tiny
    llm = LLM(folder, scheduling_policy="priority", block_size=4, num_gpu_blocks_override=8, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = random_prompts([8, 8, 12, 12], seed=13)
    engine = llm.llm_engine
    RUNNING, WAITING = minillm.SequenceStatus.RUNNING, minillm.SequenceStatus.WAITING
    status = lambda rid: engine.requests[rid][0].status
    finished = []
    add = lambda i: engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, sp, priority=[5, 5, 5, 0][i])
    add(0), add(1)
    finished += engine.step() + engine.step()  # both decoding: 3 blocks each, 2 of 8 free
    add(2)  # needs 3 blocks; same priority but later than the running ones: it waits
    finished += engine.step()
    assert status("2") is WAITING and status("0") is RUNNING and status("1") is RUNNING
    add(3)  # outranks both: the worse of the two ties, the later arrival, gives way
    finished += engine.step()
    assert status("3") is RUNNING and status("1") is WAITING and status("0") is RUNNING
    while engine.has_unfinished_requests():
        finished += engine.step()
    finished = {o.request_id: o for o in finished if o.finished}
    order = list(finished)
    assert order.index("3") < order.index("1") and order.index("3") < order.index("2")
    alone = LLM(folder, **SMALL).generate(token_prompts(prompts), sp, use_tqdm=False)
    assert [finished[str(i)].outputs[0].token_ids for i in range(4)] == [o.outputs[0].token_ids for o in alone]
