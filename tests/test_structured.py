"""structured.py: grammar masks against slow references, generation under masks, and the logits controls.

Grammar tests need xgrammar (`pip install 'minillm[structured]'`) and are skipped without it; the params,
logits-control and missing-library tests run either way. Vocabulary: the default model's (SmolLM2, 49,152)."""
import importlib.util
import json
import sys

import pytest
import regex
import torch

import minillm
import structured as so
from structured import GuidedDecodingParams, LogitsControls, StructuredOutputsParams

needs_xgrammar = pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None,
                                    reason="xgrammar is not installed (pip install 'minillm[structured]')")
V, EOS = 49152, 2  # the default model's vocabulary size and <|im_end|>

# nested objects, enums, arrays, numbers. Strings are bounded by `pattern`, not maxLength: xgrammar 0.2.9
# lets length-bounded strings hold raw control characters (mlc-ai/xgrammar#800), which is not JSON.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                   "location": {"type": "array", "minItems": 2, "maxItems": 2,
                                                "items": {"type": "integer", "minimum": -99, "maximum": 99}}},
                    "required": ["city", "location"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = '{"name":"Ada","age":36,"score":9.5,"role":"admin","tags":["math"],"address":{"city":"London","location":[51,-1]}}'
REGEX = r"\d{3}-[a-z]{2,4}( [A-Z]+)?"
CHOICES = ["yes", "no", "maybe so", "Yes\n"]


@pytest.fixture(scope="module")
def tok():
    return minillm.load_tokenizer(minillm.default_model_path())


@pytest.fixture(scope="module")
def compiler(tok):
    return so.GrammarCompiler(tok, V, [EOS])


# -- params --

def test_params_need_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of .*got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="got json, json_object"):
        GuidedDecodingParams(json={}, json_object=True)
    with pytest.raises(ValueError, match="StructuredOutputsParams.json is not valid JSON"):
        StructuredOutputsParams(json="{'single': quotes}")
    with pytest.raises(ValueError, match="json must be a dict"):
        StructuredOutputsParams(json=3)
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice="yes")
    with pytest.raises(ValueError, match="choice must hold non-empty strings"):
        StructuredOutputsParams(choice=["a", ""])
    with pytest.raises(ValueError, match="regex must be a non-empty string"):
        StructuredOutputsParams(regex="  ")
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex="a", backend="outlines")
    old = GuidedDecodingParams(choice=("a", "b"), backend="xgrammar")
    assert isinstance(old, StructuredOutputsParams) and old.kind == "choice" and old.choice == ["a", "b"]
    # the same schema as a dict and as text is one constraint
    assert StructuredOutputsParams(json={"type": "integer"}).cache_key() == StructuredOutputsParams(json='{"type":"integer"}').cache_key()


def test_missing_xgrammar_is_a_clear_error(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'minillm\[structured\]'"):
        so.GrammarCompiler(tok, V, [EOS])


# -- masks: fast == reference --

def walk(compiler, params, text, tok, steps):
    """States of `params` after each of the first tokens of `text` (already tokenized as the model would)."""
    ids = tok.encode(text, add_special_tokens=False)
    state, states = compiler.new_state(params), []
    for k, t in enumerate(ids + [EOS]):
        if k in steps:
            states.append(state.copy())
        assert state.accept(t), f"{text!r}: token {k} {tok.token_bytes(t)!r} refused"
    return states, state


@needs_xgrammar
@pytest.mark.parametrize("params, text, steps", [
    (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), DOCUMENT, (0, 3, 18, 40)),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}}}}),
     '{"a": [1.5, -2]}', (4, 7)),  # free whitespace (vLLM's default)
    (StructuredOutputsParams(regex=REGEX), "123-abc XY", (0, 3, 6)),
    (StructuredOutputsParams(choice=CHOICES), "maybe so", (0, 1)),
    (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'), "(12+3)", (1, 3)),
], ids=["json", "json_whitespace", "regex", "choice", "grammar"])
def test_fast_mask_equals_reference(compiler, tok, params, text, steps):
    states, end = walk(compiler, params, text, tok, set(steps))
    assert end.is_terminated()
    for state in states + [end]:
        fast = state.allowed_mask(V)
        assert fast.any()
        assert torch.equal(fast, so.allowed_tokens_reference(state, tok, V))


@needs_xgrammar
@pytest.mark.parametrize("params, pattern, text", [
    (StructuredOutputsParams(regex=REGEX), REGEX, "123-abc XY"),
    (StructuredOutputsParams(choice=CHOICES), "|".join(map(regex.escape, CHOICES)), "Yes\n"),
])
def test_regex_mask_equals_python_regex(compiler, tok, params, pattern, text):
    """A check that does not use xgrammar at all: token t is allowed iff the text so far plus t's bytes is
    a prefix of a match (the `regex` module's partial matching), EOS iff it is a whole match."""
    vocab = so.token_vocabulary(tok, V)
    pat = regex.compile(pattern.encode())
    state, sofar = compiler.new_state(params), b""
    for t in tok.encode(text, add_special_tokens=False) + [EOS]:
        expect = torch.tensor([bool(b) and pat.fullmatch(sofar + b, partial=True) is not None for b in vocab])
        expect[EOS] = pat.fullmatch(sofar) is not None
        assert torch.equal(state.allowed_mask(V), expect), sofar
        assert state.accept(t)
        sofar += vocab[t]


@needs_xgrammar
def test_apply_masks_touches_only_constrained_rows(compiler, tok):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)
    regex_state = compiler.new_state(StructuredOutputsParams(regex=REGEX))
    choice_state = compiler.new_state(StructuredOutputsParams(choice=CHOICES))
    choice_state.accept(tok.encode("maybe", add_special_tokens=False)[0])
    states = [None, regex_state, None, choice_state]
    want = so.apply_masks_reference(logits, states)
    got = so.apply_masks(logits.clone(), states)
    assert torch.equal(got, want)
    assert torch.equal(got[[0, 2]], logits[[0, 2]])
    assert torch.equal(so.apply_masks(logits.clone(), [None] * 4), logits)
    done = compiler.new_state(StructuredOutputsParams(choice=["no"]))
    assert done.sync(tok.encode("no", add_special_tokens=False) + [EOS]) and done.is_terminated()
    all_rows = [regex_state, done, choice_state, choice_state.copy()]  # every row: the whole-batch path
    assert torch.equal(so.apply_masks(logits.clone(), all_rows), so.apply_masks_reference(logits, all_rows))


def test_unpack_bitmask():
    bitmask = torch.tensor([[so.to_int32(1 << 31) | 1, 0b110]], dtype=torch.int32)  # bits 0, 31, 33, 34
    for unpack in (so.unpack_bitmask, so.unpack_bitmask_reference):
        assert unpack(bitmask, 40)[0].nonzero().flatten().tolist() == [0, 31, 33, 34]
        assert unpack(bitmask, 34)[0].nonzero().flatten().tolist() == [0, 31, 33]  # cut at V
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 7), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(so.unpack_bitmask(bitmask, 220), so.unpack_bitmask_reference(bitmask, 220))


# -- states: copy, rollback, replay, termination --

@needs_xgrammar
def test_state_copy_rollback_replay(compiler, tok):
    ids = tok.encode("123-abc", add_special_tokens=False)
    a = compiler.new_state(StructuredOutputsParams(regex=REGEX))
    assert a.sync(ids[:2]) and a.num_accepted == 2
    b = a.copy()  # n > 1: each completion its own state
    assert b.accept(ids[2]) and a.num_accepted == 2 and b.num_accepted == 3
    assert not torch.equal(a.allowed_mask(), b.allowed_mask())
    b.rollback(1)
    assert torch.equal(a.allowed_mask(), b.allowed_mask())
    mask_a = a.allowed_mask()
    c = compiler.new_state(StructuredOutputsParams(regex=REGEX))
    assert c.sync(ids[:1]) and c.sync(ids[:2]) and c.num_accepted == 2  # sync accepts only what is new
    assert torch.equal(c.allowed_mask(), mask_a)
    assert a.replay(ids[:2]) and torch.equal(a.allowed_mask(), mask_a)
    letter = tok.encode("x", add_special_tokens=False)[0]
    assert not a.accept(letter) and a.num_accepted == 2  # refused: no change
    assert torch.equal(a.allowed_mask(), mask_a)


@needs_xgrammar
def test_terminated_state_allows_only_stop_tokens(compiler, tok):
    s = compiler.new_state(StructuredOutputsParams(choice=["no"]))
    assert s.sync(tok.encode("no", add_special_tokens=False)) and s.is_completed() and not s.is_terminated()
    assert s.allowed_mask().nonzero().flatten().tolist() == [EOS]
    assert s.accept(EOS) and s.is_terminated()
    assert s.allowed_mask().nonzero().flatten().tolist() == [EOS]
    assert not s.accept(tok.encode("no", add_special_tokens=False)[0]) and s.accept(EOS)


@needs_xgrammar
def test_compile_cache_and_bad_constraints(tok):
    c = so.GrammarCompiler(tok, V, [EOS])
    c.new_state(StructuredOutputsParams(json=SCHEMA))
    c.new_state(StructuredOutputsParams(json=json.dumps(SCHEMA)))
    c.new_state(StructuredOutputsParams(regex=REGEX))
    assert len(c.cache) == 2
    with pytest.raises(ValueError, match=r"structured_outputs.regex does not compile.*parenthesis"):
        c.compile(StructuredOutputsParams(regex="a(b"))
    with pytest.raises(ValueError, match=r"structured_outputs.json does not compile"):
        c.compile(StructuredOutputsParams(json={"type": "objectx"}))
    with pytest.raises(ValueError, match=r"structured_outputs.grammar does not compile"):
        c.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))
    lark = c.new_state(StructuredOutputsParams(grammar='start: "on" | "off"'))  # Lark is read too
    assert lark.sync(tok.encode("off", add_special_tokens=False)) and lark.is_completed()


# -- generation under masks --

@needs_xgrammar
def test_batch_of_32_random_rows_gives_valid_json(compiler, tok):
    """32 rows of random logits, masked by the schema, sampled greedily: every output parses and validates.
    (The model test below checks the same with real logits; random logits reach every corner of the schema.)"""
    jsonschema = pytest.importorskip("jsonschema")
    params = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    B, g = 32, torch.Generator().manual_seed(0)
    states, outputs = [compiler.new_state(params) for _ in range(B)], [[] for _ in range(B)]
    for _ in range(200):
        logits = so.apply_masks(torch.randn(B, V, generator=g) * 3, states)
        for state, out, t in zip(states, outputs, logits.argmax(dim=-1).tolist()):
            if not state.is_terminated():
                assert state.accept(t)
                out.append(t)
        if all(s.is_terminated() for s in states):
            break
    for out in outputs:
        assert out[-1] == EOS
        jsonschema.validate(json.loads(tok.decode(out, skip_special_tokens=True)), SCHEMA)


@pytest.fixture(scope="module")
def llm():
    return minillm.LLM()


def greedy(llm, state, prompt: str, max_tokens: int) -> str:
    """The plainest loop: the whole sequence through the model each step, the mask, argmax, accept."""
    tok = llm.get_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    out = []
    for _ in range(max_tokens):
        with torch.inference_mode():  # as the engine's step runs
            logits = so.apply_masks(llm.prompt_logits(ids + out)[-1:], [state])  # (1, V)
        t = int(logits.argmax())
        assert state.accept(t)
        if t in llm.llm_engine.eos_ids:
            return tok.decode(out)
        out.append(t)
    raise AssertionError(f"no end after {max_tokens} tokens: {tok.decode(out)!r}")


@needs_xgrammar
def test_model_outputs_follow_the_constraints(llm):
    jsonschema = pytest.importorskip("jsonschema")
    tok = llm.get_tokenizer()
    c = so.GrammarCompiler(tok, llm.llm_engine.cfg.vocab_size, llm.llm_engine.eos_ids)
    small = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "role": {"enum": ["admin", "user"]}},
             "required": ["name", "age", "role"], "additionalProperties": False}
    text = greedy(llm, c.new_state(StructuredOutputsParams(json=small, disable_any_whitespace=True)),
                  "Give a person as JSON with name, age and role.", 40)
    jsonschema.validate(json.loads(text), small)
    text = greedy(llm, c.new_state(StructuredOutputsParams(choice=["Paris", "London", "Rome"])), "Capital of France?", 5)
    assert text in ("Paris", "London", "Rome")


# -- logits controls --

class Params:  # stands for a SamplingParams with the new fields
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_controls_validation(tok):
    assert LogitsControls.from_params(Params(), tok, V) is None
    assert LogitsControls.from_params(Params(logit_bias={}, bad_words=[]), tok, V) is None
    with pytest.raises(ValueError, match=r"logit_bias holds ids outside the vocabulary \[0, 49152\): \[49152\]"):
        LogitsControls.from_params(Params(logit_bias={49152: 1.0}), tok, V)
    with pytest.raises(ValueError, match=r"allowed_token_ids holds ids outside .*\[-1\]"):
        LogitsControls.from_params(Params(allowed_token_ids=[5, -1]), tok, V)
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        LogitsControls.from_params(Params(allowed_token_ids=[]), tok, V)
    with pytest.raises(ValueError, match="logit_bias must map token ids to numbers"):
        LogitsControls.from_params(Params(logit_bias={"x": 1.0}), tok, V)
    with pytest.raises(ValueError, match="bad_words must hold non-empty strings"):
        LogitsControls.from_params(Params(bad_words=[""]), tok, V)
    with pytest.raises(ValueError, match="logits_processors: 'f' must take"):
        def f(a):
            return a
        LogitsControls.from_params(Params(logits_processors=[f]), tok, V)
    c = LogitsControls.from_params(Params(logit_bias={"7": 500, 8: -3.5}), tok, V)
    assert c.logit_bias == {7: 100.0, 8: -3.5}  # string keys as ids, clamped to [-100, 100] as vLLM


def test_bad_words_tokenization(tok):
    # vLLM's rule: the word alone, and with a leading space when that is another first token of the same count
    ids = so.bad_words_token_ids(["hello", " world", "unbelievably"], tok, V)
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    for word in ("hello", "world", "unbelievably"):
        assert enc(word) in ids
        spaced = enc(" " + word)
        assert (spaced in ids) == (len(spaced) == len(enc(word)) and spaced[0] != enc(word)[0])
    c = LogitsControls(bad_words_ids=[[5], [10, 11, 12]])
    assert c.banned_tokens([]) == [5] and c.banned_tokens([10]) == [5]
    assert c.banned_tokens([1, 10, 11]) == [5, 12] and c.banned_tokens([10, 11, 3]) == [5]
    assert c.needs_output_ids and not LogitsControls(bad_words_ids=[[5]]).needs_output_ids


def test_apply_logits_controls_equals_reference(tok):
    seen = []

    def two(output_ids, logits):  # the older per-request form, in place
        seen.append(("two", list(output_ids)))
        logits[0] += 1.0
        return logits

    def three(prompt_ids, output_ids, logits):  # with the prompt ids, out of place
        seen.append(("three", list(prompt_ids)))
        return logits * 2

    controls = [None,
                LogitsControls(logit_bias={3: 100.0, 4: -100.0}),
                LogitsControls(allowed_token_ids=[1, 2, 3], bad_words_ids=[[2], [7, 3]]),
                LogitsControls(bad_words_ids=[[7, 8, 9]], processors=[(two, 2), (three, 3)])]
    output_ids, prompt_ids = [[1], [7], [7], [5, 7, 8]], [[0], [0], [0], [42, 43]]
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    want = so.apply_logits_controls_reference(logits, controls, output_ids, prompt_ids)
    seen.clear()
    got = so.apply_logits_controls(logits.clone(), controls, output_ids, prompt_ids)
    assert torch.equal(got, want)
    assert torch.equal(got[0], logits[0])
    assert torch.isinf(got[2]).sum() == 64 - 1 and got[2, 1] == logits[2, 1]  # 2 and 3 banned, only 1 left
    assert got[3, 9] == float("-inf") and seen == [("two", [5, 7, 8]), ("three", [42, 43])]
    assert so.processor_arity(two) == 2 and so.processor_arity(three) == 3
    assert so.apply_logits_controls(logits, [None] * 4, output_ids) is logits


# -- through the engine --


def person_prompts(tok, n):
    names = ["Ada", "Alan", "Grace", "Linus", "Ken", "Dennis", "Barbara", "Edsger"]
    return [tok.apply_chat_template([{"role": "user", "content": f"Describe {names[i % 8]}, person {i}, as a JSON object "
                                      "with name, age, score, role, tags and address."}], add_generation_prompt=True, tokenize=False) for i in range(n)]


@needs_xgrammar
def test_engine_json_schema_batch_of_32(llm):
    jsonschema = pytest.importorskip("jsonschema")
    params = minillm.SamplingParams(temperature=0, max_tokens=150, structured_outputs=StructuredOutputsParams(
        json=SCHEMA, disable_any_whitespace=True))  # compact: half the tokens of the free-whitespace default
    outs = llm.generate(person_prompts(llm.get_tokenizer(), 32), params, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


@needs_xgrammar
def test_engine_regex_choice_n_and_mixed_batch(llm):
    tok = llm.get_tokenizer()
    prompts = person_prompts(tok, 6)
    outs = llm.generate(prompts, minillm.SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=30,
                        guided_decoding=GuidedDecodingParams(regex=r"[A-Z][a-z]{1,8} \d{2}")), use_tqdm=False)
    texts = [c.text for o in outs for c in o.outputs]
    assert all(regex.fullmatch(r"[A-Z][a-z]{1,8} \d{2}", t) for t in texts) and len(set(texts)) > 6
    outs = llm.generate(prompts, minillm.SamplingParams(temperature=0.8, seed=0, max_tokens=10,
                        structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue"])), use_tqdm=False)
    assert all(o.outputs[0].text in ("red", "green", "blue") for o in outs)
    free = minillm.SamplingParams(temperature=0, max_tokens=20)
    number = minillm.SamplingParams(temperature=0, max_tokens=10, structured_outputs=StructuredOutputsParams(regex=r"\d{1,3}"))
    alone = llm.generate(prompts[1::2], free, use_tqdm=False)
    mixed = llm.generate(prompts, [number, free] * 3, use_tqdm=False)
    assert [o.outputs[0].text for o in mixed[1::2]] == [o.outputs[0].text for o in alone]  # untouched rows
    assert all(regex.fullmatch(r"\d{1,3}", o.outputs[0].text) for o in mixed[::2])


@needs_xgrammar
def test_engine_preemption_keeps_the_grammar_state(llm):
    small = minillm.LLM(num_gpu_blocks_override=16)  # 256 token slots for 4 sequences of ~90 tokens
    prompts = person_prompts(llm.get_tokenizer(), 4)
    params = minillm.SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].text for o in small.generate(prompts, params, use_tqdm=False)] == want
    assert small.llm_engine.scheduler.num_preemptions > 0


@needs_xgrammar
def test_engine_logits_controls_and_errors_before_work(llm):
    tok = llm.get_tokenizer()
    p = tok.apply_chat_template([{"role": "user", "content": "Say hello world"}], add_generation_prompt=True, tokenize=False)
    greedy_ = lambda **kw: llm.generate(p, minillm.SamplingParams(temperature=0, max_tokens=8, **kw), use_tqdm=False)[0].outputs[0]
    assert greedy_().text.startswith("Hello") and not greedy_(bad_words=["Hello"]).text.startswith("Hello")
    bang = tok.encode("!", add_special_tokens=False)[0]
    assert greedy_(logit_bias={bang: 100}).token_ids[:3] == [bang] * 3
    assert set(greedy_(allowed_token_ids=[bang, EOS]).token_ids) <= {bang, EOS}
    assert greedy_(logits_processors=[lambda out, logits: logits.index_fill_(0, torch.tensor([bang]), 1e9)]).token_ids[0] == bang
    with pytest.raises(ValueError, match=r"sampling_params 1: structured_outputs.regex does not compile"):
        llm.generate([p, p], [minillm.SamplingParams(), minillm.SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a(b"))], use_tqdm=False)
    with pytest.raises(ValueError, match=r"sampling_params: allowed_token_ids holds ids outside the vocabulary"):
        llm.generate(p, minillm.SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@needs_xgrammar
def test_cli_json_schema_and_regex(tmp_path):
    from test_engine import run_cli
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Rome"]},
                                               "population": {"type": "integer"}}, "required": ["city", "population"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "p.txt").write_text("The capital of France, as JSON:\nThe capital of Italy, as JSON:\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("--prompts", str(tmp_path / "p.txt"), "--json-schema", str(tmp_path / "schema.json"),
                "--max-tokens", "40", "--output", str(out))
    assert r.returncode == 0, r.stderr
    for row in map(json.loads, out.read_text().splitlines()):
        jsonschema.validate(json.loads(row["text"]), schema)
    r = run_cli("--prompts", str(tmp_path / "p.txt"), "--regex", "(yes|no)", "--max-tokens", "5", "--output", str(out))
    assert r.returncode == 0 and [json.loads(x)["text"] for x in out.read_text().splitlines()] != []
    assert all(json.loads(x)["text"] in ("yes", "no") for x in out.read_text().splitlines())
    r = run_cli("--prompts", str(tmp_path / "p.txt"), "--json-schema", str(tmp_path / "p.txt"))
    assert r.returncode == 1 and "not JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- beam search --


def exhaustive_beam_search(llm, prompt, width, steps, length_penalty):
    """The plain reference: every beam extended by every token of the vocabulary, the `width` best kept."""
    score = lambda t, c: c / len(t) ** length_penalty
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        grown = []
        for tokens, cum in beams:
            logprobs = llm.prompt_logits(tokens)[-1].log_softmax(-1)
            grown += [(tokens + [t], cum + logprobs[t].item()) for t in range(len(logprobs))]
        beams = sorted(grown, key=lambda b: score(*b), reverse=True)[:width]
    return beams


def test_beam_search_equals_an_exhaustive_reference(tmp_path):
    from test_engine import VARIANTS, make_checkpoint, random_prompts
    make_checkpoint(str(tmp_path), **VARIANTS["gqa_llama3_tied"], vocab_size=300)
    llm = minillm.LLM(str(tmp_path), block_size=4, num_gpu_blocks_override=128)
    prompts = [[p % 300 for p in x] for x in random_prompts([5, 3], seed=2)]
    for width, penalty in ((2, 1.0), (3, 0.5)):
        params = minillm.BeamSearchParams(beam_width=width, max_tokens=3, ignore_eos=True, length_penalty=penalty)
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        for prompt, out in zip(prompts, outs):
            want = exhaustive_beam_search(llm, prompt, width, 3, penalty)
            assert [b.tokens for b in out.sequences] == [t for t, _ in want]
            assert [b.cum_logprob for b in out.sequences] == pytest.approx([c for _, c in want], abs=1e-4)
            assert all(len(b.logprobs) == 3 for b in out.sequences)
    with pytest.raises(ValueError, match="beam_width"):
        minillm.BeamSearchParams(beam_width=0, max_tokens=3)
