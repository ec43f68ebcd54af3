"""The families beside Llama, on the CPU: Qwen2 (biases on q, k and v), Qwen3 (an RMSNorm over each head's q and k
before RoPE, an explicit head_dim, tied embeddings) and Mistral (the Llama block). Each is a tiny random checkpoint
saved by HF transformers, its biases and q/k norms given random values (HF starts them at 0 and 1, which would hide
a model that skipped them). HF transformers and PEFT are the oracles: greedy tokens, logprobs and prompt logits;
the same tokens under preemption, chunking and prefix caching; a LoRA adapter's logits; tensor_parallel_size=2
(gloo) against 1, also with fewer KV heads than ranks. Other architectures and short sliding windows are refused."""
import json
import os
import shutil

import pytest
import torch

import minillm
from minillm import LLM, LoRARequest, SamplingParams
from parallel import TP
from test_engine import hf_greedy, llama3_tokenizer_json, random_prompts
from test_lora import make_adapter, rel_err
from test_parallel import assert_same, workers

# A small vocabulary keeps the LM head cheap; the prompts are token ids below it (the Llama 3 tokenizer beside the
# checkpoint decodes them). bos/eos are the Llama 3 ids, past this vocabulary: generation never stops on them.
# Weights of std 0.1, not HF's 0.02: with those the layers add little to the residual stream, and greedy decoding
# repeats one token whatever the prompt (Qwen2's biases or Qwen3's tied embeddings win), which proves little.
BASE = dict(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
            bos_token_id=128000, eos_token_id=128001)
FAMILIES = {
    "qwen2": ("Qwen2", dict(tie_word_embeddings=False)),
    # head_dim 32, not hidden_size / heads = 16: q_proj is (128, 64), o_proj (64, 128)
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    # one KV head for 4 query heads: at TP = 2 each rank holds a copy of it (and of its k_norm)
    "qwen3_kv1": ("Qwen3", dict(head_dim=32, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(sliding_window=None, tie_word_embeddings=False)),
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# 24 blocks of 4 slots cannot hold the workload's sequences at once (preemption); a 16-token step budget chunks the
# long prompts. The same cache for TP = 1 and TP = 2.
SMALL = dict(device="cpu", block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=16, enable_lora=True,
             max_loras=1, max_lora_rank=8)
AMPLE = dict(SMALL, num_gpu_blocks_override=256, max_num_batched_tokens=2048)
PROMPTS = random_prompts([5, 23, 9, 31, 2], seed=1)
MAX_TOKENS = 12


def build_family(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of `family` (a FAMILIES key), its q/k/v biases and q/k norm weights random."""
    import transformers
    arch, extra = FAMILIES[family]
    config = getattr(transformers, f"{arch}Config")(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    roughen(model, seed)
    return model


def make_family(folder: str, family: str, seed: int = 0, **overrides):
    """build_family's model saved with save_pretrained, with the Llama 3 tokenizer beside it. Returns the model."""
    model = build_family(family, seed, **overrides)
    model.save_pretrained(folder)
    shutil.copy(llama3_tokenizer_json(), os.path.join(folder, "tokenizer.json"))
    return model


def roughen(model, seed: int) -> None:
    """Random values for what HF initializes to constants: the projections' biases (0) and the q/k norms (1)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # (about a quarter of q's and k's entries)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)


class Family:
    """One family's checkpoint, its HF model, a PEFT adapter on every projection, HF's greedy tokens for PROMPTS,
    and two engines on it: `ample` (room for every sequence) and `small` (SMALL: preemption, the TP = 1 reference)."""

    def __init__(self, name: str, root):
        self.name, self.folder = name, str(root / "base")
        self.hf = make_family(self.folder, name)
        self.peft = make_adapter(self.hf, str(root / "adapter"), seed=3, r=8, lora_alpha=16,
                                 target_modules=ALL_PROJECTIONS)
        self.adapter = LoRARequest("all", 1, str(root / "adapter"))
        self.expected = [hf_greedy(self.hf, p, MAX_TOKENS) for p in PROMPTS]
        self.ample, self.small = LLM(self.folder, **AMPLE), LLM(self.folder, **SMALL)


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


def as_inputs(prompts: list) -> list:
    return [{"prompt_token_ids": p} for p in prompts]


# ---- the checkpoints are what the tests say they are ---------------------------------------------------------


def test_the_config_is_read_as_the_family(fam):
    model, hf = fam.ample.llm_engine.runner.model, fam.hf.config
    cfg, head_dim = model.cfg, getattr(hf, "head_dim", None) or 16  # (Qwen2's config has no head_dim)
    assert (cfg.qkv_bias, cfg.qk_norm) == (fam.name == "qwen2", fam.name.startswith("qwen3"))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, hf.num_key_value_heads, head_dim)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    # tied: one tensor in memory, the lm_head and the embedding share it
    assert (model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()) == hf.tie_word_embeddings


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_the_random_biases_and_norms_change_the_model(family):
    """Without roughen, a model that ignored the biases or the q/k norms would match HF all the same."""
    hf = build_family(family)
    ids = torch.tensor([random_prompts([30])[0]])
    with torch.no_grad():
        rough = hf(ids).logits[0]
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias") or name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(0.0 if name.endswith("bias") else 1.0)
        plain = hf(ids).logits[0]
    assert rel_err(plain, rough) > 1e-2


# ---- (a) tokens, logprobs and logits equal HF's ---------------------------------------------------------------


def test_greedy_tokens_and_logprobs_match_hf(fam):
    # the prompts lead somewhere different, and each goes on for more than one token
    assert len({tuple(t) for t in fam.expected}) == len(PROMPTS) and all(len(set(t)) > 2 for t in fam.expected)
    outs = fam.ample.generate(as_inputs(PROMPTS), greedy(logprobs=5), use_tqdm=False)
    for prompt, want, out in zip(PROMPTS, fam.expected, outs, strict=True):
        got = out.outputs[0]
        assert got.token_ids == want
        with torch.no_grad():  # HF's distribution over each generated token, the prompt and the tokens before it
            logits = fam.hf(torch.tensor([prompt + want])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits.float(), dim=-1)
        for step, (token, lps) in enumerate(zip(want, got.logprobs, strict=True)):
            top5 = set(ref[step].topk(5).indices.tolist())
            assert {t for t, lp in lps.items() if lp.rank <= 5} == top5 and token in lps
            assert all(abs(lp.logprob - ref[step, t].item()) < 1e-4 for t, lp in lps.items())


def test_prompt_logits_match_hf(fam):
    ids = random_prompts([45], seed=4)[0]
    with torch.no_grad():
        ref = fam.hf(torch.tensor([ids])).logits[0]
    got = fam.ample.prompt_logits(ids)
    assert got.shape == ref.shape and rel_err(got, ref) < 1e-4


# ---- (b) the same tokens under preemption and chunking, and with prefix caching -------------------------------


def test_greedy_under_preemption_and_chunking(fam):
    scheduler = fam.small.llm_engine.scheduler
    before = scheduler.num_preemptions
    outs = fam.small.generate(as_inputs(PROMPTS), greedy(), use_tqdm=False)
    assert scheduler.num_preemptions > before
    assert [o.outputs[0].token_ids for o in outs] == fam.expected
    assert len(fam.small.llm_engine.block_manager.free_block_ids) == 24  # every block is free again


def test_greedy_with_prefix_caching(fam):
    # four prompts on one 17-token prefix: after the first, each finds the prefix's 4 full blocks of 4 in the cache
    prefix, tails = random_prompts([17], seed=6)[0], random_prompts([3, 8, 1, 5], seed=7)
    prompts = [prefix + tail for tail in tails]
    want = [hf_greedy(fam.hf, p, MAX_TOKENS) for p in prompts]
    first = fam.ample.generate(as_inputs(prompts[:1]), greedy(), use_tqdm=False)
    rest = fam.ample.generate(as_inputs(prompts[1:]), greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == want
    assert [o.num_cached_tokens for o in rest] == [16] * 3


# ---- (c) a LoRA adapter's logits equal PEFT's --------------------------------------------------------------------


def test_lora_logits_and_tokens_match_peft(fam):
    ids = random_prompts([37], seed=8)[0]
    with torch.no_grad():
        base, ref = fam.hf(torch.tensor([ids])).logits[0], fam.peft(torch.tensor([ids])).logits[0]
    assert rel_err(ref, base) > 1e-2  # the adapter really changes the model
    assert rel_err(fam.ample.prompt_logits(ids, lora_request=fam.adapter), ref) < 1e-4
    assert rel_err(fam.ample.prompt_logits(ids), base) < 1e-4  # and requests without it see the base model
    out = fam.ample.generate(as_inputs(PROMPTS[:2]), greedy(), lora_request=fam.adapter, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [hf_greedy(fam.peft, p, MAX_TOKENS) for p in PROMPTS[:2]]


# ---- (d) tensor_parallel_size=2 equals 1 -------------------------------------------------------------------------


def test_a_rank_holds_its_heads_biases_and_whole_norms(fam):
    """TP.part's shape with this rank's slice of every bias; the q/k norms whole on both ranks."""
    full = {k.removeprefix("model."): v for k, v in fam.hf.state_dict().items()}
    cfg = fam.ample.llm_engine.runner.model.cfg
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for rank in (0, 1):
        attn = minillm.load_model(fam.folder, "cpu", torch.float32, None, tp=TP(rank, 2))[0].layers[1].self_attn
        assert (attn.H, attn.KVH, attn.D) == (H // 2, max(1, KVH // 2), D)
        q_rows = slice(rank * H // 2 * D, (rank + 1) * H // 2 * D)
        kv_rows = slice(rank * KVH // 2 * D, rank * KVH // 2 * D + attn.KVH * D)  # one KV head: both ranks' copy
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            bias = getattr(attn, proj).bias
            if cfg.qkv_bias:
                assert torch.equal(bias, full[f"layers.1.self_attn.{proj}.bias"][rows])
            else:
                assert bias is None
        for norm in ("q_norm", "k_norm"):
            if cfg.qk_norm:
                assert torch.equal(getattr(attn, norm).weight, full[f"layers.1.self_attn.{norm}.weight"])
            else:
                assert getattr(attn, norm) is None


def test_tp2_equals_tp1_with_and_without_an_adapter(fam):
    """The workers load their shard of every bias and norm: the same tokens and logprobs as one process, under
    preemption and chunking, with rows of the adapter and of the base model in the same steps."""
    params = greedy(logprobs=3)
    loras = [fam.adapter, None, fam.adapter, None, None]
    want = fam.small.generate(as_inputs(PROMPTS), params, lora_request=loras, use_tqdm=False)
    ids = random_prompts([29], seed=9)[0]
    with LLM(fam.folder, tensor_parallel_size=2, **SMALL) as tp2:
        assert len(workers()) == 1
        got = tp2.generate(as_inputs(PROMPTS), params, lora_request=loras, use_tqdm=False)
        logits = tp2.prompt_logits(ids)
    assert workers() == []
    assert_same(got, want)
    base_rows = [i for i, lora in enumerate(loras) if lora is None]
    assert [got[i].outputs[0].token_ids for i in base_rows] == [fam.expected[i] for i in base_rows]  # HF's tokens
    assert (logits - fam.small.prompt_logits(ids)).abs().max().item() < 1e-4


def test_a_bias_on_a_row_parallel_projection_is_refused_under_tp():
    """formats refuses o_proj and MLP biases; should one get through, the all-reduce would add it tp times."""
    cfg = minillm.ModelConfig(vocab_size=2048, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                              num_kv_heads=2, qkv_bias=True)
    cut = TP(1, 2).cut(cfg)
    assert torch.equal(cut("layers.0.self_attn.k_proj.bias", torch.arange(32.0)), torch.arange(16.0, 32.0))
    with pytest.raises(ValueError, match="layers.0.self_attn.o_proj.bias: a bias on a row-parallel projection"):
        cut("layers.0.self_attn.o_proj.bias", torch.zeros(64))


# ---- (e) what minillm does not run is refused by name ------------------------------------------------------------


def patch_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    make_family(str(tmp_path), "mistral")
    patch_config(str(tmp_path), model_type="gemma", architectures=["GemmaForCausalLM"])
    with pytest.raises(ValueError, match=r"model_type='gemma' is not supported; minillm runs llama, mistral, qwen2, "
                                         r"qwen3$"):
        LLM(str(tmp_path), device="cpu", num_gpu_blocks_override=16)


@pytest.mark.parametrize("family, window", [("mistral", dict(sliding_window=64)),
                                            ("qwen2", dict(use_sliding_window=True, sliding_window=64))])
def test_a_sliding_window_shorter_than_the_context_is_refused(family, window, tmp_path):
    make_family(str(tmp_path), family, **window)
    with pytest.raises(ValueError, match=rf"model_type='{family}' with a sliding window of 64 tokens \(shorter than "
                                         rf"max_position_embeddings=512\) is not supported"):
        LLM(str(tmp_path), device="cpu", num_gpu_blocks_override=16)


def test_a_mistral_window_as_long_as_the_context_is_full_attention(tmp_path):
    """Mistral 7B v0.1's config.json names a window; one that covers the whole context changes nothing."""
    hf = make_family(str(tmp_path), "mistral", sliding_window=512)
    llm = LLM(str(tmp_path), device="cpu", num_gpu_blocks_override=64)
    assert llm.generate(as_inputs(PROMPTS[1:2]), greedy(), use_tqdm=False)[0].outputs[0].token_ids == \
        hf_greedy(hf, PROMPTS[1], MAX_TOKENS)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_stacked_projections_equal_separate(tmp_path, family):
    """load_model stacks q/k/v into one weight (stack_projections): the same outputs as the projections one by one
    (the slow reference), and each projection's weight a view of the stacked rows."""
    make_family(str(tmp_path), family)
    model, cfg, _ = minillm.load_model(str(tmp_path), "cpu", "float32", 64)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    weight, bias, widths = attn.q_proj.stacked
    assert widths == [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    assert attn.k_proj.weight.data_ptr() == weight[widths[0]:].data_ptr()  # a view: no second copy
    assert (bias is not None) == (family == "qwen2")
    x = torch.randn(7, cfg.hidden_size)
    assert getattr(mlp.gate_proj, "stacked", None) is None  # gate/up stay apart (separate GEMMs measured faster)
    for projs in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        stacked = minillm.project(projs, x, None)
        separate = [torch.nn.functional.linear(x, p.weight, p.bias) for p in projs]
        assert [y.shape for y in stacked] == [y.shape for y in separate]
        for a, b in zip(stacked, separate):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
