"""vLLM scripts run with only the import changed (issue 15), the parts outside the engine: the tokenizer's HF
surface (transformers is the oracle), hub ids resolved from a Hugging Face cache laid out on disk, EngineArgs and
its command line, generation_config.json defaults, hf_overrides, and `import minillm` from the clone's parent."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

import minillm
from test_engine import llama3_tokenizer_json, make_checkpoint
from test_tokenizer import SMOL_GGUF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- the tokenizer, call for call against transformers -----------------------------------------

# Llama 3-style, with tools and a template variable (vLLM's chat_template_kwargs) it reads
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools: {{ tools | tojson }}<|eot_id|>"
    "{% endif %}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    "{% if enable_thinking %}<think>{% endif %}")
# one that loops over OpenAI-style content parts itself
PARTS_TEMPLATE = ("{% for message in messages %}{{ message.role }}:{% for part in message.content %} [{{ part.text }}]"
                  "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! ünïcödé , ok ?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2 = ?"}]
PREFILL = CONVERSATION + [{"role": "assistant", "content": "The answer is "}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """Llama 3's tokenizer.json with a tokenizer_config.json naming BOS, EOS and a pad token and holding a chat
    template; clean_up_tokenization_spaces as Meta's Llama 3 repositories set it (transformers 5 ignores it for BPE)."""
    folder = tmp_path_factory.mktemp("llama3tok")
    shutil.copy(llama3_tokenizer_json(), folder / "tokenizer.json")
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|reserved_special_token_0|>",
               "clean_up_tokenization_spaces": True, "chat_template": LLAMA3_TEMPLATE,
               "tokenizer_class": "PreTrainedTokenizerFast"}, open(folder / "tokenizer_config.json", "w"))
    return str(folder)


@pytest.fixture(scope="module", params=["llama3_folder", "smollm2_gguf"])
def pair(request, llama3_folder):
    """(ours, transformers') for one tokenizer."""
    from transformers import AutoTokenizer
    if request.param == "llama3_folder":
        return minillm.load_tokenizer(llama3_folder), AutoTokenizer.from_pretrained(llama3_folder)
    path = SMOL_GGUF()
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return minillm.load_tokenizer(path), hf


TEXTS = ["Hello world", " leading, and trailing . ", "Emoji 😀 and 日本語", "<|im_start|>user\nHi<|im_end|>\n",
         "<|begin_of_text|>x<|eot_id|>", "I'm sure it 's don't ?"]


def test_special_token_facts_match_transformers(pair):
    ours, hf = pair
    for name in ("vocab_size", "bos_token", "bos_token_id", "eos_token", "eos_token_id", "pad_token", "pad_token_id",
                 "unk_token", "unk_token_id", "all_special_tokens", "all_special_ids"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()


def test_call_encode_decode_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            got, want = ours(text, add_special_tokens=special), hf(text, add_special_tokens=special)
            assert isinstance(got, dict) and dict(got) == dict(want) and got.input_ids == want.input_ids
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)  # HF's default keeps special tokens
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids[0]) == hf.decode(ids[0])
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids[-1]) == hf.convert_ids_to_tokens(ids[-1])
        tokens = hf.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(tokens) == ids and ours.convert_tokens_to_ids(tokens[0]) == ids[0]
    batch = ours(TEXTS[:3]).input_ids
    assert batch == hf(TEXTS[:3]).input_ids and ours(TEXTS[:3]).attention_mask == hf(TEXTS[:3]).attention_mask
    assert ours.batch_decode(batch) == hf.batch_decode(batch)
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids("no such token ~~") == hf.convert_tokens_to_ids("no such token ~~")


def hf_ids(hf, conversation, **kw):  # transformers 5 returns a BatchEncoding by default, 4 (vLLM's) the ids
    return hf.apply_chat_template(conversation, return_dict=False, **kw)


def test_apply_chat_template_defaults_and_options_match_transformers(pair):
    ours, hf = pair
    # HF's defaults: token ids, no generation prompt
    assert ours.apply_chat_template(CONVERSATION) == hf_ids(hf, CONVERSATION)
    for kw in (dict(add_generation_prompt=True), dict(tools=TOOLS), dict(enable_thinking=True),
               dict(continue_final_message=True)):
        conversation = PREFILL if "continue_final_message" in kw else CONVERSATION
        assert ours.apply_chat_template(conversation, tokenize=False, **kw) == \
            hf.apply_chat_template(conversation, tokenize=False, **kw), kw
        assert ours.apply_chat_template(conversation, **kw) == hf_ids(hf, conversation, **kw), kw
    got, want = ours.apply_chat_template(CONVERSATION, return_dict=True), hf.apply_chat_template(CONVERSATION, return_dict=True)
    assert got.input_ids == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
    both = [CONVERSATION, PREFILL]  # a batch of conversations
    assert ours.apply_chat_template(both, tokenize=False) == hf.apply_chat_template(both, tokenize=False)
    text = ours.apply_chat_template(PREFILL, tokenize=False, continue_final_message=True)
    assert text.endswith(("The answer is", "The answer is "))  # nothing after the message: no end-of-turn token
    with pytest.raises(ValueError, match="add_generation_prompt and continue_final_message"):
        ours.apply_chat_template(PREFILL, add_generation_prompt=True, continue_final_message=True)


def test_content_parts_are_joined_or_kept_as_the_template_expects(pair):
    ours, hf = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hi\nthere"}]
    # a template that prints message.content gets the text parts joined by newlines, as vLLM's chat() does
    assert ours.apply_chat_template(parts, tokenize=False) == hf.apply_chat_template(joined, tokenize=False)
    # one that loops over the parts gets them as they are
    assert ours.apply_chat_template(parts, chat_template=PARTS_TEMPLATE, tokenize=False) == \
        hf.apply_chat_template(parts, chat_template=PARTS_TEMPLATE, tokenize=False) == "user: [Hi] [there]"  # (trim_blocks ate the newline)
    with pytest.raises(ValueError, match="message 0: content part of type 'image_url' is not supported"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])

