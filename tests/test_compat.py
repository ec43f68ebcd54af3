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
from minillm import EngineArgs, FlexibleArgumentParser
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



# ---- hub ids: a Hugging Face cache laid out on disk -----------------------------------------------

def lay_out_cache(cache, repo_id, refs: dict, files=("config.json",)):
    """cache/models--org--name/snapshots/{commit}/ with `files`, and refs/{name} holding a commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, commit in refs.items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        for f in files:
            (repo / "snapshots" / commit / f).write_text("{}")
    return repo / "snapshots"


@pytest.fixture
def hub_env(monkeypatch):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


MAIN, TAGGED = "a" * 40, "b" * 40


def test_hub_id_resolves_from_the_cache(hub_env, tmp_path):
    snapshots = lay_out_cache(tmp_path / "hub", "org/tiny", {"main": MAIN, "v1.0": TAGGED})
    hub_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert minillm.resolve_model("org/tiny") == str(snapshots / MAIN)  # refs/main
    assert minillm.resolve_model("org/tiny", revision="v1.0") == str(snapshots / TAGGED)  # a tag's ref
    assert minillm.resolve_model("org/tiny", revision=TAGGED) == str(snapshots / TAGGED)  # a commit
    hub_env.delenv("HF_HUB_CACHE")
    hub_env.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub
    assert minillm.resolve_model("org/tiny") == str(snapshots / MAIN)
    hub_env.delenv("HF_HOME")
    hub_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default: ~/.cache/huggingface/hub
    ggufs = lay_out_cache(tmp_path / "xdg" / "huggingface" / "hub", "org/tiny-GGUF", {"main": MAIN}, ["model.Q4_1.gguf"])
    assert minillm.resolve_model("org/tiny-GGUF") == str(ggufs / MAIN / "model.Q4_1.gguf")  # the file itself
    other = lay_out_cache(tmp_path / "mine", "org/tiny", {"main": TAGGED})
    assert minillm.resolve_model("org/tiny", download_dir=str(tmp_path / "mine")) == str(other / TAGGED)
    assert minillm.resolve_model(str(snapshots / MAIN)) == str(snapshots / MAIN)  # a path is itself


def test_hub_id_not_in_the_cache_says_what_to_do(hub_env, tmp_path):
    lay_out_cache(tmp_path, "org/tiny", {"main": MAIN})
    hub_env.setenv("HF_HUB_CACHE", str(tmp_path))
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'org/other' is not in the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        minillm.resolve_model("org/other")
    with pytest.raises(FileNotFoundError, match=r"'org/tiny' at revision 'v9' is not in the Hugging Face cache"):
        minillm.resolve_model("org/tiny", revision="v9")
    hub_env.delenv("HF_HUB_OFFLINE")
    hub_env.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match="pip install huggingface_hub"):
        minillm.resolve_model("org/other")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        minillm.resolve_model(str(tmp_path / "nowhere"))


def test_hub_id_downloads_with_huggingface_hub(hub_env, tmp_path):
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if repo_id == "org/gated":
            raise PermissionError("401 Client Error\nthis repository is gated")
        return str(lay_out_cache(tmp_path, repo_id, {"main": MAIN}) / MAIN)
    hub_env.setitem(sys.modules, "huggingface_hub", argparse.Namespace(snapshot_download=snapshot_download))
    hub_env.setenv("HF_HUB_CACHE", str(tmp_path))
    path = minillm.resolve_model("org/new", revision="main")
    assert path.endswith(MAIN) and calls[0][0] == "org/new" and calls[0][1]["revision"] == "main"
    assert calls[0][1]["allow_patterns"] == ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    with pytest.raises(FileNotFoundError, match="downloading it failed: PermissionError: 401 Client Error$"):
        minillm.resolve_model("org/gated")


# ---- EngineArgs and the command line ---------------------------------------------------------

def test_engine_args_have_vllms_names_and_defaults():
    a = EngineArgs()
    assert (a.seed, a.tensor_parallel_size, a.generation_config, a.tokenizer_mode, a.load_format, a.dtype) == \
        (0, 1, "auto", "auto", "auto", "auto")
    assert (a.gpu_memory_utilization, a.max_logprobs, a.max_loras, a.max_lora_rank, a.swap_space, a.enforce_eager) == \
        (0.9, 20, 1, 16, 4, False)
    # what the issue's scripts pass, at the values they pass
    EngineArgs(model="m", tensor_parallel_size=1, generation_config="vllm", hf_overrides={"rope_theta": 1e6},
               tokenizer_mode="auto", load_format="safetensors", config_format="auto", trust_remote_code=True,
               disable_log_stats=True, max_cpu_loras=8, compilation_config={"level": 3},
               distributed_executor_backend="mp", quantization=None, cpu_offload_gb=0, logits_processors=[])
    EngineArgs(device=None)  # minillm's own spelling of "auto" (its command line passes it)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):  # a name vLLM does not have
        EngineArgs(max_tokens=16)


@pytest.mark.parametrize("name, value", [
    ("quantization", "awq"), ("data_parallel_size", 2), ("pipeline_parallel_size", 2), ("kv_cache_dtype", "fp8"),
    ("load_format", "pt"), ("tokenizer_mode", "mistral"), ("config_format", "mistral"),
    ("distributed_executor_backend", "ray"), ("enable_chunked_prefill", False), ("logprobs_mode", "processed_logprobs"),
    ("speculative_config", {"method": "ngram"}), ("dtype", "float8"),
])
def test_engine_args_refuse_what_minillm_cannot_honour(name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value!r} is not supported".replace("[", r"\[").replace("{", r"\{")):
        EngineArgs(**{name: value})


@pytest.mark.parametrize("kw, match", [(dict(block_size=12), "block_size must be a power of two"),
                                       (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                                       (dict(max_num_seqs=0), "max_num_seqs must be at least 1"),
                                       (dict(generation_config="/no/such/folder"), "generation_config must be"),
                                       (dict(hf_overrides="rope"), "hf_overrides must be a dict")])
def test_engine_args_validate_values(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kw)


def test_cli_args_in_vllms_spelling():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "org/tiny", "--max_model_len=512", "-tp", "1", "--enforce-eager",
                              "--no-enable-prefix-caching", "--hf-overrides", '{"rope_theta": 500000.0}',
                              "--gpu_memory_utilization", "0.5", "--max-num-seqs", "None", "--trust-remote-code",
                              "--compilation-config", "3"])
    want = EngineArgs(model="org/tiny", max_model_len=512, enforce_eager=True, enable_prefix_caching=False,
                      hf_overrides={"rope_theta": 500000.0}, gpu_memory_utilization=0.5, trust_remote_code=True,
                      compilation_config=3)
    assert EngineArgs.from_cli_args(args) == want == EngineArgs(**vars(args))  # as LLM(**vars(args)) builds it
    assert EngineArgs.from_cli_args(parser.parse_args([])) == EngineArgs()  # the flags' defaults are the fields'
    assert EngineArgs.from_cli_args(parser.parse_args(["-tp", "2"])).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported"):
        EngineArgs.from_cli_args(parser.parse_args(["--pipeline-parallel-size", "2"]))


# ---- generation_config.json and hf_overrides ----------------------------------------------------

def test_generation_config_gives_the_default_sampling_params(tmp_path):
    json.dump({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0,
               "max_new_tokens": 100, "eos_token_id": [1, 2], "min_p": None}, open(tmp_path / "generation_config.json", "w"))
    # top_k 50 and repetition_penalty 1.0 are transformers' defaults: vLLM does not take them
    assert minillm.default_sampling_params(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 100}
    assert minillm.default_sampling_params(str(tmp_path), "auto", {"temperature": 0.2, "min_p": 0.1}) == \
        {"temperature": 0.2, "top_p": 0.9, "max_tokens": 100, "min_p": 0.1}
    assert minillm.default_sampling_params(str(tmp_path), "vllm") == {}
    assert minillm.default_sampling_params(str(tmp_path), "vllm", {"top_k": 5}) == {"top_k": 5}
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert minillm.default_sampling_params(str(elsewhere)) == {}  # no generation_config.json
    assert minillm.default_sampling_params(str(elsewhere), str(tmp_path))["temperature"] == 0.6  # a folder's
    assert minillm.default_sampling_params(SMOL_GGUF()) == {}  # a GGUF file has none
    minillm.SamplingParams(**minillm.default_sampling_params(str(tmp_path)))


def test_hf_overrides_patch_the_config(tmp_path):
    from safetensors.torch import save_file
    import torch
    json.dump({"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "rope_theta": 10000.0, "max_position_embeddings": 128},
              open(tmp_path / "config.json", "w"))
    layer = {"input_layernorm.weight": (4,), "post_attention_layernorm.weight": (4,), "self_attn.q_proj.weight": (4, 4),
             "self_attn.k_proj.weight": (4, 4), "self_attn.v_proj.weight": (4, 4), "self_attn.o_proj.weight": (4, 4),
             "mlp.gate_proj.weight": (8, 4), "mlp.up_proj.weight": (8, 4), "mlp.down_proj.weight": (4, 8)}
    tensors = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}
    save_file({name: torch.zeros(shape) for name, shape in {**tensors, **{f"model.layers.0.{n}": s for n, s in layer.items()}}.items()},
              str(tmp_path / "model.safetensors"))
    load = lambda overrides: minillm.load_hf_checkpoint(str(tmp_path), "cpu", torch.float32, overrides)[0]
    assert (load(None).rope_theta, load(None).max_position_embeddings) == (10000.0, 128)
    cfg = load({"rope_theta": 500000.0, "max_position_embeddings": 64})
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.num_heads) == (500000.0, 64, 2)

    def longer(config):  # vLLM passes a PretrainedConfig: attributes, returned changed
        config.max_position_embeddings *= 4
        return config
    assert load(longer).max_position_embeddings == 512
    with pytest.raises(ValueError, match="model_type='gemma' is not supported; minillm runs llama, mistral, qwen2"):
        load({"model_type": "gemma"})


# ---- `pip install -e .` gives a working `import minillm` from any folder ----------------------------

def _site_dirs():
    """The folders this interpreter (the one running the tests: a venv, a conda env, the system's) imports installed
    packages from: its site-packages, the user site, and sysconfig's purelib/platlib, those that exist."""
    import site
    import sysconfig
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    out = []
    for d in dirs:
        if d and os.path.isdir(d) and os.path.realpath(d) not in map(os.path.realpath, out):
            out.append(d)
    return out


def _venv_that_sees_this_environment(venv):
    """A fresh venv (no --system-site-packages: that flag shows the *base* interpreter's packages, which are not
    those of the environment the tests run in) whose site-packages holds a .pth file naming this environment's
    package folders, so torch, pip and setuptools are the ones installed here. Plain folder lines: the .pth files
    inside those folders (an editable minillm installed here, say) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "zz_test_environment.pth"), "w") as f:
        f.write("\n".join(_site_dirs()) + "\n")
    return python


@pytest.mark.packaging
def test_import_minillm_from_the_folder_that_holds_the_clone(tmp_path):
    """`git clone ... minillm; pip install -e minillm; python script.py` beside the clone: the folder minillm/ must
    not shadow the module as an empty namespace package. Builds a venv that sees this environment's packages
    (torch, setuptools, pip) and installs the project's files into it offline."""
    import importlib.util
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("needs setuptools and pip (the [test] extra has them)")
    clone = tmp_path / "minillm"
    clone.mkdir()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the [test] extra installs tomli there
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        modules = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    for name in ["pyproject.toml", "README.md"] + [m + ".py" for m in modules]:
        shutil.copy(os.path.join(ROOT, name), clone / name)
    python = _venv_that_sees_this_environment(tmp_path / "venv")
    env = {**os.environ, "PYTHONPATH": "", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-e", str(clone)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    script = "import minillm; from minillm import LLM, SamplingParams; print(minillm.__file__)"
    for folder in (tmp_path, tmp_path / "venv"):  # the clone's parent, and anywhere else
        r = subprocess.run([python, "-c", script], cwd=folder, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(clone / "minillm.py")
