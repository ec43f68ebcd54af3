"""GGUF files of the llama, qwen2 and qwen3 architectures: a tiny random HF checkpoint written as llama.cpp's
converter writes it (metadata under the architecture's prefix, its tensor names, Q/K rows permuted for llama only)
gives the same greedy tokens and logprobs as the safetensors folder and as HF transformers."""
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from minillm import LLM, SamplingParams
from test_engine import LLAMA3_VOCAB, hf_greedy, llama3_tokenizer_json, random_prompts

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}

FAMILIES = {
    # GQA, untied: the Q/K permutation of llama.cpp's LlamaModel, undone on reading
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False),
    # biases on q, k and v; Qwen's large RoPE base
    "qwen2": dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False),
    # per-head q/k norms, head_dim from the config (not hidden_size / heads), tied embeddings
    "qwen3": dict(num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
}


def make_family_checkpoint(folder, family: str, seed=0, **overrides):
    """A tiny random model of `family` (transformers' own classes), saved with save_pretrained beside the Llama 3
    tokenizer. Every norm weight and bias is random: HF initialises them to ones and zeros, which would hide a
    bias or a q/k norm that is read into the wrong place."""
    import transformers
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    cfg = dict(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=128000,
               eos_token_id=128001, **FAMILIES[family])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**cfg)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") or "norm" in pname:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in pname else 0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    shutil.copy(llama3_tokenizer_json(), os.path.join(folder, "tokenizer.json"))
    return model


def llama3_vocab() -> tuple[list[str], list[int]]:
    """The Llama 3 tokenizer.json's tokens in id order and their GGUF token types (its added tokens are CONTROL)."""
    with open(llama3_tokenizer_json(), encoding="utf-8") as f:
        tj = json.load(f)
    tokens = dict((i, s) for s, i in tj["model"]["vocab"].items()) | {t["id"]: t["content"] for t in tj["added_tokens"]}
    added = {t["id"] for t in tj["added_tokens"]}
    types = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))]
    return [tokens[i] for i in range(len(tokens))], types


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's rows from HF's rotary halves to
    interleaved pairs, for llama.cpp's LLAMA_ROPE_TYPE_NORM. Qwen2/Qwen3 (NEOX RoPE) are written unpermuted."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, vocab=None, strings=None):
    """model (a transformers ...ForCausalLM) as a GGUF file of architecture `arch`, F32 tensors, as llama.cpp's
    converter lays it out: metadata keys under `arch.`, tensor names from the gguf package's TensorNameMap, the
    tokenizer as tokenizer.ggml.* (a gpt2-style BPE vocabulary, llama-bpe pre-tokenizer; vocab: (tokens, types),
    by default Llama 3's; strings: more string-valued keys). The merges are left out: minillm ranks tokens by id
    and does not read them."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for key, value in (strings or {}).items():
        w.add_string(key, value)
    tokens, types = vocab or llama3_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    names = gguf.get_tensor_name_map(ARCHS[arch], c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # (a tied model has no output.weight)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_permute(t, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = make_family_checkpoint(str(folder), request.param)
    path = tmp_path_factory.mktemp(f"{request.param}_gguf") / "model.gguf"
    write_gguf(path, model, request.param)
    return request.param, str(folder), str(path), model


def test_gguf_config_is_the_safetensors_config(family):
    arch, folder, path, _ = family
    from_gguf = LLM(path, device="cpu").llm_engine.cfg
    from_folder = LLM(folder, device="cpu").llm_engine.cfg
    assert (from_gguf.qkv_bias, from_gguf.qk_norm) == (arch == "qwen2", arch == "qwen3")
    assert from_gguf.head_dim == (32 if arch == "qwen3" else 16)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "qkv_bias", "qk_norm"):
        assert getattr(from_gguf, field) == getattr(from_folder, field), field
    assert from_gguf.rms_norm_eps == pytest.approx(from_folder.rms_norm_eps)


def test_gguf_greedy_tokens_and_logprobs_match_safetensors_and_hf(family):
    arch, folder, path, hf = family
    prompts = random_prompts([6, 21, 2], seed=3)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs = {src: LLM(src, device="cpu", block_size=4).generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                               use_tqdm=False) for src in (path, folder)}
    for p, from_gguf, from_folder in zip(prompts, outs[path], outs[folder]):
        tokens = from_gguf.outputs[0].token_ids
        assert tokens == from_folder.outputs[0].token_ids == hf_greedy(hf, p, 10)
        for t, a, b in zip(tokens, from_gguf.outputs[0].logprobs, from_folder.outputs[0].logprobs):
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


def test_gguf_prompt_logits_match_hf(family):
    arch, _, path, hf = family
    ids = random_prompts([33], seed=4)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = LLM(path, device="cpu").prompt_logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as e:
        LLM(str(path), device="cpu")
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert "gemma.gguf: general.architecture='gemma2' is not supported; minillm runs llama, qwen2, qwen3" in message


def test_gguf_rope_scaling_minillm_does_not_implement_is_refused(family, tmp_path):
    arch, _, _, model = family
    path = tmp_path / "yarn.gguf"
    write_gguf(path, model, arch, strings={f"{arch}.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError) as e:
        LLM(str(path), device="cpu")
    assert str(e.value) == f"{path}: {arch}.rope.scaling.type='yarn' is not supported (none, linear are)"
