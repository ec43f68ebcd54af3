"""
minillm: vLLM's offline batch generation for Llama-family models, written to be read top to bottom.

The contract is vLLM's offline API: `LLM(model).generate(prompts, sampling_params)` takes a batch of prompts and
returns one `RequestOutput` per prompt, in input order. Code written for `from vllm import LLM, SamplingParams`
runs here with only the import changed.

This file is the core: what one generate call on one device needs, in the order data flows.
  1. configs        ModelConfig (the checkpoint's shape), SamplingParams, the output classes
  2. loading        HF folders (config.json + safetensors) and GGUF files, straight to the device
  3. tokenizer      every tokenizer is a tiktoken Encoding; incremental detokenization
  4. model          Llama (and Mistral, Qwen2, Qwen3): RMSNorm, RoPE, GQA over the paged KV cache, SwiGLU
  5. KV cache       blocks of block_size token slots, block tables, a BlockManager with prefix caching
  6. sampler        penalties, greedy / temperature / top-k / top-p / min-p, logprobs; batched on the device
  7. scheduler      continuous batching with chunked prefill and preemption by recompute
  8. model runner   the device side: KV cache sizing, CUDA graphs, a step's inputs in, sampled tokens out
  9. engine         LLMEngine (requests, steps, landing tokens, outputs) and LLM.generate
 10. generate()     one call for small scripts

Every other feature lives in a companion file that attaches at a seam named here; of them this file imports only
formats and paged_attention at load time (`companion(name)` imports the others when their feature is first used):
  project()           every decoder layer's linear call; lora.py adds each token's adapter delta there (LoRA slots)
  load_model(tp=)     parallel.TP cuts each tensor to this rank's part and wraps the model; parallel.TPModelRunner
                      is the ModelRunner of rank 0 that drives the other ranks (parallel.py: tensor, data parallel)
  logits hook         structured.LogitsHook edits the sampling rows' logits (grammars, logit_bias, processors)
  Observer            hears every event of the engine: compat.Metrics (get_metrics), timeline.Recorder (traces)
  compat.py           vLLM's EngineArgs and input checks, hub ids, chat, beam search, the HF tokenizer calls
                      (Tokenizer.hf), the rest of LLM's and LLMEngine's calls (each a one-line method here)
  formats.py          the bytes of config.json, GGUF and tokenizer files; cli.py the command line
  paged_attention.py  attention's Triton kernels and their PyTorch twins; fused.py the elementwise ones (`fused`)
vLLM's other names (`from minillm import EngineArgs, TokensPrompt`) are found in the companions (PEP 562).

Dimension legend used in shape comments:
  N           tokens in one engine step (the new tokens of every scheduled sequence, packed)
  B           sequences in one engine step;  S of them sample a token;  P prompt positions scored (prompt_logprobs)
  C           hidden size;  F  MLP intermediate size;  V  vocab size
  H, KVH, D   query heads, key/value heads (H % KVH == 0: grouped-query attention), head dim
  num_blocks  blocks in the KV cache;  block_size: token slots per block

References: vLLM and PagedAttention (Kwon et al. 2023, arXiv:2309.06180); Llama (arXiv:2302.13971);
RoPE (arXiv:2104.09864); GQA (arXiv:2305.13245); nanoGPT, llama2.c, gpt-fast and nano-vllm for style.
"""
from __future__ import annotations

import bisect
import codecs
import collections
import copy
import functools
import hashlib
import importlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Callable, Optional


if __name__ == "__main__":  # `python minillm.py --prompts file.txt`: the command line is cli.py's. Handing over
    import cli  # here, before torch loads, makes --help answer at once; cli imports this file as the module
    sys.exit(cli.main())  # `minillm`, so there is one copy of every class (the one tensor-parallel workers import)

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import formats  # the bytes of checkpoint and tokenizer files (it imports nothing of minillm)
import paged_attention as pa


# Most companions import minillm, so minillm imports them when a feature is first used (formats, above, does not).
COMPANIONS = ("compat", "structured", "lora", "parallel", "formats", "timeline", "cli")


def companion(name: str):
    """A companion module, imported when first used."""
    return importlib.import_module(name)


def __getattr__(name: str):  # (of the private names, only __version__: compat reads it from pyproject.toml)
    for module in COMPANIONS if name == "__version__" or not name.startswith("_") else ():
        if hasattr(companion(module), name):
            return getattr(companion(module), name)
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")

# ----------------------------------------------------------------------------------------------
# 1. Configs


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int                 # C
    intermediate_size: int           # F
    num_layers: int
    num_heads: int                   # H
    num_kv_heads: int                # KVH
    head_dim: int = 0                # D; 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None    # None, {"rope_type": "linear"|"llama3", ...}
    rope_freq_factors: Optional[list] = None  # GGUF's rope_freqs tensor (llama3 scaling, precomputed)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    eos_token_ids: tuple = ()        # from config.json / generation_config.json
    qkv_bias: bool = False           # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False            # Qwen3: an RMSNorm over each head's q and k, before RoPE

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


SAMPLING_EPS = 1e-5     # vLLM's: a temperature below it is greedy
CUMULATIVE, FINAL_ONLY = 0, 2  # vLLM's RequestOutputKind (compat.py): every step's output so far, or the last only


@dataclass
class SamplingParams:
    """How to sample one request; vLLM's names, defaults and validation rules."""
    n: int = 1                       # completions per prompt
    temperature: float = 1.0         # 0 (below SAMPLING_EPS) = greedy
    top_p: float = 1.0               # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                   # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0               # drop tokens below min_p * (probability of the most likely token)
    seed: Optional[int] = None       # a private random stream: same tokens alone or in any batch
    max_tokens: Optional[int] = 16   # None = until max_model_len
    min_tokens: int = 0              # EOS and stop_token_ids are blocked until this many tokens exist
    stop: Optional[str | list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None   # report each output token's logprob and the top-k (-1 = all)
    prompt_logprobs: Optional[int] = None  # the same for the prompt tokens
    presence_penalty: float = 0.0    # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0   # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    detokenize: bool = True          # False: no text (text "", decoded_token None), so no stop strings either
    spaces_between_special_tokens: bool = True  # (no effect: byte-level BPE puts no spaces between any tokens)
    output_kind: int = CUMULATIVE    # RequestOutputKind: what LLMEngine.step returns of the request
    extra_args: Optional[dict] = None  # for custom samplers and plugins: minillm's sampler reads none
    # logits controls: the logits hook (structured.py) applies them between the logits and the sampler
    structured_outputs: Optional[StructuredOutputsParams] = None  # JSON schema, regex, choice or grammar
    guided_decoding: Optional[StructuredOutputsParams] = None     # the older name of the same
    logit_bias: Optional[dict] = None         # {token id: bias}, each clamped to [-100, 100]
    allowed_token_ids: Optional[list] = None  # sample only among these
    bad_words: list = field(default_factory=list)  # never complete these words (structured.bad_words_token_ids)
    logits_processors: Optional[list] = None  # fn(output_ids, logits) or fn(prompt_ids, output_ids, logits)

    def __post_init__(self):  # vLLM's normalizations (seed -1 is no seed, logprobs=True is 1, ...), then verify
        companion("compat").normalize_sampling_params(self)

    def verify(self) -> None:  # vLLM's rules (the ranges above), each error naming its field; the engine checks again
        companion("compat").verify_sampling_params(self)

    @property
    def greedy(self) -> bool:
        return isinstance(self.temperature, (int, float)) and self.temperature < SAMPLING_EPS

    def clone(self) -> "SamplingParams": return copy.deepcopy(self)

    @property
    def has_logits_controls(self) -> bool:  # whether the logits hook (structured.py) has work for it
        return bool(self.structured_outputs is not None or self.logit_bias or self.allowed_token_ids is not None
                    or self.bad_words or self.logits_processors)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class Logprob:
    """A token's log-probability under the model's raw logits (before penalties, temperature, top-k/p)."""
    logprob: float
    rank: Optional[int] = None           # 1 = the most likely token
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int                               # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None   # the sum of the tokens' logprobs; with `logprobs` only
    logprobs: Optional[list] = None          # per token {token_id: Logprob}: the token itself and the top-k
    finish_reason: Optional[str] = None      # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: Any = None                  # the stop string or stop token id that ended it; None: the tokenizer's EOS
    lora_request: Any = None


def ignores_unknown_arguments(cls):  # as vLLM's RequestOutput(...): forward-compatible with newer callers
    init, known = cls.__init__, {f.name for f in fields(cls)}
    cls.__init__ = lambda self, *args, **kw: init(self, *args, **{k: v for k, v in kw.items() if k in known})
    return cls


@ignores_unknown_arguments
@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[list] = None   # per prompt token as CompletionOutput.logprobs; the first is None
    num_cached_tokens: int = 0               # prompt tokens whose K/V came from the prefix cache
    lora_request: Any = None
    metrics: Any = None  # its timestamps, a RequestStateStats (compat.py); for n > 1 completion 0's


# ----------------------------------------------------------------------------------------------
# 2. Checkpoint loading: HF folders and GGUF files, weights straight to the target device/dtype


def load_hf_checkpoint(folder: str, device, dtype, hf_overrides=None, plan=None) -> tuple[ModelConfig, dict]:
    """config.json + model.safetensors (or its shards) -> (config, {name: tensor}). plan: None (every tensor whole)
    or plan(cfg) -> cut, where cut(name, t) is the part of tensor t this process holds (parallel.TP.cut); t is a
    safetensors slice, so only that part is read. hf_overrides: vLLM's (formats.apply_hf_overrides)."""
    from safetensors import safe_open
    fields, files = formats.read_hf_config(folder, hf_overrides)  # config.json, generation_config.json
    cfg = ModelConfig(**fields)
    cut = plan(cfg) if plan else (lambda name, t: t[:])
    weights = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if "rotary_emb" in name:  # old checkpoints saved RoPE frequencies; we compute them
                    continue
                # one tensor (or one shard of it) at a time: host memory stays near one copy of this process's weights
                name, part = name.removeprefix("model."), f.get_slice(name)
                weights[name] = cut(name, part).to(device=device, dtype=dtype)
    return cfg, weights


def load_gguf_checkpoint(path: str, device, dtype, hf_overrides=None, plan=None) -> tuple[ModelConfig, dict, Tokenizer]:
    """A llama.cpp GGUF file -> (config, weights, tokenizer), read by formats.read_gguf (hf_overrides on the config its
    metadata gives). Quantized tensors are dequantized; plan as load_hf_checkpoint's, cutting each dequantized one."""
    fields, tensors, tokenizer = formats.read_gguf(path, hf_overrides)
    cfg = ModelConfig(**fields)
    cut = plan(cfg) if plan else (lambda name, t: t[:])
    weights = {name: cut(name, w).to(device=device, dtype=dtype) for name, w in tensors}  # one tensor at a time
    return cfg, weights, make_tokenizer(*tokenizer)


# ----------------------------------------------------------------------------------------------
# 3. Tokenizer: every supported format becomes a tiktoken.Encoding


class Tokenizer:
    """A tiktoken Encoding plus the few facts the engine needs. Every format minillm reads is byte-level BPE, whose
    ids are tiktoken ranks: formats.py makes the Encoding and the other arguments from tokenizer.json, tokenizer.model
    and GGUF vocabularies. HF's calls (`tok(text).input_ids`, `apply_chat_template`, ...) are compat's, via `hf`."""

    def __init__(self, enc: tiktoken.Encoding, special_ids, bos_id=None, eos_ids=(), add_bos=False, extra=None,
                 unknown=(), vocab_size=None):
        self.enc, self.bos_id, self.add_bos = enc, bos_id, add_bos and bos_id is not None
        self.special_ids = set(special_ids)  # what skip_special_tokens skips
        self.eos_ids = set(eos_ids)          # the tokenizer's own; generation_config.json's are the engine's
        self.extra = extra or {}       # {id: bytes} for ids the Encoding can't decode
        self.unknown = set(unknown)    # ids standing for bytes the vocabulary lacks: dropped
        self.vocab_size = vocab_size or enc.n_vocab  # as HF: the model's vocabulary, without added tokens
        # HF's named special tokens, as texts (compat.HFTokenizerAPI has the rest); tokenizer_config.json may rename
        self.bos_token = self.decode([bos_id]) if bos_id is not None else None
        self.eos_token = self.decode([min(eos_ids)]) if eos_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special tokens written in the prompt (e.g. by a chat template) are special tokens, as in HF
        ids = self.enc.encode(text, allowed_special="all")
        if self.unknown:
            ids = [i for i in ids if i not in self.unknown]
        return [self.bos_id] + ids if self.add_bos and add_special_tokens else ids

    def token_bytes(self, i: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(i)
        except KeyError:  # see extra; or an id past the vocabulary (padded embedding rows): nothing
            return self.extra.get(i, b"")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # (no clean_up_tokenization_spaces: transformers 5 ignores it for BPE, where it would eat real spaces)
        ids = [ids] if isinstance(ids, int) else ids
        b = b"".join(self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self.special_ids))
        return b.decode("utf-8", errors="replace")

    # -- HF's tokenizer calls (compat.HFTokenizerAPI) --

    def __call__(self, text, add_special_tokens: bool = True): return self.hf("__call__")(text, add_special_tokens)
    def __len__(self) -> int: return self.hf("__len__")()
    def __getattr__(self, name: str): return self.hf(name)  # (only names not found above)
    def hf(self, name: str):
        if name.startswith("__") and name not in ("__call__", "__len__"):
            raise AttributeError(name)  # (pickle, copy and friends probe for these)
        return companion("compat").hf_tokenizer_attribute(self, name)


class Detokenizer:
    """Streams the text of generated ids. A character can be split over several byte-level tokens: the incremental
    UTF-8 decoder holds its first bytes back until the character is complete (never, if the output stops first:
    as vLLM's detokenizer, the final text then leaves the incomplete character out, with no U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens=True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:  # the new text, "" while a character is incomplete
        if self.skip and token_id in self.tok.special_ids:
            return ""
        return self.utf8.decode(self.tok.token_bytes(token_id))


def make_tokenizer(kwargs: dict, attrs: Optional[dict] = None, tokenizer_config: Optional[dict] = None) -> Tokenizer:
    """formats' pieces of a tokenizer -> the Tokenizer, then its tokenizer_config.json applied (it has the last word
    on BOS and EOS) and the attributes set (a chat template; a GGUF's named special tokens)."""
    tok = Tokenizer(**kwargs)
    if tokenizer_config is not None:
        formats.apply_tokenizer_config(tok, tokenizer_config)
    for name, value in (attrs or {}).items():
        setattr(tok, name, value)
    return tok


# ----------------------------------------------------------------------------------------------
# 4. Model: Llama (and Mistral, Qwen2, Qwen3: the same block with a switch or two)


# Chains of elementwise ops. Eagerly, each op is a kernel launch and a pass over memory; on the GPU each chain is
# one Triton kernel of fused.py (`fused`), held to these PyTorch functions by the tests.
def rms_norm(x, weight, eps):  # (N, C) -> (N, C); the statistics in float32, as HF does
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x, cos, sin):
    """x (N, heads, D); cos, sin (N, D/2). Rotates the pairs (x[i], x[i + D/2]), HF's layout."""
    x1, x2 = x.float().chunk(2, dim=-1)          # (N, heads, D/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_and_mul(gate, up):  # SwiGLU's activation: (N, F), (N, F) -> (N, F)
    return F.silu(gate) * up


@functools.cache
def fused(fn):
    """fn's kernel on the GPU: fused.py's function of the same name, one pass over memory for the whole chain
    (fused.py's docstring says why not torch.compile)."""
    return getattr(companion("fused"), fn.__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (fused(rms_norm) if x.is_cuda else rms_norm)(x, self.weight, self.eps)


def rope_tables(cfg: ModelConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency for every position below max_len: two (max_len, D/2) float32 tables."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # (D/2,)
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "linear":  # positions squeezed by `factor`
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 at long wavelengths, 1 at short
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (max_len, D/2)
    return freqs.cos().to(device), freqs.sin().to(device)


@dataclass
class AttentionMetadata:
    """Everything attention needs to find the batch's tokens in the paged KV cache, and the LoRA slot of each
    token for the linear layers. Built once per step by the runner and passed down explicitly (no global state)."""
    slot_mapping: torch.Tensor     # (N,) cache slot (block * block_size + offset) of each new token; -1 = padding
    block_tables: torch.Tensor     # (B, max_blocks) physical block of each sequence's logical block
    seq_lens: torch.Tensor         # (B,) tokens in each sequence after this step (cached + new)
    query_start_loc: torch.Tensor  # (B+1,) where each sequence's new tokens start in the packed batch
    max_query_len: int             # the longest run of new tokens (1 = a pure decode step)
    max_seq_len: int               # an upper bound on seq_lens (their max; in a CUDA graph, the cache's)
    lora: Any = None               # lora.LoRABatch: each token's adapter slot; None: the base model only


def project(projs: tuple, x, adapters) -> list:
    """[proj(x) for proj in projs]: every decoder-layer projection (not lm_head) goes here, the seam LoRA attaches to.
    When the step uses adapters (a lora.LoRABatch), each token's LoRA delta is added: projections of the same
    input (q/k/v, gate/up) share one shrink and one expand, as their adapter weights are stacked (lora.py)."""
    stacked = getattr(projs[0], "stacked", None)  # stack_projections': (N, C) @ (C, ΣOUT) -> (N, ΣOUT), then split
    ys = [proj(x) for proj in projs] if stacked is None else list(F.linear(x, *stacked[:2]).split(stacked[2], -1))
    return ys if adapters is None else adapters.add(ys, x, projs)


def stack_projections(model: "Llama") -> None:
    """q, k and v read the same input: one (ΣOUT, C) weight, one GEMM in place of three (k and v, only KVH*D wide,
    are GEMMs too narrow to fill the GPU), each projection's weight a view of its rows. gate/up stay apart: stacked,
    their GEMM was no faster at the 8B shape and SwiGLU's kernels read the split's strided halves at half speed."""
    for layer in model.layers:
        projs = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        widths = [p.out_features for p in projs]  # H*D, KVH*D, KVH*D
        weight = torch.cat([p.weight for p in projs])  # (ΣOUT, C)
        bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])  # (ΣOUT,)
        for p, rows in zip(projs, weight.split(widths)):
            p.weight = nn.Parameter(rows, requires_grad=False)
        projs[0].stacked = (weight, bias, widths)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.KVH, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.KVH * self.D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.KVH * self.D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        N = x.shape[0]
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x, meta.lora)  # (N, C) -> (N, H*D), (N, KVH*D) x2
        q, k, v = q.view(N, self.H, self.D), k.view(N, self.KVH, self.D), v.view(N, self.KVH, self.D)
        if self.q_norm is not None:  # (N * heads, D) rows, each normalized over its D
            q = self.q_norm(q.reshape(N * self.H, self.D)).view(N, self.H, self.D)
            k = self.k_norm(k.reshape(N * self.KVH, self.D)).view(N, self.KVH, self.D)
        rope = fused(apply_rope) if x.is_cuda else apply_rope
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # The Triton kernels on the GPU; on the CPU their batched PyTorch twins (same contract)
        write_kv, attend = ((pa.write_kv_cache, pa.paged_attention) if x.is_cuda
                            else (pa.write_kv_cache_cpu, pa.paged_attention_cpu))
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)  # the new tokens' K/V into their slots
        o = attend(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                   self.D ** -0.5, meta.max_query_len, meta.max_seq_len)  # (N, H, D)
        return project((self.o_proj,), o.view(N, self.H * self.D), meta.lora)[0]  # (N, H*D) @ (H*D, C) -> (N, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, adapters=None):  # SwiGLU: (N, C) -> (N, F) -> (N, C)
        gate, up = project((self.gate_proj, self.up_proj), x, adapters)
        act = fused(silu_and_mul) if x.is_cuda else silu_and_mul
        return project((self.down_proj,), act(gate, up), adapters)[0]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x), meta.lora)


class Llama(nn.Module):
    """Parameter names follow the HF checkpoint minus its "model." prefix, so loading is a straight copy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Given a weight, Embedding skips its random init, which costs seconds even on the meta device (load_model)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_cos = self.rope_sin = None  # (max_len, D/2) tables, made by load_model on the target device

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_cache):
        """input_ids, positions (N,) -> final hidden states (N, C). kv_cache: per layer a (k_cache, v_cache) pair."""
        x = self.embed_tokens(input_ids)                               # (N, C)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (N, D/2) each
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, meta, k_cache, v_cache)
        return self.norm(x)

    def compute_logits(self, h):  # (rows, C) @ (C, V) -> (rows, V), float32 for the sampler
        return self.lm_head(h).float()


def load_model(path: str, device, dtype: str | torch.dtype, max_model_len: Optional[int], hf_overrides=None,
               tp=None):
    """A checkpoint path -> (model in eval mode on `device`, the whole model's config, tokenizer or None). tp (a
    parallel.TP), the seam of tensor parallelism, cuts this rank's part of each tensor as read, shapes and wraps it."""
    device = torch.device(device)
    if not (path.endswith(".gguf") or os.path.isdir(path)):
        raise FileNotFoundError(f"model {path!r}: expected a folder with config.json + safetensors, or a .gguf file")
    dtype = resolve_dtype(dtype, formats.checkpoint_dtype(path), device)
    if path.endswith(".gguf"):
        cfg, weights, tokenizer = load_gguf_checkpoint(path, device, dtype, hf_overrides, tp and tp.cut)
    else:
        (cfg, weights), tokenizer = load_hf_checkpoint(path, device, dtype, hf_overrides, tp and tp.cut), None
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    with torch.device("meta"):  # no memory, no random init: the loaded tensors become the parameters
        model = Llama(cfg if tp is None else tp.part(cfg))
    model.load_state_dict(weights, strict=True, assign=True)
    del weights  # the model holds them now: stacking frees each weight it copies
    stack_projections(model)
    if tp is not None:
        tp.wrap(model, cfg)
    model.rope_cos, model.rope_sin = rope_tables(cfg, max_model_len or cfg.max_position_embeddings, device)
    return model.eval(), cfg, tokenizer


DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, checkpoint_dtype: Optional[str], device: torch.device) -> torch.dtype:
    """A dtype or its name (EngineArgs has checked it). "auto": float32 on the CPU; on a GPU the checkpoint's half
    type, and bfloat16 for a float32 checkpoint (config.json's dtype, formats.checkpoint_dtype)."""
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else "float16" if checkpoint_dtype == "float16" else "bfloat16"
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


# ----------------------------------------------------------------------------------------------
# 5. KV cache and block manager
#
# The cache is one pair of tensors per layer, k_cache and v_cache, each (num_blocks, block_size, KVH, D). A sequence
# owns a list of block ids, its block_table: logical block j (positions j*block_size ... (j+1)*block_size - 1) is
# physical block block_table[j], anywhere, so a sequence grows a block at a time and a finished one's blocks go
# straight to others. A block in several tables (ref_count says how many) holds a prefix they share (prefix caching).


class Observer:
    """The seam for watching the engine: the block manager, scheduler and engine tell it each event below, and this
    one ignores them all. The engine's own is compat.Metrics, or with trace=True timeline.Recorder (metrics too)."""
    def added(self, seqs: list) -> None: pass             # a request's sequences are queued
    def block(self, kind: str, block_id: int) -> None: pass  # "allocated", "shared", "evicted" or "freed"
    def admitted(self, seq) -> None: pass                 # a waiting sequence runs (its cached prefix computed)
    def preempted(self, seq) -> None: pass                # a running one goes back to waiting
    def scheduled(self, batch: list) -> None: pass        # a step's batch [(sequence, new tokens)]
    def token(self, seq) -> None: pass                    # one output token landed on the host
    def finished(self, seq) -> None: pass                 # a sequence got its finish reason
    def step_ended(self, started: float) -> None: pass    # the step begun at time.perf_counter() `started` is over


@dataclass
class Block:
    block_id: int
    ref_count: int = 0             # how many sequences use this block (shared through the prefix cache)
    hash: Optional[bytes] = None   # set while the block is in the prefix cache (BlockManager.cached)


def hash_block(parent: Optional[bytes], token_ids: list[int], lora_id: Optional[int] = None) -> bytes:
    """The identity of a full block's K/V: its tokens, everything before them (the previous block's hash,
    None for the first block) and the LoRA adapter that computed them (other weights, other K/V)."""
    return hashlib.sha256(repr((parent, lora_id, token_ids)).encode()).digest()


class BlockManager:
    """Hands out KV cache blocks and, with prefix caching, finds blocks whose K/V are already computed: a full block
    gets a hash (hash_block), `cached` maps hash -> block, and a new or resumed sequence starts from the cached
    blocks of its longest cached prefix. A freed block keeps its K/V and hash until the allocator needs it:
    `free_block_ids` gives from the front and takes freed blocks at the back (the least recently freed goes first)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 observer: Observer = Observer()):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids = collections.OrderedDict.fromkeys(range(num_blocks))  # an ordered set (take_free_block)
        self.cached: dict[bytes, int] = {}
        self.uncommitted: list[tuple[bytes, int]] = []  # cached this step, before the step wrote their K/V
        self.observer = observer

    def block_hashes(self, seq: "Sequence", num_tokens: int) -> list[bytes]:
        """Hashes of seq's full blocks among its first num_tokens tokens, up to one holding a token still on the
        device (PENDING). Kept on seq: a token never changes once known."""
        bs, lora_id = self.block_size, seq.lora_request.lora_int_id if seq.lora_request else None
        while len(seq.block_hashes) < num_tokens // bs:
            j = len(seq.block_hashes)
            tokens = seq.token_ids[j * bs:(j + 1) * bs]
            if PENDING in tokens:
                break
            seq.block_hashes.append(hash_block(seq.block_hashes[-1] if j else None, tokens, lora_id))
        return seq.block_hashes[: num_tokens // bs]

    def find_cached_prefix(self, seq: "Sequence") -> list[int]:
        """The cached blocks that hold seq's longest cached prefix. The last token is always computed (its
        logits give the next token), and prompt_logprobs need every prompt position computed (as vLLM)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        found = []
        for h in self.block_hashes(seq, seq.num_tokens - 1):
            if h not in self.cached:
                break
            found.append(self.cached[h])
        return found

    def blocks_needed(self, seq: "Sequence", num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold the K/V of its next `num_new_tokens` tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def fits_in_place(self, seq: "Sequence", num_new_tokens: int) -> bool:
        """Whether allocate(seq, num_new_tokens) would do nothing: the tokens fit in the blocks seq has, and fill
        none the prefix cache has yet to see (most decode steps; the scheduler skips allocate for them)."""
        total = seq.num_computed_tokens + num_new_tokens
        return total <= len(seq.block_table) * self.block_size and (
            not self.enable_prefix_caching or total // self.block_size <= seq.num_hashed_blocks)

    def can_allocate(self, seq: "Sequence", num_new_tokens: int, cached: list[int] = ()) -> bool:
        # cached blocks cover their tokens, but those no one holds leave the free list too
        new = self.blocks_needed(seq, len(cached) * self.block_size + num_new_tokens) - len(cached)
        return new + sum(self.blocks[b].ref_count == 0 for b in cached) <= len(self.free_block_ids)

    def allocate(self, seq: "Sequence", num_new_tokens: int, cached: list[int] = ()) -> None:
        """Give seq its `cached` prefix blocks (their tokens count as computed), then fresh blocks for its next
        num_new_tokens tokens."""
        for block_id in cached:
            block = self.blocks[block_id]
            self.observer.block("shared" if block.ref_count else "allocated", block_id)
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens += len(cached) * self.block_size
        seq.num_hashed_blocks += len(cached)
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self.take_free_block())
        if self.enable_prefix_caching:
            self.cache_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def take_free_block(self) -> int:
        """The least recently freed block, for one sequence; whatever it held leaves the prefix cache. (A plain dict
        would find its first key by scanning past every key deleted from its front: 0.1 ms each after 100k.)"""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        self.observer.block("allocated", block_id)
        if block.hash is not None:
            del self.cached[block.hash]
            block.hash = None
            self.observer.block("evicted", block_id)
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: "Sequence", num_tokens: int) -> None:
        """Put the blocks that seq's first num_tokens fill into the prefix cache, once their tokens are known (not
        a PENDING one). Each layer writes the step's K/V before attention reads any, so a sequence later in this
        step can share them already; until the step has run they are `uncommitted`, dropped if it fails."""
        if num_tokens // self.block_size <= seq.num_hashed_blocks:
            return
        hashes = self.block_hashes(seq, num_tokens)
        for j in range(seq.num_hashed_blocks, len(hashes)):
            if hashes[j] not in self.cached:  # else an equal block is cached already; this one isn't shared
                self.uncommitted.append((hashes[j], seq.block_table[j]))
                self.cached[hashes[j]] = seq.block_table[j]
                self.blocks[seq.block_table[j]].hash = hashes[j]
        seq.num_hashed_blocks = len(hashes)

    def commit(self) -> None:  # the step that writes the newly cached blocks has run
        self.uncommitted.clear()

    def rollback(self) -> None:
        """Forget the blocks cached by a step that did not run: their K/V may never have been written."""
        for h, block_id in self.uncommitted:
            if self.cached.get(h) == block_id:
                del self.cached[h]
                self.blocks[block_id].hash = None
        self.uncommitted.clear()

    def reset(self) -> None:
        """After an error, once no sequence holds a block: every block free, whatever a half-done allocate or
        free left behind; the blocks of steps that ran stay findable in the prefix cache."""
        self.rollback()
        for block in self.blocks:
            block.ref_count = 0
            self.free_block_ids.setdefault(block.block_id)  # one missing from the free list rejoins at the back

    def free(self, seq: "Sequence") -> None:
        # last block first: it is the least likely to be shared, so it should be evicted first
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                self.observer.block("freed", block_id)
        seq.block_table, seq.num_hashed_blocks, seq.num_uploaded_blocks = [], 0, 0


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device) -> list:
    """One (k_cache, v_cache) pair per layer, each (num_blocks, block_size, KVH, D), all views of one tensor. Left
    unfilled on the CPU (zeroing 1 GiB takes a second; the CPU attention never reads a slot before it is written)."""
    make = torch.empty if torch.device(device).type == "cpu" else torch.zeros
    cache = make(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(cfg.num_layers)]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


# ----------------------------------------------------------------------------------------------
# 6. Sampler


@dataclass
class SamplingTensors:
    """One step's sampling parameters, one row per sampled sequence, on the device."""
    temperature: torch.Tensor   # (S,) below SAMPLING_EPS = greedy
    top_k: torch.Tensor         # (S,) V = off
    top_p: torch.Tensor         # (S,) 1 = off
    min_p: torch.Tensor         # (S,) 0 = off
    generators: dict            # row -> torch.Generator of a seeded request
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    penalties: Optional[tuple] = None  # (prompt_mask, output_counts, presence, frequency, repetition), if any


def apply_top_k_top_p_min_p(logits, top_k, top_p, min_p):
    """Set to -inf every logit outside the top-k, the top-p nucleus or the min-p floor. logits (S, V)."""
    if min_p is not None:  # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        floor = logits.max(dim=-1, keepdim=True).values + torch.log(min_p.clamp(min=1e-30))[:, None]  # (S, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if top_k is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (S, V) each
    kth = sorted_logits.gather(1, (top_k - 1).clamp(min=0)[:, None])  # (S, 1) the k-th largest logit
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # top-p over what top-k kept: drop a token when the tokens more likely than it already reach top_p
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V)
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_penalties(logits, prompt_mask, output_counts, presence, frequency, repetition):
    """vLLM's (and OpenAI's) penalties. logits, output_counts (S, V); prompt_mask (S, V) bool; the rest (S,).
    repetition_penalty counts prompt and output tokens, the other two only output tokens."""
    seen = prompt_mask | (output_counts > 0)
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


def gumbel_argmax(logits, temperature, q):  # (S, V), (S,), (S, V) -> (S,)
    return (logits / temperature[:, None] - q.log()).argmax(dim=-1)


def sample(logits: torch.Tensor, st: SamplingTensors, generator: torch.Generator) -> torch.Tensor:
    """logits (S, V) float32 -> token ids (S,). Everything stays on the device."""
    if st.penalties is not None:  # before temperature, and before greedy picks its token
        logits = apply_penalties(logits, *st.penalties)
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy
    temperature = st.temperature.clamp(min=1e-5)  # (S,) greedy rows are replaced at the end
    if st.any_top_k_top_p or st.any_min_p:
        logits = apply_top_k_top_p_min_p(logits / temperature[:, None], st.top_k if st.any_top_k_top_p else None,
                                         st.top_p, st.min_p if st.any_min_p else None)
        temperature = torch.ones_like(temperature)
    # The Gumbel-max trick: with q ~ Exponential(1), argmax(logits/T - log q) is a sample from
    # softmax(logits/T), and needs no softmax. Each seeded request draws its row of q from its own
    # generator, so its tokens do not depend on what else is in the batch.
    q = torch.empty_like(logits).exponential_(generator=generator)
    for row, g in st.generators.items():
        q[row].exponential_(generator=g)
    sampled = (fused(gumbel_argmax) if logits.is_cuda else gumbel_argmax)(logits, temperature, q)  # one pass on the GPU
    return torch.where(st.temperature < SAMPLING_EPS, greedy, sampled)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """What vLLM reports about a token: logprobs (R, V), token_ids (R,) -> (R, 3 + 2k) float64 rows [token id, its
    logprob, its rank (1 = most likely), the top-k ids, their logprobs], copied back at once (float64: ids exact)."""
    token_logprob = logprobs.gather(1, token_ids[:, None])      # (R, 1)
    rank = (logprobs >= token_logprob).sum(dim=-1, keepdim=True)  # (R, 1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)            # (R, k) each
    return torch.cat([x.double() for x in (token_ids[:, None], token_logprob, rank, top_ids, top_logprobs)], dim=1)


# ----------------------------------------------------------------------------------------------
# 7. Sequences and the scheduler


PENDING = -1  # a sampled token still on its way from the device (see LLMEngine.step: the one-step-late read-back)


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion on its way through the engine: its tokens, its blocks, its text so far. A request
    with n > 1 is n sequences with one request_id (vLLM's child requests)."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, priority: int, tokenizer: "Tokenizer", max_seq_len: int,
                 generator: Optional[torch.Generator] = None, lora_request=None):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index  # index: which of the n completions
        self.lora_request = lora_request         # None: the base model (its id is part of the prefix-cache hash)
        self.prompt, self.prompt_token_ids = prompt, prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + output so far
        self.num_computed_tokens = 0             # leading tokens whose K/V are in the cache
        self.num_cached_tokens: Optional[int] = None  # of those, found in the prefix cache when first scheduled
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []     # prefix-cache hashes of its full blocks of known tokens
        self.num_hashed_blocks = 0               # leading blocks of block_table the prefix cache has seen
        self.table_row: Optional[int] = None     # its row of the runner's block tables, while running
        self.num_uploaded_blocks = 0             # leading blocks of block_table that row holds
        self.pending_row = -1                    # if the last token is PENDING: its row in the step that sampled it
        self.params = params
        self.sort_key = (priority, seq_id)       # lower runs first; arrival breaks ties
        self.status = SequenceStatus.WAITING
        # prompt + output stop at max_tokens, and never outgrow max_model_len or the cache (max_seq_len)
        self.max_len = min(max_seq_len, len(prompt_token_ids) + (params.max_tokens or max_seq_len))
        self.text = ""
        self.finish_reason: Optional[str] = None  # "stop", "length" or "abort"
        self.stop_reason = None
        self.detokenizer = Detokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.generator = generator               # a seeded request's private random stream
        self.logprobs = [] if params.logprobs is not None else None  # per output token {token_id: Logprob}
        self.cumulative_logprob = 0.0
        self.prompt_logprobs = [None] if params.prompt_logprobs is not None else None  # the first token has none
        self.num_prompt_logprobs = 1  # entries made or on their way from the device
        self.controls = None  # the logits hook's state for it (structured.py: its grammar, bias, bad words)
        self.stats = None     # the observer's record of it (compat.Metrics: vLLM's RequestStateStats)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    def restart(self) -> None:
        """Back to waiting, with no blocks, to be recomputed from the tokens it knows (preemption, recovery)."""
        self.block_table, self.num_hashed_blocks, self.num_uploaded_blocks = [], 0, 0
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING


class Scheduler:
    """Continuous batching. Each step's batch fits two budgets, max_num_seqs sequences and max_num_batched_tokens
    tokens: first the running sequences (one decode token each, or a prompt's next chunk), then waiting ones (their
    prompts, chunked to fit). Both queues are sorted by `sort_key` = (priority, arrival; under "fcfs" every priority
    is 0). With no free block for a running sequence, the last running one is preempted: its blocks are freed and it
    waits to be recomputed from its tokens (recompute, not swap). A waiting one that outranks running ones does too."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int = 0, observer: Observer = Observer()):
        self.block_manager = block_manager
        self.max_loras = max_loras  # most distinct LoRA adapters among running sequences; 0 = LoRA off
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # a running count, for tests, metrics and curious readers
        self.observer = observer

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The step's batch: [(sequence, number of new tokens)], each with the blocks for them."""
        budget, batch = self.max_num_batched_tokens, []
        # 0. a waiting sequence that outranks the worst running one preempts it while it can't get its
        #    blocks (vLLM's priority preemption). Under "fcfs" only an older waiting sequence outranks a
        #    running one: one preempted earlier, or one the max_loras cap below let a newer one overtake.
        while self.waiting and self.running and self.waiting[0].sort_key < self.running[-1].sort_key:
            if self.admission(self.waiting[0], budget)[2]:
                break
            self.preempt(self.running[-1])
        # 1. running sequences, best first; preempt from the back when blocks run out
        preempted = False
        for seq in list(self.running):
            if budget <= 0 or seq.status is not SequenceStatus.RUNNING:
                break  # out of budget, or preempted for a sequence before it: so is everything after it
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.fits_in_place(seq, n):  # (most decode steps: nothing to allocate)
                while not self.block_manager.can_allocate(seq, n) and seq.status is SequenceStatus.RUNNING:
                    self.preempt(self.running[-1])
                    preempted = True
                if seq.status is not SequenceStatus.RUNNING:
                    break  # seq preempted itself
                self.block_manager.allocate(seq, n)
            batch.append((seq, n))
            budget -= n
        # 2. waiting sequences, while the budgets and the free blocks allow (none after a preemption:
        #    the cache is full, and a preempted sequence must not be overtaken by a worse one)
        if not preempted:
            self.schedule_waiting(batch, budget)
        return batch

    def admission(self, seq: Sequence, budget: int) -> tuple[list[int], int, bool]:
        """What admitting a waiting sequence takes: its cached prefix blocks, the tokens it computes this step
        (the rest of its tokens, up to the budget), and whether the free blocks allow it."""
        cached = self.block_manager.find_cached_prefix(seq)
        n = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
        return cached, n, self.block_manager.can_allocate(seq, n, cached)

    def schedule_waiting(self, batch: list, budget: int) -> None:
        """Admit waiting sequences in order. Each starts from its longest cached prefix and computes only
        the rest. One whose adapter would be one more than the max_loras slots waits and lets others pass."""
        loras, w = {s.lora_request.lora_int_id for s in self.running if s.lora_request}, 0
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[w]
            if seq.lora_request and seq.lora_request.lora_int_id not in loras and len(loras) >= self.max_loras:
                w += 1
                continue
            cached, n, fits = self.admission(seq, budget)
            if not fits:
                break
            self.waiting.pop(w)
            if seq.lora_request:
                loras.add(seq.lora_request.lora_int_id)
            self.block_manager.allocate(seq, n, cached)
            self.observer.admitted(seq)
            if seq.num_cached_tokens is None:  # its first time
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            batch.append((seq, n))
            budget -= n

    def preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the sequence's K/V; it will prefill prompt + output again."""
        self.observer.preempted(seq)
        self.running.remove(seq)
        self.block_manager.free(seq)
        self.num_preemptions += 1
        seq.restart()
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Out of the queues (finished or aborted), its blocks free at once for the next step."""
        if seq.status is not SequenceStatus.FINISHED:
            (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED


# ----------------------------------------------------------------------------------------------
# 8. The model runner: one step's inputs in, sampled tokens out
#
# Everything that touches the device lives here: the KV cache (sized from what the GPU has left), CUDA graphs, the
# step's tensors, the forward pass, the sampler. It knows nothing of text, stops or requests: a step comes as lists.


@dataclass
class StepInput:
    """One step as plain lists, built by the engine from the scheduled sequences. B scheduled sequences
    with N new tokens in all; S of them sample a token (their chunk reaches their last token)."""
    input_ids: list[int]            # (N,) the new tokens, back to back; PENDING: see `pending`
    positions: list[int]            # (N,)
    query_lens: list[int]           # (B,) new tokens per sequence
    table_rows: list[int]           # (B,) each sequence's row in the runner's block_tables on the device
    table_updates: list[int]        # flat (row, logical block, physical block) triples: blocks rows gained
    lora: list[tuple]               # (B,) (LoRARequest or None, new tokens) per sequence
    pending: list[tuple[int, int]] = field(default_factory=list)  # (index in input_ids, last step's row) per PENDING
    sample_rows: list[int] = field(default_factory=list)      # (S,) index in input_ids of each sampling token
    params: list[SamplingParams] = field(default_factory=list)  # (S,)
    generators: list = field(default_factory=list)            # (S,) torch.Generator of a seeded request, or None
    blocked: list[list[int]] = field(default_factory=list)    # (S,) tokens that may not be sampled yet (min_tokens)
    penalty_ids: list[tuple] = field(default_factory=list)    # (S,) (prompt ids, output ids) if any row has penalties
    logprob_rows: list[int] = field(default_factory=list)     # the sampling rows (of S) whose logprobs are reported
    prompt_rows: list[int] = field(default_factory=list)      # (P,) index in input_ids of each position scoring
    #                                                           the next prompt token (prompt_logprobs)
    prompt_targets: list[int] = field(default_factory=list)   # (P,) the prompt token each of prompt_rows scores
    num_logprobs: int = 0           # top-k width of the reported logprobs (the largest asked for)


@dataclass
class StepLogits:
    """What ModelRunner.forward hands to ModelRunner.sample: the logits of the rows that matter, on the device."""
    logits: torch.Tensor    # (S + P, V) float32: the S rows that sample, then the P positions scoring a prompt token
    last_ids: torch.Tensor  # (S,) the sampling rows' input tokens (an output ending in PENDING ends in that one)
    scored: torch.Tensor    # (R,) rows of logits whose logprobs are reported
    targets: torch.Tensor   # (P,) the prompt token each prompt position scores


class SampledTokens:
    """One step's sampled tokens, and the logprob rows of its scored tokens, on their way to the host: the copy is
    queued right behind the sampler, and `get` waits for that step only, not for the one the GPU runs meanwhile."""

    def __init__(self, tokens: torch.Tensor, report: Optional[torch.Tensor]):
        self.num_tokens = len(tokens)
        flat = tokens if report is None else torch.cat([tokens.double(), report.flatten()])  # one copy
        self.host = flat.to("cpu", non_blocking=True)
        self.done = torch.cuda.Event() if tokens.is_cuda else None
        if self.done is not None:
            self.done.record()

    def get(self) -> tuple[list[int], list[float]]:
        if self.done is not None:
            self.done.synchronize()
        values = self.host.tolist()
        return [int(t) for t in values[:self.num_tokens]], values[self.num_tokens:]


class ModelRunner:
    """The device side of the engine. The engine uses only its methods: kv_capacity, forward, sample,
    forget_sampling, reset and close (parallel.TPModelRunner has the same, and sends each to the other ranks)."""

    CPU_KV_CACHE_BYTES = 1 << 30  # the CPU has no memory profile to size from: 1 GiB of KV cache

    def __init__(self, model: "Llama", *, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, gpu_memory_utilization: float, num_gpu_blocks_override: Optional[int],
                 kv_cache_memory_bytes: Optional[int], enforce_eager: bool, seed: Optional[int], lora_manager=None):
        self.model, self.cfg, self.lora = model, model.cfg, lora_manager  # cfg: the shape of the model held here
        self.device, self.dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.block_size, self.max_num_seqs, self.max_model_len = block_size, max_num_seqs, max_model_len
        self.generator = torch.Generator(device=self.device)
        self.generator.seed() if seed is None else self.generator.manual_seed(seed)  # seed None: a fresh stream
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the memory profile, graphs and NCCL use the current device
            self.warm_up()
        self.num_blocks = self.count_kv_blocks(num_gpu_blocks_override, kv_cache_memory_bytes,
                                               gpu_memory_utilization, max_num_batched_tokens)
        companion("compat").check_kv_cache(self.num_blocks, block_size, max_model_len, num_gpu_blocks_override)
        self.kv_cache = allocate_kv_cache(self.cfg, self.num_blocks, block_size, self.dtype, self.device)
        self.max_seq_len = min(max_model_len, self.num_blocks * block_size)  # no sequence outgrows the cache
        self.last_sampled = None  # the last step's tokens (S,), on the device: the next step's PENDING inputs
        self.last_sampling = None  # (params, generators, rows, SamplingTensors) of the last step that sampled
        self.counting = torch.arange(max(max_num_batched_tokens, max_num_seqs) + 1, device=self.device)  # 0, 1, 2, ...
        # Each running sequence's block table lives in one row here, and a step sends only the blocks rows gained:
        # uploading every table every step was the host's largest cost (~9k ints at batch 256).
        self.block_tables = torch.zeros(max_num_seqs, -(-self.max_seq_len // block_size), dtype=torch.int32,
                                        device=self.device)  # (max_num_seqs, max blocks per sequence)
        self.graphs = {} if enforce_eager or self.device.type != "cuda" else self.capture_cuda_graphs()

    # -- what the engine calls besides forward and sample --

    def kv_capacity(self) -> tuple[int, int]:
        """(blocks in the KV cache, the longest sequence that max_model_len and the cache allow)."""
        return self.num_blocks, self.max_seq_len

    def forget_sampling(self) -> None:
        """Drop the cached sampling tensors: a params object may have been changed since they were made."""
        self.last_sampling = None

    def reset(self) -> None:
        """After an exception: no step is in flight, so no token on the device is waited for."""
        self.last_sampled = self.last_sampling = None

    def close(self) -> None:
        """Nothing to stop on one device (parallel.TPModelRunner stops its worker processes here)."""

    # -- start-up: compile the kernels, size the KV cache, capture graphs --

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run each kernel of fused.py once, so Triton compiles them now (once per model, then from its disk
        cache), not in the first generate."""
        C, D, V, eps = self.cfg.hidden_size, self.cfg.head_dim, self.cfg.vocab_size, self.cfg.rms_norm_eps
        like = lambda *shape, dtype=self.dtype: torch.ones(*shape, dtype=dtype, device=self.device)
        f32 = torch.float32
        fused(rms_norm)(like(1, C), self.model.norm.weight, eps)
        fused(apply_rope)(like(1, self.cfg.num_heads, D), like(1, D // 2, dtype=f32), like(1, D // 2, dtype=f32))
        fused(silu_and_mul)(like(1, self.cfg.intermediate_size), like(1, self.cfg.intermediate_size))
        fused(gumbel_argmax)(like(1, V, dtype=f32), like(1, dtype=f32), like(1, V, dtype=f32))

    def count_kv_blocks(self, override: Optional[int], memory_bytes: Optional[int], gpu_memory_utilization: float,
                        max_num_batched_tokens: int) -> int:
        """The KV cache's size in blocks: num_gpu_blocks_override, else kv_cache_memory_bytes' worth, else what the
        GPU's memory profile leaves; on the CPU, CPU_KV_CACHE_BYTES' worth."""
        per_block = kv_bytes_per_block(self.cfg, self.block_size, self.dtype)
        if override is not None:
            return override
        if memory_bytes is not None:
            return memory_bytes // per_block
        if self.device.type == "cuda":
            return self.profile_num_blocks(gpu_memory_utilization, max_num_batched_tokens)
        return self.CPU_KV_CACHE_BYTES // per_block

    @torch.inference_mode()
    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """Run the largest batch the scheduler can build once; what the weights and its activations leave
        of `gpu_memory_utilization` of the card becomes KV cache."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n, blocks = max_num_batched_tokens, -(-max_num_batched_tokens // self.block_size)
        cache = allocate_kv_cache(self.cfg, blocks, self.block_size, self.dtype, self.device)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(torch.arange(n, device=self.device), i32([list(range(blocks))]), i32([n]),
                                 i32([0, n]), n, n)
        positions = torch.arange(n, device=self.device) % self.max_model_len  # stay inside the RoPE tables
        h = self.model(torch.zeros(n, dtype=torch.long, device=self.device), positions, meta, cache)
        logits = self.model.compute_logits(h[:1].expand(self.max_num_seqs, -1))  # (max_num_seqs, V)
        logits.sort(dim=-1)  # the sampler's largest temporary
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        available = total * gpu_memory_utilization - torch.cuda.max_memory_allocated() - non_torch
        return int(available // kv_bytes_per_block(self.cfg, self.block_size, self.dtype))

    # A decode step of a small model is hundreds of short kernels; launched one by one from Python, the
    # launches take longer than the work. A CUDA graph records the whole forward pass once per batch size
    # and replays it with one call. Graphs need fixed shapes and addresses, so a step copies its inputs
    # into static buffers and pads the batch to the next captured size (padding rows: seq_len 0, slot -1).
    GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 1025, 16))

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> dict:
        sizes = [bs for bs in self.GRAPH_BATCH_SIZES if bs < self.max_num_seqs]
        sizes.append(next(bs for bs in self.GRAPH_BATCH_SIZES if bs >= self.max_num_seqs))
        max_bs, max_blocks = sizes[-1], -(-self.max_seq_len // self.block_size)
        i32, i64 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.long, device=self.device)
        self.graph_inputs = g = dict(
            input_ids=torch.zeros(max_bs, **i64), positions=torch.zeros(max_bs, **i64),
            slot_mapping=torch.full((max_bs,), -1, **i64), block_tables=torch.zeros(max_bs, max_blocks, **i32),
            seq_lens=torch.zeros(max_bs, **i32), query_start_loc=torch.arange(max_bs + 1, **i32),  # 1 token a row
            lora_slots=torch.full((max_bs,), -1, **i64))  # each token's adapter slot; grouped inside the graph
        graphs, pool = {}, None
        # Largest first: the smaller graphs reuse its memory pool. With LoRA on, each size also gets a graph
        # without the LoRA kernels, for the steps where no token uses an adapter.
        for bs, use_lora in [(bs, u) for bs in reversed(sizes) for u in ((True, False) if self.lora else (False,))]:
            # (a new LoRABatch each run: its tiles are made on first use, so the capture records that kernel too)
            meta = lambda: AttentionMetadata(g["slot_mapping"][:bs], g["block_tables"][:bs], g["seq_lens"][:bs],
                                             g["query_start_loc"][: bs + 1], 1, self.max_seq_len,
                                             self.lora.batch(g["lora_slots"][:bs]) if use_lora else None)
            run = lambda: self.model(g["input_ids"][:bs], g["positions"][:bs], meta(), self.kv_cache)
            run()  # warm-up outside the capture: Triton compiles here
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = run()
            pool = graph.pool()
            graphs[bs, use_lora] = (graph, hidden)
        torch.cuda.synchronize()
        return graphs

    # -- one step --

    def run_model(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """The forward pass of one step: (N,) token ids -> (N, C) hidden states, through a graph when one fits."""
        N = input_ids.shape[0]
        if meta.max_query_len > 1 or not self.graphs or N > max(b for b, _ in self.graphs):
            return self.model(input_ids, positions, meta, self.kv_cache)
        bs = min(b for b, _ in self.graphs if b >= N)
        g, width = self.graph_inputs, meta.block_tables.shape[1]
        g["input_ids"][:N] = input_ids
        g["positions"][:N] = positions
        g["slot_mapping"][:N] = meta.slot_mapping
        g["slot_mapping"][N:bs] = -1
        g["seq_lens"][:N] = meta.seq_lens
        g["seq_lens"][N:bs] = 0
        g["block_tables"][:N, :width] = meta.block_tables
        if meta.lora is not None:
            g["lora_slots"][:N] = meta.lora.token_slots
            g["lora_slots"][N:bs] = -1
        graph, hidden = self.graphs[bs, meta.lora is not None]
        graph.replay()
        return hidden[:N]

    def upload(self, *lists: list) -> list[torch.Tensor]:
        """Host lists of ints -> int32 device tensors, in one copy. On CUDA through pinned memory and
        asynchronously, so the host goes on while it runs (PyTorch keeps the buffer alive until it is done)."""
        flat = torch.tensor(list(itertools.chain(*lists)), dtype=torch.int32)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return list(flat.split([len(x) for x in lists]))

    def prepare(self, step: StepInput) -> tuple:
        """A StepInput -> (N,) input_ids and positions, the AttentionMetadata, and on the device the (S + P,) rows
        whose logits are needed, the (R,) of those whose logprobs are reported, the (P,) prompt tokens scored. One
        upload (a second, from unpinned memory, would make the host wait for the GPU), seq_lens first: the attention
        kernel reads it, and Triton compiles a variant for each alignment of a pointer (offset 0 is always aligned)."""
        S = len(step.sample_rows)
        seq_lens = [step.positions[end - 1] + 1 for end in itertools.accumulate(step.query_lens)]  # (B,) after it
        width = -(-max(seq_lens) // self.block_size)  # the most blocks any sequence of the step has
        dst, src = [d for d, _ in step.pending], [s for _, s in step.pending]
        scored = step.logprob_rows + list(range(S, S + len(step.prompt_rows)))
        s_lens, ids, pos, q_lens, table_rows, updates, dst, src, rows, scored, targets = self.upload(
            seq_lens, step.input_ids, step.positions, step.query_lens, step.table_rows, step.table_updates, dst, src,
            step.sample_rows + step.prompt_rows, scored, step.prompt_targets)
        if step.pending:
            ids[dst] = self.last_sampled[src].int()  # the last step's tokens, straight from the device
        if step.table_updates:
            updates = updates.view(-1, 3).long()  # (U, 3): row, logical block, physical block
            self.block_tables[updates[:, 0], updates[:, 1]] = updates[:, 2].int()
        tables = self.block_tables[table_rows.long(), :width]  # (B, width)
        if max(step.query_lens) == 1:  # a decode step: token i is sequence i's one new token
            starts, token_seq = self.counting[:len(q_lens) + 1].int(), self.counting[:len(ids)]
        else:
            starts = F.pad(q_lens.cumsum(0), (1, 0)).int()  # (B+1,) where each sequence's new tokens start
            token_seq = torch.repeat_interleave(self.counting[:len(q_lens)], q_lens, output_size=len(ids))  # (N,)
        # each new token's cache slot: the physical block holding its position, times block_size, plus the offset
        slot_mapping = tables[token_seq, pos // self.block_size].long() * self.block_size + pos % self.block_size
        meta = AttentionMetadata(slot_mapping, tables, s_lens, starts, max(step.query_lens), max(seq_lens),
                                 self.lora.prepare(step.lora) if self.lora else None)
        return ids, pos, meta, (rows.long(), scored.long(), targets.long())

    @torch.inference_mode()
    def forward(self, step: StepInput) -> Optional[StepLogits]:
        """Queue one step's forward pass on the device, and the logits where a token is sampled or a prompt
        token scored; None when there is neither. Nothing here waits for the device."""
        ids, pos, meta, (rows, scored, targets) = self.prepare(step)
        hidden = self.run_model(ids, pos, meta)  # (N, C)
        if not step.sample_rows and not step.prompt_rows:
            return None
        logits = self.model.compute_logits(hidden[rows])  # (S + P, C) @ (C, V) -> (S + P, V)
        return StepLogits(logits, ids[rows[:len(step.sample_rows)]], scored, targets)

    @torch.inference_mode()
    def sample(self, out: Optional[StepLogits], step: StepInput, logits_hook: Optional[Callable] = None):
        """The step's tokens (SampledTokens) from its logits: logprobs of the raw logits (as vLLM by default),
        then the engine's logits_hook (structured outputs, logits controls: in place on the (S, V) rows that
        sample), then the sampler. The tokens stay on the device as the next step's PENDING inputs."""
        if out is None:
            return None
        S, logits = len(step.sample_rows), out.logits
        if len(out.scored):
            raw_logprobs = logits[out.scored].log_softmax(dim=-1)  # (R, V)
        if logits_hook is not None and S:
            logits_hook(logits[:S])
        tokens = self.pick_tokens(logits[:S], step, out.last_ids) if S else out.last_ids.new_zeros(0)  # (S,)
        report = None
        if len(out.scored):
            scored_ids = torch.cat([tokens[out.scored[:len(step.logprob_rows)]], out.targets])  # (R,)
            report = gather_logprobs(raw_logprobs, scored_ids, min(step.num_logprobs, logits.shape[-1]))
        self.last_sampled = tokens
        return SampledTokens(tokens, report)

    def pick_tokens(self, logits: torch.Tensor, step: StepInput, last_ids: torch.Tensor) -> torch.Tensor:
        """logits (S, V) -> (S,) tokens, after min_tokens' blocked tokens; last_ids (S,) are the sampled rows'
        input tokens (an output ending in PENDING ends in that one)."""
        V = logits.shape[-1]
        for row, blocked in enumerate(step.blocked):
            if blocked:
                logits[row, [t for t in blocked if t < V]] = float("-inf")
        st, rows = self.sampling_tensors(step.params, step.generators, V)
        if step.penalty_ids:  # rows 4, 5, 6: presence, frequency, repetition
            st = replace(st, penalties=(*self.seen_tokens(step.penalty_ids, last_ids, V), *rows[4:]))
        return sample(logits, st, self.generator)

    def sampling_tensors(self, ps: list[SamplingParams], generators: list, V: int) -> tuple[SamplingTensors, Any]:
        """The rows' SamplingTensors (without penalties) and their (7, S) parameter rows, built again only when the
        rows' requests changed: in a run of decode steps the batch is the same sequences step after step, and
        building them (seven lists of S and a copy to the device) cost a sixth of the host's step."""
        if self.last_sampling is not None:
            old_ps, old_gens, rows, st = self.last_sampling  # (holding the params keeps their ids from being reused)
            if (len(old_ps) == len(ps) and all(a is b for a, b in zip(old_ps, ps))
                    and all(a is b for a, b in zip(old_gens, generators))):
                return st, rows
        top_k = [p.top_k if 0 < p.top_k < V else V for p in ps]  # a top_k past the vocabulary keeps all, as vLLM
        rows = torch.tensor([[p.temperature for p in ps], [p.top_p for p in ps], [p.min_p for p in ps], top_k,
                             [p.presence_penalty for p in ps], [p.frequency_penalty for p in ps],
                             [p.repetition_penalty for p in ps]], dtype=torch.float32)  # (7, S): one copy
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        st = SamplingTensors(
            temperature=rows[0], top_p=rows[1], min_p=rows[2], top_k=rows[3].long(),
            generators={row: g for row, (g, p) in enumerate(zip(generators, ps)) if g is not None and not p.greedy},
            all_greedy=all(p.greedy for p in ps), any_min_p=any(p.min_p > 0 for p in ps),
            any_top_k_top_p=any(k < V for k in top_k) or any(p.top_p < 1 for p in ps))
        self.last_sampling = (ps, generators, rows, st)
        return st, rows

    def seen_tokens(self, penalty_ids: list[tuple], last_ids: torch.Tensor, V: int) -> tuple[torch.Tensor, Any]:
        """For the penalties: which tokens each prompt holds, (S, V) bool, and how often each output holds them,
        (S, V). The ids go up padded with id V, which lands in a spare column; an output's PENDING last token
        is its row's input token on the device."""
        prompts, outputs = [p for p, _ in penalty_ids], [o for _, o in penalty_ids]
        S, pw, ow = len(prompts), max(map(len, prompts)), max(1, max(map(len, outputs)))
        prompt_ids, output_ids = self.upload([t for x in prompts for t in x + [V] * (pw - len(x))],
                                             [t for x in outputs for t in x + [V] * (ow - len(x))])
        prompt_ids, output_ids = prompt_ids.view(S, pw).long(), output_ids.view(S, ow).long()
        output_ids = torch.where(output_ids == PENDING, last_ids[:, None], output_ids)
        prompt_mask = torch.zeros(S, V + 1, dtype=torch.bool, device=self.device).scatter_(1, prompt_ids, True)
        ones = torch.ones(output_ids.shape, device=self.device)
        counts = torch.zeros(S, V + 1, device=self.device).scatter_add_(1, output_ids, ones)  # (S, V + 1)
        return prompt_mask[:, :V], counts[:, :V]



# ----------------------------------------------------------------------------------------------
# 9. The engine: requests in, RequestOutputs out


class LLMEngine:
    """The step-by-step engine, as vLLM's: `add_request`, then `step` until `has_unfinished_requests` is False.
    It owns the text side (requests, scheduling, landing tokens, detokenizing, stops, outputs) and hands each step
    to the ModelRunner through its methods. Its one argument is vLLM's EngineArgs (compat.py checks it)."""

    def __init__(self, args):
        compat = companion("compat")
        self.device = compat.check_device(None if args.device == "auto" else args.device)
        if self.device.type == "cpu":  # as many threads as there are free cores (MINILLM_NUM_THREADS overrides)
            torch.set_num_threads(companion("parallel").choose_cpu_threads())
        if args.seed is not None:  # as vLLM's worker: Python's, NumPy's and torch's global generators
            compat.set_random_seed(args.seed)
        model_path, tokenizer_path = compat.model_paths(args)  # local paths (hub ids found in the HF cache)
        llama, tp = self.load(args, model_path, tokenizer_path)
        self.default_params = compat.default_sampling_params(model_path, args.generation_config,
                                                             args.override_generation_config)
        self.model_name, self.max_logprobs = args.served_model_name or args.model or model_path, args.max_logprobs
        self.max_model_len = compat.check_max_model_len(args.max_model_len, self.cfg)  # None: the model's context
        self.max_num_seqs = args.max_num_seqs or 256
        block_size, max_tokens = args.block_size or 16, args.max_num_batched_tokens or 8192
        self.runner = self.start_runner(args, llama, tp, model_path, dict(
            block_size=block_size, max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max_tokens,
            max_model_len=self.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
            num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            enforce_eager=args.enforce_eager, seed=args.seed))
        num_blocks, self.max_seq_len = self.runner.kv_capacity()
        self.block_manager = BlockManager(num_blocks, block_size, args.enable_prefix_caching is not False)
        loras = args.max_loras if args.enable_lora else 0
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, max_tokens, loras)
        self.scheduling_policy, self.tracing = args.scheduling_policy, bool(args.trace)
        # the observer seam: compat.Metrics counts for get_metrics and times each request; with trace=True,
        # timeline.Recorder, which does that too and records every step
        self.observer = companion("timeline").Recorder(self, model_path) if self.tracing else compat.Metrics()
        self.block_manager.observer = self.scheduler.observer = self.observer
        self.logits_hook = None if not args.logits_processors else self.make_logits_hook(
            args.logits_processors, model_path, llama.embed_tokens.weight.dtype, max_tokens, tp and tp.size)
        self.requests: dict[str, list[Sequence]] = {}  # the unfinished requests, each its n sequences
        self.streaming: dict = {}  # requests whose output is wanted after every step: {id: None, or for
        #                            output_kind DELTA what each completion has reported so far (compat.only_new)}
        self.next_seq_id = 0
        self.free_table_rows = list(range(self.max_num_seqs))  # rows of the runner's block tables (a running
        self.table_row_of: dict[int, Sequence] = {}            # sequence each), and whose they are
        self.in_flight = None  # the last step's (SampledTokens, [(sequence, index of its PENDING token)], scored)
        self.unreported: dict = {}  # requests that finished in a step that then failed (see recover)
        self.profiler = compat.Profiler(args.profiler_config)  # LLM.start_profile() / stop_profile()

    def load(self, args, model_path: str, tokenizer_path: Optional[str]) -> tuple:
        """The model (this process's part of it, under tensor parallelism) and the tokenizer; self.cfg is the
        whole model's config. vLLM's EOS is the tokenizer's; the checkpoint's other EOS ids stop as stop tokens."""
        tp = None if args.tensor_parallel_size == 1 else companion("parallel").check_tensor_parallel(
            args.tensor_parallel_size, self.device)  # the seam of tensor parallelism: rank 0's part of the model
        llama, self.cfg, gguf_tokenizer = load_model(model_path, self.device, args.dtype, args.max_model_len,
                                                     args.hf_overrides, tp)
        use_gguf = gguf_tokenizer is not None and not tokenizer_path
        files = None if use_gguf else formats.read_tokenizer(tokenizer_path or model_path)  # a folder or a file
        self.tokenizer = gguf_tokenizer if use_gguf else make_tokenizer(*files)
        self.eos_ids = set(self.cfg.eos_token_ids) | self.tokenizer.eos_ids
        self.eos_token_id = next((i for i in sorted(self.tokenizer.eos_ids)
                                  if self.tokenizer.decode([i]) == self.tokenizer.eos_token), None)
        return llama, tp

    def start_runner(self, args, llama: "Llama", tp, model_path: str, runner_args: dict) -> "ModelRunner":
        """The LoRA slots (on the device, before the KV cache takes what memory is left) and the model runner; under
        tensor parallelism parallel.TPModelRunner, which starts the worker ranks, each with its own shard's runner."""
        lora_args = (args.max_loras, args.max_lora_rank) if args.enable_lora else None
        self.lora = companion("lora").LoRAManager(llama, *lora_args) if lora_args else None
        if tp is None:
            return ModelRunner(llama, lora_manager=self.lora, **runner_args)
        load_args = dict(path=model_path, dtype=llama.embed_tokens.weight.dtype, max_model_len=args.max_model_len,
                         hf_overrides=args.hf_overrides)  # how each worker loads its own part
        return companion("parallel").TPModelRunner(llama, tp, load_args, lora_args, lora_manager=self.lora,
                                                   **runner_args)

    def make_logits_hook(self, *engine_processors):
        """The logits-hook seam (structured.LogitsHook), made with the engine for LLM(logits_processors=[...]) or by
        the first request with a logits control of its own; between the logits and the sampler, it edits their rows."""
        return companion("structured").LogitsHook.for_engine(self, *engine_processors)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine can do no more work then). Idempotent."""
        if getattr(self, "runner", None) is not None:
            self.runner.close()

    # -- requests --

    def check_params(self, params, label: str) -> SamplingParams:
        """Checked again (a field may have been set since it was made), and against the engine: max_logprobs, and
        the logits hook's checks (grammars, token ids, what the logits processors accept)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{label}: expected a SamplingParams, got {type(params).__name__}")
        try:
            params.verify()
            companion("compat").check_logprobs_cap(params, self.max_logprobs, self.cfg.vocab_size)
            if params.has_logits_controls and self.logits_hook is None:
                self.logits_hook = self.make_logits_hook()
            if self.logits_hook is not None:
                self.logits_hook.check(params)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        return params

    def add_checked(self, request_id: str, text, token_ids, params, lora_request, priority) -> None:
        """Queue a request whose inputs are checked. n > 1 is n sequences (vLLM's child requests): they share the
        prompt's blocks through the prefix cache, child i of a seeded request uses seed + i, as in vLLM, and only
        child 0 computes prompt logprobs (the same for all; the others can then use the cache)."""
        self.runner.forget_sampling()  # a params object may have been changed since its tensors were made
        children = [params] if params.n == 1 else [
            replace(params, n=1, seed=None if params.seed is None else params.seed + c,
                    prompt_logprobs=params.prompt_logprobs if c == 0 else None) for c in range(params.n)]
        seqs = []
        for c, child in enumerate(children):
            generator = None if child.seed is None else torch.Generator(self.device).manual_seed(child.seed)
            seqs.append(Sequence(self.next_seq_id, request_id, c, text, token_ids, child, priority, self.tokenizer,
                                 self.max_seq_len, generator, lora_request))
            self.next_seq_id += 1
        if self.logits_hook is not None:  # each completion its own grammar state
            self.logits_hook.attach(seqs, params)
        self.requests[request_id] = seqs
        self.observer.added(seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step --

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine step, in the walkthrough's numbered parts:
          1. schedule: the scheduler picks the batch; the block manager gives it blocks
          2. lay the batch out as a StepInput; the runner queues its forward pass on the device
          3. sample, after the logits hook (grammars, logits controls), if any row has one
          4. commit: the step has run, so its tokens count as computed and its full blocks may be shared
          5. land the previous step's tokens, read back while steps 2-4 ran: detokenize, check stops
          6. outputs: the requests that finished (and streaming requests that gained a token)
        An exception anywhere leaves every request queued and consistent (see recover)."""
        started = time.perf_counter()
        try:
            batch = self.scheduler.schedule()                                  # 1
            self.observer.scheduled(batch)
            progressed, self.unreported = self.unreported, {}
            previous, self.in_flight = self.in_flight, None
            if batch:
                step, sampled, scored = self.prepare_step(batch)               # 2
                logits = self.runner.forward(step)
                hook = self.logits_hook and self.logits_hook.for_rows(sampled)  # None: no row has a logits control
                if previous and hook is not None and self.logits_hook.needs_tokens(sampled):
                    progressed |= self.land(*previous)  # the hook reads each row's last token: it lands now
                    previous = None
                tokens = self.runner.sample(logits, step, hook)                # 3
                self.in_flight = self.commit(batch, sampled, scored, tokens)  # 4
            if previous:
                progressed |= self.land(*previous)                             # 5
            self.observer.step_ended(started)
            outputs = self.collect_outputs(progressed)                         # 6
            if not self.requests:
                self.in_flight = None  # tokens sampled past the end of finished sequences: nobody needs them
            return outputs
        except BaseException:
            self.recover()
            raise

    def commit(self, batch: list, sampled: list[Sequence], scored: list, tokens) -> Optional[tuple]:
        """Step 4. In the device's stream order the step has run: its K/V are cached, its full blocks may be shared.
        Each sequence that sampled ends in PENDING until its token lands (step 5; the runner feeds it to the next)."""
        for seq, n in batch:
            seq.num_computed_tokens += n
        self.block_manager.commit()
        for row, seq in enumerate(sampled):
            if seq.finish_reason is not None:
                continue  # it finished on the token that landed early (for the hook): this row was sampled in vain
            seq.token_ids.append(PENDING)
            seq.pending_row = row
            if seq.num_tokens >= seq.max_len:  # its last token: nothing more to schedule
                self.scheduler.finish(seq)
        return None if tokens is None else (tokens, [(seq, seq.num_tokens - 1) for seq in sampled], scored)

    def assign_table_rows(self, batch: list[tuple[Sequence, int]]) -> None:
        """Each running sequence has a row of the runner's block tables. A sequence that stopped running (finished,
        aborted, preempted) gives its row back; one that starts gets a free row, sent again whole."""
        for seq_id, seq in list(self.table_row_of.items()):
            if seq.status is not SequenceStatus.RUNNING:  # (a preempted one rejoining keeps its row: free() reset it)
                self.free_table_rows.append(seq.table_row)
                seq.table_row = None
                del self.table_row_of[seq_id]
        for seq, _ in batch:
            if seq.table_row is None:
                seq.table_row, seq.num_uploaded_blocks = self.free_table_rows.pop(), 0
                self.table_row_of[seq.seq_id] = seq

    def prepare_step(self, batch: list[tuple[Sequence, int]]) -> tuple[StepInput, list[Sequence], list]:
        """Step 2: the batch as a StepInput, the sequences that sample a token (their chunk reaches their last
        token), and what is scored: [(sequence, "logprobs" or "prompt_logprobs", k)] in the order of the report."""
        step, sampled, prompt_scored = StepInput([], [], [], [], [], []), [], []
        self.assign_table_rows(batch)
        for seq, n in batch:
            start, first = seq.num_computed_tokens, len(step.input_ids)
            step.input_ids += seq.token_ids[start:start + n]
            step.positions += range(start, start + n)
            step.query_lens.append(n)
            step.table_rows.append(seq.table_row)
            for j in range(seq.num_uploaded_blocks, len(seq.block_table)):  # the blocks the runner's row lacks
                step.table_updates += (seq.table_row, j, seq.block_table[j])
            seq.num_uploaded_blocks = len(seq.block_table)
            step.lora.append((seq.lora_request, n))
            if start + n == seq.num_tokens:
                step.sample_rows.append(len(step.input_ids) - 1)
                if seq.token_ids[-1] == PENDING:
                    step.pending.append((len(step.input_ids) - 1, seq.pending_row))
                sampled.append(seq)
            if seq.prompt_logprobs is not None:  # position p scores prompt token p + 1 (once, also after a preemption)
                for p in range(max(start, seq.num_prompt_logprobs - 1), min(start + n, len(seq.prompt_token_ids) - 1)):
                    step.prompt_rows.append(first + p - start)
                    step.prompt_targets.append(seq.token_ids[p + 1])
                    prompt_scored.append((seq, "prompt_logprobs", seq.params.prompt_logprobs))
                    seq.num_prompt_logprobs += 1
        self.add_sampling_rows(step, sampled)
        scored = [(sampled[row], "logprobs", sampled[row].params.logprobs) for row in step.logprob_rows] + prompt_scored
        step.num_logprobs = max((self.cfg.vocab_size if k == -1 else k for _, _, k in scored), default=0)
        return step, sampled, scored

    def add_sampling_rows(self, step: StepInput, sampled: list[Sequence]) -> None:
        """What the sampler needs of each sampling row: its params and generator, the tokens min_tokens still blocks
        (EOS and stop tokens, until the output is that long), and the ids the penalties count."""
        for row, seq in enumerate(sampled):
            p = seq.params
            step.params.append(p)
            step.generators.append(seq.generator)
            early = seq.num_output_tokens < p.min_tokens
            stoppers = (set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)) if early else ()
            step.blocked.append(sorted(stoppers))
            if p.logprobs is not None:
                step.logprob_rows.append(row)
        if any(seq.params.has_penalties for seq in sampled):
            step.penalty_ids = [(seq.prompt_token_ids, seq.output_token_ids) for seq in sampled]

    def land(self, sampled: SampledTokens, landing: list, scored: list) -> dict:
        """Step 5: the previous step's tokens reach the host: each PENDING placeholder becomes its token, with its
        logprobs; then detokenize and check the stop conditions. Returns the ids of the requests to report."""
        tokens, rows = sampled.get()
        logprob_entry = companion("compat").logprob_entry
        width = len(rows) // len(scored) if scored else 0
        for r, (seq, kind, k) in enumerate(scored):
            row = rows[r * width:(r + 1) * width]  # a gather_logprobs row; logprob_entry makes it vLLM's dict
            if kind == "prompt_logprobs":
                seq.prompt_logprobs.append(logprob_entry(self.tokenizer, row, k, seq.prompt_logprobs, seq.params))
            elif seq.finish_reason is None:  # (else its token is dropped below)
                seq.logprobs.append(logprob_entry(self.tokenizer, row, k, seq.logprobs, seq.params))
                seq.cumulative_logprob += row[1]
        progressed = {}
        for (seq, i), token in zip(landing, tokens):
            if seq.finish_reason is not None:
                continue  # it finished on an earlier token, or was aborted: this one was computed in vain
            seq.token_ids[i] = token
            self.observer.token(seq)
            if self.process_token(seq, i):
                self.scheduler.finish(seq)
                self.observer.finished(seq)
            if seq.finish_reason is not None or seq.request_id in self.streaming:  # (collect_outputs reports no other)
                progressed[seq.request_id] = True
        return progressed

    def recover(self, abort=()) -> None:
        """Back to a consistent state after an exception (Ctrl-C included) anywhere in a step or in generate: `abort`'s
        requests are dropped; every other unfinished sequence waits to be recomputed from its known tokens; nothing
        is in flight; no block is held, or cached unless its step ran. Rebuilt from `requests`, so it holds whatever
        was half done. What stays: the prefix cache's other blocks, the seeded generators where they are, metrics."""
        for rid in abort:
            self.requests.pop(rid, None)
            self.streaming.pop(rid, None)
        # a request that finished in the failed step but was not reported yet is reported by the next step
        self.unreported = {rid: True for rid, seqs in self.requests.items() if all(s.finish_reason for s in seqs)}
        self.in_flight = None
        self.runner.reset()
        if self.logits_hook is not None:  # the engine's logits processors are told every row anew
            self.logits_hook.reset()
        for seq in self.table_row_of.values():
            seq.table_row = None
        self.table_row_of, self.free_table_rows = {}, list(range(self.max_num_seqs))
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        for seq in itertools.chain(*self.requests.values()):
            if seq.finish_reason is not None:
                continue
            while seq.token_ids[-1] == PENDING:  # never landed: it will be sampled again
                seq.token_ids.pop()
            seq.restart()
            if seq.prompt_logprobs is not None:
                seq.num_prompt_logprobs = len(seq.prompt_logprobs)
            self.scheduler.add(seq)
        self.block_manager.reset()

    # -- outputs --

    def collect_outputs(self, progressed: dict) -> list[RequestOutput]:
        outputs = []
        for rid in progressed:
            seqs = self.requests.get(rid)
            done = seqs is not None and all(s.finish_reason is not None for s in seqs)
            if done or rid in self.streaming:
                outputs.append(companion("compat").only_new(self.make_output(rid, seqs, done), self.streaming.get(rid)))
            if done:
                del self.requests[rid]
                self.streaming.pop(rid, None)
        return outputs

    @staticmethod
    def make_output(request_id: str, seqs: list[Sequence], finished: bool) -> RequestOutput:
        s0 = seqs[0]
        completions = [CompletionOutput(s.index, s.text, [t for t in s.output_token_ids if t != PENDING],
                                        None if s.logprobs is None else s.cumulative_logprob, s.logprobs,
                                        s.finish_reason, s.stop_reason, s.lora_request) for s in seqs]
        return RequestOutput(request_id, s0.prompt, s0.prompt_token_ids, completions, finished=finished,
                             prompt_logprobs=s0.prompt_logprobs, lora_request=s0.lora_request, metrics=s0.stats,
                             num_cached_tokens=max(s.num_cached_tokens or 0 for s in seqs))

    def process_token(self, seq: Sequence, i: int) -> bool:
        """Token i of `seq` has landed: extend the text and decide whether the sequence is finished, by vLLM's
        rules. EOS and stop tokens count once min_tokens tokens exist, and their own text is left out unless
        include_stop_str_in_output. Stop strings are looked for once the output is longer than min_tokens."""
        p, token, n = seq.params, seq.token_ids[i], i + 1 - len(seq.prompt_token_ids)  # n: output tokens so far
        if seq.controls is not None and not self.logits_hook.accept(seq, token):
            seq.finish_reason = "stop"  # its grammar allows no such token: only when other masks left it nothing else
        if n >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_ids:  # stop_reason None only for the tokenizer's eos_token
                seq.finish_reason, seq.stop_reason = "stop", None if token == self.eos_token_id else token
            elif token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
        old_len = len(seq.text)
        if p.detokenize and (seq.finish_reason is None or p.include_stop_str_in_output):
            seq.text += seq.detokenizer.add(token)
        if p.stop and n > p.min_tokens:
            find_stop_string(seq, old_len)  # sets the finish reason when one matched
        if seq.finish_reason is None and i + 1 >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return False
        del seq.token_ids[i + 1:]  # a token sampled after this one, still in flight, is dropped
        return True

    # -- vLLM's LLMEngine calls beyond the step loop (compat.py) --

    @classmethod
    def from_engine_args(cls, engine_args, usage_context=None) -> "LLMEngine":
        return cls(engine_args)  # (usage_context: accepted, no effect)

    def add_request(self, *args, **kwargs) -> None: companion("compat").add_request(self, *args, **kwargs)
    def abort_request(self, request_id) -> None: companion("compat").abort_request(self, request_id)
    def reset_prefix_cache(self, **kwargs) -> bool: return companion("compat").reset_prefix_cache(self, **kwargs)
    def get_metrics(self) -> list: return companion("compat").get_metrics(self)


def find_stop_string(seq: Sequence, old_len: int) -> bool:
    """Look for a stop string that ends in the newly added text; cut the text there if found. Of several, the
    one that completes first wins, ties going to list order (vLLM's rule)."""
    p, best = seq.params, None
    for stop in p.stop:
        i = seq.text.find(stop, max(0, old_len - len(stop) + 1))
        if i != -1 and (best is None or i + len(stop) < best[0] + len(best[1])):
            best = i, stop
    if best is None:
        return False
    i, stop = best
    seq.text = seq.text[: i + len(stop) if p.include_stop_str_in_output else i]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True


class LLM:
    """An offline engine: load a model once, then `generate` batches of prompts. model: None (the built-in SmolLM2),
    a HF checkpoint folder, a .gguf file or a hub id; the keyword arguments are vLLM's (compat.EngineArgs)."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        compat = companion("compat")
        self.llm_engine = LLMEngine(compat.EngineArgs(model=model, **engine_args))
        self.request_counter = itertools.count()  # request ids: one per prompt, counting on across calls
        self.last_trace: Optional[dict] = None  # with trace=True: what the last generate call did, step by step

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool | Callable = True, lora_request=None,
                 priority: Optional[list[int]] = None) -> list[RequestOutput]:
        """Generate completions for `prompts`; one RequestOutput per prompt, in input order. All or nothing:
        every input is checked before the first request is queued, and an exception of any kind (Ctrl-C
        included) aborts this call's requests (LLMEngine.recover says what is reset and what stays)."""
        engine = self.llm_engine  # every input checked before any is queued: [(text, ids, params, lora, priority)]
        requests = companion("compat").check_batch(self, prompts, sampling_params, lora_request, priority)
        if engine.tracing:
            engine.observer.clear()
        ids = []
        try:
            for request in requests:
                ids.append(str(next(self.request_counter)))
                engine.add_checked(ids[-1], *request)
            outputs = self.run_engine(len(ids), use_tqdm)
        except BaseException:
            engine.recover(abort=ids)
            raise
        self.last_trace = engine.observer.trace() if engine.tracing else None
        return [outputs[i] for i in ids]

    def run_engine(self, num_requests: int, use_tqdm) -> dict[str, RequestOutput]:
        """Step until every request is finished, under vLLM's progress bar (compat.ProgressBar) of finished prompts."""
        outputs, bar = {}, companion("compat").ProgressBar(use_tqdm, num_requests)
        try:
            while self.llm_engine.has_unfinished_requests():
                finished = [out for out in self.llm_engine.step() if out.finished]
                outputs.update((out.request_id, out) for out in finished)
                bar.update(finished)
        finally:
            bar.close()
        return outputs

    # -- vLLM's LLM calls beyond generate: one line each, the work in compat.py --

    def chat(self, *args, **kwargs) -> list: return companion("compat").chat(self, *args, **kwargs)
    def beam_search(self, *args, **kwargs) -> list: return companion("compat").beam_search(self, *args, **kwargs)
    def prompt_logits(self, *args, **kwargs): return companion("compat").prompt_logits(self, *args, **kwargs)  # (T, V)
    def get_tokenizer(self) -> Tokenizer: return self.llm_engine.tokenizer
    def get_default_sampling_params(self) -> SamplingParams: return SamplingParams(**self.llm_engine.default_params)
    def reset_prefix_cache(self, **kwargs) -> bool: return self.llm_engine.reset_prefix_cache(**kwargs)
    def get_metrics(self) -> list: return self.llm_engine.get_metrics()
    def start_profile(self) -> None: self.llm_engine.profiler.start()
    def stop_profile(self) -> None: self.llm_engine.profiler.stop()
    def close(self) -> None: self.llm_engine.close()  # stops tensor-parallel workers (interpreter exit does too)
    def __enter__(self) -> "LLM": return self
    def __exit__(self, *exc) -> None: self.close()

    def __del__(self):
        if "llm_engine" in self.__dict__:
            self.llm_engine.close()


# ----------------------------------------------------------------------------------------------
# 10. generate() for small scripts (the command line is cli.py's)

_engines: dict = {}  # (model, kwargs) -> LLM: a script that calls generate() twice loads the model once


def generate(prompts, sampling_params=None, *, model: Optional[str] = None, use_tqdm=True, lora_request=None,
             **llm_kwargs):
    """One-call generation: `generate("Hello", SamplingParams(max_tokens=20))`. Keeps the engine for next time."""
    key = (model, tuple(sorted(llm_kwargs.items())))
    if key not in _engines:
        _engines[key] = LLM(model, **llm_kwargs)
    return _engines[key].generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
