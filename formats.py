"""
The files minillm reads, byte by byte: a HF checkpoint's config.json (and its safetensors headers, each tensor's
shape checked against the config), llama.cpp's GGUF container (metadata and quantized tensors of the llama, qwen2
and qwen3 architectures), and the tokenizer formats that all become one tiktoken Encoding: a tiktoken tokenizer.model
(Llama 3), a HF tokenizer.json of byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2 style), and a GGUF file's vocabulary.

minillm.py's loading and tokenizer sections call these. This file does not import minillm: what it returns is plain
data (a dict of minillm.ModelConfig's fields, the keyword arguments of minillm.Tokenizer, float tensors by
parameter name), and minillm builds its own objects from it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import mmap
import os
import re
import struct
import unicodedata
from typing import Iterator, NamedTuple, Optional

import numpy as np
import tiktoken
import torch

# ----------------------------------------------------------------------------------------------
# HF checkpoint folders: config.json (the safetensors minillm.load_hf_checkpoint reads itself)


def read_json(folder: str, name: str) -> dict:  # {} when the folder has no such file
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except json.JSONDecodeError as e:  # (its message alone names neither the file nor the format)
            raise ValueError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not JSON (not UTF-8 text: byte {e.start} is {e.object[e.start]:#04x})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object but a {type(data).__name__}")
    return data


def read_hf_config(folder: str, hf_overrides=None) -> tuple[dict, list[str]]:
    """A HF checkpoint folder -> (minillm.ModelConfig's fields, its safetensors files: the shards that
    model.safetensors.index.json lists, else model.safetensors). hf_overrides: vLLM's, see apply_hf_overrides.
    Each file's header is read here, so that a file cut short or a tensor whose shape the config contradicts is
    one line naming the file (check_safetensors), before any weight is read."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    cfg = apply_hf_overrides(read_json(folder, "config.json"), hf_overrides)
    generation_cfg = read_json(folder, "generation_config.json")
    try:
        fields = hf_config_fields(cfg, generation_cfg)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}, which minillm needs") from None
    except ValueError as e:  # (an architecture or feature minillm does not run: the message says which)
        raise ValueError(f"{path}: {e}") from None
    files = sorted(set(read_json(folder, "model.safetensors.index.json").get("weight_map", {}).values()))
    files = files or ["model.safetensors"]
    check_safetensors(folder, files, fields, cfg)
    return fields, files


def checkpoint_dtype(path: str) -> Optional[str]:
    """The dtype a HF folder's config.json names ("bfloat16", ...); None for a GGUF file or a config without one."""
    cfg = read_json(path, "config.json") if os.path.isdir(path) else {}
    return cfg.get("dtype") or cfg.get("torch_dtype")


def apply_hf_overrides(cfg: dict, hf_overrides) -> dict:
    """vLLM's hf_overrides on config.json: a dict's keys replace the config's; a function gets the config with
    its keys as attributes (as a transformers PretrainedConfig has them) and returns it."""
    if callable(hf_overrides):
        return vars(hf_overrides(argparse.Namespace(**cfg)))
    return {**cfg, **(hf_overrides or {})}


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # config.json's model_type: the Llama block and its variations


def hf_config_fields(cfg: dict, generation_cfg: dict) -> dict:
    """config.json and generation_config.json -> the fields of minillm.ModelConfig. ValueError for what the model
    does not implement: another architecture, an o_proj or MLP bias, a sliding window shorter than the context,
    a RoPE scaling other than linear and llama3. Qwen2 has biases on q, k and v; Qwen3 a norm on q and k."""
    family = cfg.get("model_type") or "llama"
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not supported; minillm runs {', '.join(FAMILIES)}")
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):  # (Llama, Mistral and Qwen3 put it on o_proj too)
        raise ValueError(f"model_type={family!r} with attention_bias or mlp_bias is not supported")
    window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)
    if window and window < context and (family == "mistral" or cfg.get("use_sliding_window")):
        raise ValueError(f"model_type={family!r} with a sliding window of {window} tokens (shorter than "
                         f"max_position_embeddings={context}) is not supported")
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3 are)")
    eos = set()
    for src in (cfg, generation_cfg):
        e = src.get("eos_token_id")
        eos |= set(e) if isinstance(e, list) else ({e} if e is not None else set())
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0, rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        max_position_embeddings=context,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), eos_token_ids=tuple(sorted(eos)),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
    )


# ----------------------------------------------------------------------------------------------
# A checkpoint's tensors against its config: each fault one line that names the file, before a weight is read


class Described(NamedTuple):
    """Where a checkpoint's sizes come from, as check_tensors' messages name it."""
    name: str     # "config.json", "its metadata" (a GGUF file's)
    model: str    # the model it describes: "model_type 'qwen2', num_hidden_layers=24"
    labels: dict  # each size of dim_sizes -> its key there: {"V": "vocab_size", "C": "hidden_size", ...}


def param_dims(fields: dict) -> dict[str, tuple[str, ...]]:
    """Every parameter of the model that minillm.ModelConfig's fields describe -> its shape, in the symbols of
    dim_sizes ("H*D": heads times head size). lm_head.weight is among them, though a checkpoint of tied
    embeddings may leave it out."""
    layer = {"input_layernorm.weight": ("C",), "post_attention_layernorm.weight": ("C",),
             "self_attn.q_proj.weight": ("H*D", "C"), "self_attn.k_proj.weight": ("KVH*D", "C"),
             "self_attn.v_proj.weight": ("KVH*D", "C"), "self_attn.o_proj.weight": ("C", "H*D"),
             "mlp.gate_proj.weight": ("F", "C"), "mlp.up_proj.weight": ("F", "C"), "mlp.down_proj.weight": ("C", "F")}
    if fields.get("qkv_bias"):
        layer |= {"self_attn.q_proj.bias": ("H*D",), "self_attn.k_proj.bias": ("KVH*D",),
                  "self_attn.v_proj.bias": ("KVH*D",)}
    if fields.get("qk_norm"):
        layer |= {"self_attn.q_norm.weight": ("D",), "self_attn.k_norm.weight": ("D",)}
    dims = {"embed_tokens.weight": ("V", "C"), "norm.weight": ("C",), "lm_head.weight": ("V", "C")}
    return dims | {f"layers.{i}.{name}": d for i in range(fields["num_layers"]) for name, d in layer.items()}


def dim_sizes(fields: dict) -> dict[str, int]:
    """V vocabulary, C hidden size, F MLP size, H query heads, KVH key/value heads, D head size."""
    H, C = fields["num_heads"], fields["hidden_size"]
    return dict(V=fields["vocab_size"], C=C, F=fields["intermediate_size"], H=H, KVH=fields["num_kv_heads"] or H,
                D=fields["head_dim"] or C // H)  # (head_dim 0: hidden_size / heads, as minillm.ModelConfig has it)


def check_tensors(fields: dict, found: dict, described: Described, checkpoint: str) -> None:
    """found: {parameter name: (file, the tensor's name there, its full shape)}, the tensors of `checkpoint` (a
    folder or a file). ValueError, one line naming the file, for a tensor that is no parameter of the model the
    config describes, whose shape is not the one the config gives it, or that is missing; torch's load_state_dict
    would say so in many lines, naming neither. Whole shapes: under tensor parallelism the loaders read only a cut
    part of each tensor."""
    dims, size = param_dims(fields), dim_sizes(fields)
    for name, (file, shown, shape) in found.items():
        if name not in dims:
            raise ValueError(f"{file}: tensor '{shown}' is not a parameter of the model {described.name} describes "
                             f"({described.model})")
        want = tuple(math.prod(size[s] for s in d.split("*")) for d in dims[name])
        if tuple(shape) != want:
            symbols = dict.fromkeys(s for d in dims[name] for s in d.split("*"))  # each once, in order
            why = list(dict.fromkeys(f"{described.labels[s]}={size[s]}" for s in symbols))
            raise ValueError(f"{file}: tensor '{shown}' is {tuple(shape)} but {described.name}'s {', '.join(why)} "
                             f"make{'s' if len(why) == 1 else ''} it {want}")
    missing = [name for name in dims if name not in found and name != "lm_head.weight"]  # (tied: the embedding's)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{checkpoint}: no tensor '{missing[0]}'{more}, which the model {described.name} "
                         f"describes ({described.model}) needs")


def check_safetensors(folder: str, files: list[str], fields: dict, cfg: dict) -> None:
    """read_hf_config's check of the folder's safetensors files (their headers only) against config.json (cfg)."""
    found = {}
    for file in files:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            listed = " (model.safetensors.index.json lists it)" if file != "model.safetensors" else ""
            raise FileNotFoundError(f"{path}: no such file{listed}; minillm reads a checkpoint's safetensors")
        for name, shape in safetensors_shapes(path).items():
            if "rotary_emb" not in name:  # (RoPE frequencies old checkpoints saved: minillm computes them)
                found[name.removeprefix("model.")] = (path, name, shape)
    labels = dict(V="vocab_size", C="hidden_size", F="intermediate_size", H="num_attention_heads",
                  KVH="num_key_value_heads" if cfg.get("num_key_value_heads") else "num_attention_heads",
                  D="head_dim" if cfg.get("head_dim") else "hidden_size/num_attention_heads")
    model = f"model_type {cfg.get('model_type') or 'llama'!r}, num_hidden_layers={fields['num_layers']}"
    check_tensors(fields, found, Described("config.json", model, labels), folder)


def safetensors_shapes(path: str) -> dict[str, tuple]:
    """A safetensors file's header -> {tensor name: shape}. The layout: a u64 n, then n bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors' bytes,
    the offsets counted from their start. ValueError naming the file when it is cut short or not safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or not 2 <= n <= 100_000_000:  # (at least "{}"; at most safetensors' own limit)
            fault = f"the file is {size} bytes long" if n is None else f"its first 8 bytes give a header of {n} bytes"
            raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt: {fault})")
        first = f.read(1)
        if first not in (b"{", b""):  # (the JSON header: a file of another format fails here)
            raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt: its header does not "
                             "start with '{')")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated (the file ends at byte {size}, inside its header, which needs "
                             f"bytes up to {8 + n})")
        try:
            header = json.loads(first + f.read(n - 1))
            tensors = {k: (tuple(v["shape"]), 8 + n + v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt: its header is not "
                             f"the JSON safetensors writes: {type(e).__name__}: {e})") from None
    cut = [(end, name) for name, (_, end) in tensors.items() if end > size]
    if cut:
        end, name = min(cut)  # the first tensor the file's end cuts into
        raise ValueError(f"{path}: truncated (the file ends at byte {size}, its tensor '{name}' needs bytes "
                         f"up to {end})")
    return {name: shape for name, (shape, _) in tensors.items()}


# ----------------------------------------------------------------------------------------------
# GGUF


class GGUFFile:
    """What minillm reads of a llama.cpp GGUF file: its key/value metadata and its tensors' bytes, memory-mapped.

    The layout (little-endian; strings are a u64 length and UTF-8 bytes):
        "GGUF", u32 version, u64 tensor count, u64 key/value count
        key/values:    string key, u32 value type, the value (an array: u32 item type, u64 count, the items)
        tensor infos:  string name, u32 n_dims, u64 dims[n_dims] (fastest-varying first), u32 ggml type, u64 offset
        tensor data:   from the next multiple of general.alignment (32 by default), each at its offset
    The gguf package's reader wraps every field in numpy views, seconds for a vocabulary of 50k tokens and as
    many merges; this reads the values straight into Python objects."""

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, path: str):
        if os.path.getsize(path) == 0:  # (mmap refuses an empty file, in words that do not name it)
            raise ValueError(f"{path}: not a GGUF file (it is empty)")
        with open(path, "rb") as f:  # copy-on-write: numpy and torch get writable views, the file stays as it is
            self.buf, self.pos, self.path = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 0, path
        magic, version = self.buf[:4], int.from_bytes(self.buf[4:8], "little")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF file of version 2 or 3 (magic {magic!r}, "
                             f"version {version})")
        _, _, n_tensors, n_kv = self.unpack("<4sIQQ")
        try:
            self.fields = {self.string(): self.value(self.unpack("<I")[0]) for _ in range(n_kv)}
            infos = [(self.string(), self.unpack(f"<{self.unpack('<I')[0]}Q"), *self.unpack("<IQ"))
                     for _ in range(n_tensors)]
        except (UnicodeDecodeError, KeyError) as e:  # a string that is not UTF-8, a value type that does not exist
            raise ValueError(f"{path}: not a valid GGUF file (corrupt header near byte {self.pos}: "
                             f"{type(e).__name__} {e})") from None
        align = self.fields.get("general.alignment", 32)
        self.tensors, self.shapes = self.locate(infos, -(-self.pos // align) * align)

    def locate(self, infos: list, start: int) -> tuple[list, dict]:
        """The tensor infos -> ([(name, ggml type, raw bytes shaped (rows..., bytes per row))] in file order,
        {name: shape (rows..., row length) in elements, as HF's}); the bytes start at offset `start`."""
        import gguf
        tensors, shapes = [], {}
        for name, dims, kind, offset in infos:
            if kind not in gguf.GGML_QUANT_SIZES:
                raise ValueError(f"{self.path}: not a valid GGUF file (tensor '{name}' has ggml type {kind}, "
                                 "which does not exist)")
            kind = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]  # elements per block, bytes per block
            shape = (*reversed(dims[1:]), dims[0] // block * block_bytes)
            if start + offset + math.prod(shape) > len(self.buf):  # (numpy's message names neither file nor tensor)
                raise ValueError(f"{self.path}: truncated (the file ends at byte {len(self.buf)}, its tensor "
                                 f"'{name}' needs bytes up to {start + offset + math.prod(shape)})")
            tensors.append((name, kind, np.frombuffer(self.buf, np.uint8, math.prod(shape), start + offset)
                            .reshape(shape)))
            shapes[name] = tuple(reversed(dims))
        return tensors, shapes

    def need(self, n: int) -> None:
        """Every read of the header asks first, so that a file cut short says so, not struct's or numpy's words."""
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated (the file ends at byte {len(self.buf)}, inside its header, "
                             f"which needs bytes up to {self.pos + n} at least)")

    def unpack(self, fmt: str) -> tuple:
        self.need(struct.calcsize(fmt))
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n: self.pos].decode("utf-8")

    def strings(self, count: int) -> list[str]:  # string() `count` times, in one tight loop (vocabularies)
        out, buf, pos, u64 = [], self.buf, self.pos, struct.Struct("<Q")
        try:  # (no bounds checks in the loop: a slice past the end is short, and the check after it sees that)
            for _ in range(count):
                (n,) = u64.unpack_from(buf, pos)
                out.append(buf[pos + 8: pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except (struct.error, UnicodeDecodeError):
            self.pos = pos
            self.string()  # raises what is wrong there: the file ends inside this string, or it is not UTF-8
        self.pos = pos
        self.need(0)  # (the file ends inside the last string)
        return out

    def value(self, kind: int):
        if kind == self.STRING:
            return self.string()
        if kind != self.ARRAY:
            return self.unpack(self.SCALARS[kind])[0]
        item, count = self.unpack("<IQ")
        if item == self.STRING:
            return self.strings(count)
        if item == self.ARRAY:
            return [self.value(item) for _ in range(count)]
        self.need(count * struct.calcsize(self.SCALARS[item]))
        items = np.frombuffer(self.buf, self.SCALARS[item], count, self.pos)  # numbers: one read for all
        self.pos += items.nbytes
        return items.tolist()


def dequantize(data: np.ndarray, kind) -> torch.Tensor:
    """A GGUF tensor's raw bytes (rows..., bytes per row) -> float32 (rows..., row length). llama.cpp's three
    basic formats in torch, a few times faster than numpy and bit for bit the same; other types via the gguf
    package. Each block holds 32 weights: an fp16 scale d, for Q4_1 an fp16 minimum m, then the codes
    q (Q8_0: int8, w = d*q; Q4_0: 4-bit, w = d*(q-8); Q4_1: 4-bit, w = d*q + m; weight j of a 4-bit block
    is the low nibble of code byte j, weight j+16 the high one)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if kind not in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return torch.from_numpy(np.array(gguf.quants.dequantize(data, kind)))  # a copy, not a view of the file
    blocks = torch.from_numpy(data).view(-1, gguf.GGML_QUANT_SIZES[kind][1])    # (n_blocks, bytes per block)
    fp16 = lambda i: blocks[:, i:i + 2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if kind == Q.Q8_0:
        w = blocks[:, 2:].view(torch.int8) * fp16(0)                            # (n_blocks, 32)
    else:
        codes = blocks[:, 4:] if kind == Q.Q4_1 else blocks[:, 2:]              # (n_blocks, 16)
        q = torch.cat([codes & 15, codes >> 4], dim=1)                          # (n_blocks, 32), 0..15
        w = q * fp16(0) + fp16(2) if kind == Q.Q4_1 else (q.float() - 8) * fp16(0)
    return w.view(*data.shape[:-1], -1)


# GGUF tensor names -> our (HF-style) parameter names: llama.cpp's names (gguf.TENSOR_NAMES) of the tensors that
# its llama, qwen2 and qwen3 architectures have (gguf.MODEL_TENSORS), each with ".weight" or ".bias" after it
GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

# general.architecture -> minillm.ModelConfig's (qkv_bias, qk_norm), as HF's model_type (hf_config_fields).
# Mistral's GGUF files say llama: llama.cpp converts MistralForCausalLM as a Llama.
ARCHITECTURES = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}


def read_gguf(path: str, hf_overrides=None) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], tuple[dict, dict]]:
    """A llama.cpp GGUF file -> (minillm.ModelConfig's fields, its weights, its tokenizer's pieces: see
    tokenizer_from_gguf). The weights are an iterator of (parameter name, float32 tensor, (out, in) like HF's):
    each tensor is dequantized when it is reached, so that the caller can cut it and move it to the device
    before the next one is made. Every tensor's name and shape is checked against the metadata first."""
    file = GGUFFile(path)
    arch = file.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported; minillm runs "
                         f"{', '.join(ARCHITECTURES)} (a Mistral GGUF is llama)")
    tokenizer = tokenizer_from_gguf(file.fields)
    fields = gguf_overrides(gguf_config_fields(file, arch, tokenizer[0]["eos_ids"]), hf_overrides, path)
    params = {name: gguf_param_name(name) for name in file.shapes if name != "rope_freqs.weight"}
    check_tensors(fields, {param: (path, name, file.shapes[name]) for name, param in params.items()},
                  Described("its metadata", f"architecture {arch!r}, {arch}.block_count={fields['num_layers']}",
                            gguf_labels(file.fields, arch)), path)
    n_heads, n_kv = fields["num_heads"], fields["num_kv_heads"]

    def weights():
        for name, kind, data in file.tensors:
            if name == "rope_freqs.weight":  # (in fields already)
                continue
            w, param = dequantize(data, kind), params[name]  # (out, in) like HF
            # llama.cpp's converter interleaves the two rotary halves of each head's Q/K rows for the llama
            # architecture only, whose RoPE in llama.cpp rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM); qwen2 and
            # qwen3 rotate halves (NEOX), as HF does, and keep HF's rows. Undo it: first half, then second half.
            if arch == "llama" and param.endswith(("q_proj.weight", "k_proj.weight")):
                heads = n_heads if "q_proj" in param else n_kv
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
            yield param, w
    return fields, weights(), tokenizer


def gguf_param_name(name: str) -> str:
    """A GGUF tensor's name -> our parameter's: blk.3.attn_q.bias -> layers.3.self_attn.q_proj.bias. A name of no
    parameter stays as it is (check_tensors refuses it)."""
    *base, kind = name.split(".")
    if len(base) == 3 and base[0] == "blk" and base[1].isdigit() and base[2] in GGUF_NAMES:
        return f"layers.{base[1]}.{GGUF_NAMES[base[2]]}.{kind}"
    return f"{GGUF_NAMES[base[0]]}.{kind}" if len(base) == 1 and base[0] in GGUF_NAMES else name


def gguf_config_fields(file: GGUFFile, arch: str, eos_ids) -> dict:
    """A GGUF file's metadata -> minillm.ModelConfig's fields; the model's sizes are keys under `arch.`."""
    def meta(key: str, *default):  # a key without a default must be there
        if key not in file.fields and not default:
            raise ValueError(f"{file.path}: its metadata has no {key}, which minillm needs")
        return file.fields.get(key, *default)
    rope_type = meta(f"{arch}.rope.scaling.type", "none")
    if rope_type not in ("none", "linear"):  # (Llama 3.1's scaling is the rope_freqs tensor)
        raise ValueError(f"{file.path}: {arch}.rope.scaling.type={rope_type!r} is not supported (none, linear are)")
    # Llama 3.1 scaling, stored as a tensor of per-frequency divisors
    rope_freqs = [dequantize(data, kind).tolist() for name, kind, data in file.tensors if name == "rope_freqs.weight"]
    n_heads = meta(f"{arch}.attention.head_count")
    return dict(
        vocab_size=len(meta("tokenizer.ggml.tokens")), hidden_size=meta(f"{arch}.embedding_length"),
        intermediate_size=meta(f"{arch}.feed_forward_length"), num_layers=meta(f"{arch}.block_count"),
        num_heads=n_heads, num_kv_heads=meta(f"{arch}.attention.head_count_kv", None) or n_heads,
        head_dim=meta(f"{arch}.attention.key_length", 0),
        rms_norm_eps=meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling={"rope_type": "linear", "factor": meta(f"{arch}.rope.scaling.factor")}
        if rope_type == "linear" else None,
        rope_freq_factors=rope_freqs[0] if rope_freqs else None,
        max_position_embeddings=meta(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in file.shapes, eos_token_ids=tuple(sorted(eos_ids)),
        qkv_bias=ARCHITECTURES[arch][0], qk_norm=ARCHITECTURES[arch][1],
    )


# config.json's names of the GGUF config's fields that minillm.ModelConfig names otherwise
HF_NAMES = dict(num_hidden_layers="num_layers", num_attention_heads="num_heads", num_key_value_heads="num_kv_heads")


def gguf_overrides(fields: dict, hf_overrides, path: str) -> dict:
    """vLLM's hf_overrides on a GGUF model: vLLM applies them to the HF config it derives from the metadata, so
    they use config.json's names (max_position_embeddings, rope_theta, num_hidden_layers, eos_token_id, ...);
    here they land on the fields the metadata gave. A key of no such field is a ValueError naming the known ones."""
    if not hf_overrides:
        return fields
    hf = {hf_name: fields[name] for hf_name, name in HF_NAMES.items()} | fields
    hf["eos_token_id"] = list(fields["eos_token_ids"])
    new = apply_hf_overrides(dict(hf), hf_overrides)
    unknown = [key for key in new if key not in hf]
    if unknown:
        raise ValueError(f"{path}: hf_overrides {unknown} name no field of a GGUF model's config; minillm "
                         f"applies {sorted(set(hf) - {'eos_token_ids'})}")
    changed = {key: value for key, value in new.items() if value != hf[key]}
    if "eos_token_id" in changed:
        eos = changed.pop("eos_token_id")
        changed["eos_token_ids"] = tuple([eos] if isinstance(eos, int) else eos)
    return fields | {HF_NAMES.get(key, key): value for key, value in changed.items()}


def gguf_labels(fields: dict, arch: str) -> dict:
    """The metadata key of each size of dim_sizes, for check_tensors' messages."""
    heads, kv, key_length = (f"{arch}.attention.{key}" for key in ("head_count", "head_count_kv", "key_length"))
    return dict(V="len(tokenizer.ggml.tokens)", C=f"{arch}.embedding_length", F=f"{arch}.feed_forward_length",
                H=heads, KVH=kv if fields.get(kv) else heads,
                D=key_length if fields.get(key_length) else f"{arch}.embedding_length/{heads}")


# ----------------------------------------------------------------------------------------------
# Tokenizer files -> tiktoken.Encoding
#
# All are byte-level BPE, and a token's tiktoken rank is its id. BPE trainers hand out ids in
# merge order, so "merge the adjacent pair whose result has the lowest id" (tiktoken) yields the
# same tokens as "apply the earliest merge rule" (HF tokenizers); the tests check it on a corpus.

# GPT-2's split regex (HF ByteLevel(use_regex=True), llama.cpp pre "gpt2")
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3 (Meta's tokenizer.py and its tokenizer.json; llama.cpp pre "llama-bpe")
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# SmolLM2: HF first cuts out every digit (Digits(individual_digits=True)), then runs the GPT-2
# regex on the pieces between them. As one regex: a digit is a piece of its own, and whitespace
# right before a digit is taken whole, since for `\s+(?!\S)` that digit was the end of the piece.
SMOLLM_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Qwen2, Qwen2.5 and Qwen3 (their tokenizer.json's Split; llama.cpp pre "qwen2"): Llama 3's, but each digit alone
QWEN2_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
             r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Llama 3's 256 special tokens from id 128000, named as in Meta's tokenizer.py. Llama 3.1 ships
# the same tokenizer.model but renamed ids 128004/128008/128010 (<|finetune_right_pad_id|>,
# <|eom_id|>, <|python_tag|>); a folder's tokenizer.json, preferred when present, has its names.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)]]

SUPPORTED = ("supported: a tiktoken tokenizer.model (Llama 3), a byte-level BPE tokenizer.json "
             "(GPT-2, Llama 3, SmolLM2, Qwen style; no normalizer or NFC), a GGUF with tokenizer.ggml.model 'gpt2'")


def byte_level_chars() -> dict[str, int]:
    # byte-level BPE spells each byte as a printable char: printable latin-1 bytes as themselves,
    # the other 68 as chr(256), chr(257), ... in byte order. This is the way back.
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(rest)}


UNBYTE = byte_level_chars()
BYTE_CHARS = {b: c for c, b in UNBYTE.items()}


class NFCEncoding(tiktoken.Encoding):
    """A tiktoken Encoding behind a tokenizer.json's NFC normalizer (Qwen's): HF composes the text ("e" + U+0301
    becomes "é") before it splits it, tiktoken normalizes nothing. As in HF, the added tokens are found in the text
    as written (Qwen's are `normalized: false`) and only the text between them is normalized: a special token
    followed by a combining mark ("<|im_end|>" + U+0338) stays a special token. Only encode and encode_ordinary
    normalize (minillm calls nothing else); a special token that is not allowed is encoded on its own."""

    @functools.cached_property
    def added_split(self) -> re.Pattern:  # text -> [text, added token, text, ...]; the longest token first
        tokens = sorted(self.special_tokens_set, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else re.compile("(?!)")

    def encode_ordinary(self, text: str) -> list[int]:
        return super().encode_ordinary(unicodedata.normalize("NFC", text))

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        if unicodedata.is_normalized("NFC", text):  # nearly always: nothing to do
            return super().encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        ids = []
        for i, piece in enumerate(self.added_split.split(text)):
            if i % 2:  # an added token's text: tiktoken's rules (allowed_special, ...) say what it becomes
                ids += super().encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
            else:
                ids += self.encode_ordinary(piece)
        return ids


def bpe_encoding(name, pat, vocab, added, nfc=False):
    """vocab: [(byte-level string, id)] sorted by id; added: {text: id} of tokens matched whole; nfc: the text is
    NFC-normalized first (NFCEncoding). Returns (Encoding, {id: bytes} of tokens it can't hold, ids made up for
    missing bytes)."""
    ranks, extra = {}, {}
    for s, i in vocab:
        if s in added:
            continue  # added tokens are cut out of the text before BPE: not ranks but specials
        try:
            b = bytes(UNBYTE[c] for c in s)
        except KeyError:  # not byte-level: BPE can never produce it, it only decodes (as text)
            extra[i] = s.encode()
            continue
        if b in ranks:  # tiktoken needs bytes <-> rank 1:1; the lowest id wins, the others only decode
            extra[i] = b
            continue
        ranks[b] = i
    # tiktoken bottoms out at single bytes, so it needs all 256, but vocabularies can lack some
    # (SmolLM2: 0xC0, 0xC1, some control chars); HF and llama.cpp drop such bytes. So do we: they
    # get ids past the vocabulary, which encode() removes.
    next_id = max([*ranks.values(), *extra, *added.values()]) + 1
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    unknown = {b: next_id + k for k, b in enumerate(missing)}
    kind = NFCEncoding if nfc else tiktoken.Encoding
    enc = kind(name, pat_str=pat, mergeable_ranks=ranks | unknown, special_tokens=dict(added))
    return enc, extra, set(unknown.values())


# Each converter returns the keyword arguments of minillm.Tokenizer's constructor:
#   enc          the tiktoken.Encoding
#   special_ids  the ids skip_special_tokens skips
#   bos_id, eos_ids, add_bos    the tokenizer's own BOS / EOS ids, and whether encode() prepends BOS
#   extra        {id: bytes} of ids the Encoding cannot decode; unknown: ids made up for missing bytes (dropped)
#   vocab_size   the model's vocabulary, without added tokens


def from_tiktoken_model(path) -> dict:
    # "base64(token bytes) rank" per line; a SentencePiece tokenizer.model (protobuf) fails to parse
    with open(path, "rb") as f:
        lines = [line.split() for line in f.read().splitlines() if line]
    try:
        ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in lines}
    except (ValueError, TypeError):
        raise ValueError(f"{path} is not a tiktoken BPE file: SentencePiece tokenizer.model files "
                         f"(Llama 2, Mistral, ...) are not supported; {SUPPORTED}") from None
    specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(os.path.basename(path), pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    # as Meta's reference code: always start with BOS, stop at either of its two stop tokens
    return dict(enc=enc, special_ids=set(specials.values()), bos_id=specials["<|begin_of_text|>"], add_bos=True,
                eos_ids={specials["<|end_of_text|>"], specials["<|eot_id|>"]}, vocab_size=len(ranks))


def hf_pattern(pre: dict) -> str:
    """The split regex equivalent to a HF pre-tokenizer, for the combinations byte-level BPE uses."""
    p = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds, last = [x.get("type") for x in p], p[-1] if p else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return GPT2_PAT
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) and "Regex" in p[0]["pattern"] \
                and p[0].get("behavior") == "Isolated" and not p[0].get("invert"):
            return p[0]["pattern"]["Regex"]  # Llama 3, Qwen2
        if kinds == ["Digits", "ByteLevel"] and p[0].get("individual_digits") and last.get("use_regex", True):
            return SMOLLM_PAT
    raise ValueError(f"pre_tokenizer {json.dumps(pre)} is not supported; supported: ByteLevel(use_regex=True), "
                     "Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)], "
                     "Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]")


def from_hf_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ValueError(f"{path}: a {model.get('type')} model with pre_tokenizer {pre.get('type')} is not "
                         f"supported (only byte-level BPE is, not SentencePiece-style as Llama 2); {SUPPORTED}")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC: Qwen's
        raise ValueError(f"{path}: normalizer {normalizer} is not supported (NFC is); {SUPPORTED}")
    # (added tokens' lstrip/rstrip/single_word flags are not honoured; Llama 3, SmolLM2 and Qwen set none)
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    # prepending BOS is the post-processor's job: a template like "<|begin_of_text|> $A" (Llama 3)
    bos_id, pp = None, tj.get("post_processor") or {}
    for proc in pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]:
        first = (proc.get("single") or [{}])[0] if proc.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            bos_id = added.get(first["SpecialToken"]["id"])
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    enc, extra, unknown = bpe_encoding(os.path.basename(path), hf_pattern(pre), vocab, added, normalizer == "NFC")
    return dict(enc=enc, special_ids=special_ids, bos_id=bos_id, eos_ids=(), add_bos=bos_id is not None, extra=extra,
                unknown=unknown, vocab_size=len(model["vocab"]))


def apply_tokenizer_config(tok, cfg: dict):  # tok: a minillm.Tokenizer
    # transformers' tokenizer_config.json, when there, has the last word on BOS and EOS
    def token_id(t):  # written as "text" or {"content": "text", ...}
        t = t.get("content") if isinstance(t, dict) else t
        return tok.enc.encode_single_token(t) if t in tok.enc.special_tokens_set else None
    if token_id(cfg.get("bos_token")) is not None:
        tok.bos_id = token_id(cfg["bos_token"])
    if cfg.get("add_bos_token") is not None:
        tok.add_bos = cfg["add_bos_token"] and tok.bos_id is not None
    if token_id(cfg.get("eos_token")) is not None:
        tok.eos_ids = {token_id(cfg["eos_token"])}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if cfg.get(name):
            setattr(tok, name, cfg[name].get("content") if isinstance(cfg[name], dict) else cfg[name])
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []  # (transformers 5's name)
    extra = extra.values() if isinstance(extra, dict) else extra
    tok.additional_special_tokens = [t.get("content") if isinstance(t, dict) else t for t in extra]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    tok.chat_template = template or tok.chat_template


def tokenizer_from_gguf(fields: dict) -> tuple[dict, dict]:
    """The vocabulary in a GGUF file's metadata (GGUFFile.fields: the model loader has them read already) ->
    (minillm.Tokenizer's keyword arguments, {attribute: value} to set on the Tokenizer once built: the chat
    template and the named special tokens the file has)."""
    import gguf
    get = fields.get
    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported ('llama' is SentencePiece); {SUPPORTED}")
    # (no NFC for "qwen2", unlike Qwen's tokenizer.json: llama.cpp and transformers' GGUF tokenizer normalize nothing)
    pats = {"llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT, "llama-v3": LLAMA3_PAT, "smollm": SMOLLM_PAT,
            "qwen2": QWEN2_PAT, "deepseek-r1-qwen": QWEN2_PAT, "gpt2": GPT2_PAT, "gpt-2": GPT2_PAT}
    if pre not in pats:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(pats)}")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    # control tokens (<|im_start|>) and user-defined ones are stored as plain text and matched
    # whole; only control tokens are special (llama.cpp prints user-defined ones)
    T = gguf.TokenType
    added = {s: i for i, (s, t) in enumerate(zip(tokens, types)) if t in (T.CONTROL, T.USER_DEFINED)}
    special_ids = {i for i, t in enumerate(types) if t == T.CONTROL}
    vocab = [(s, i) for i, (s, t) in enumerate(zip(tokens, types)) if t != T.UNUSED]
    eos_ids = {get("tokenizer.ggml.eos_token_id"), get("tokenizer.ggml.eot_token_id")} - {None}
    add_bos = get("tokenizer.ggml.add_bos_token", pats[pre] is LLAMA3_PAT)
    enc, extra, unknown = bpe_encoding(f"gguf-{pre}", pats[pre], vocab, added)
    kwargs = dict(enc=enc, special_ids=special_ids, bos_id=get("tokenizer.ggml.bos_token_id"), eos_ids=eos_ids,
                  add_bos=add_bos, extra=extra, unknown=unknown, vocab_size=len(tokens))
    attrs = {"chat_template": get("tokenizer.chat_template")}
    keys = {"eos_token": "eos_token_id", "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    for name, key in keys.items():  # the named special tokens, as transformers reads them from a GGUF
        if (i := get(f"tokenizer.ggml.{key}")) is not None:
            attrs[name] = tokens[i]
    return kwargs, attrs


def read_tokenizer(path: str) -> tuple[dict, dict, Optional[dict]]:
    """A model folder (its tokenizer.json, else tokenizer.model), or a tokenizer.json, tokenizer.model or .gguf
    file -> (minillm.Tokenizer's keyword arguments, {attribute: value} to set on it last: a GGUF's chat template
    and named tokens, or the folder's chat_template.jinja; the folder's tokenizer_config.json or None, for
    apply_tokenizer_config)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        found = [f for f in ("tokenizer.json", "tokenizer.model") if os.path.exists(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
        path = os.path.join(path, found[0])
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return *tokenizer_from_gguf(GGUFFile(path).fields), None
    kwargs = from_hf_json(path) if magic.lstrip()[:1] == b"{" else from_tiktoken_model(path)
    # transformers' tokenizer_config.json, when there, has the last word on BOS and EOS (apply_tokenizer_config)
    has_config = os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    config = read_json(folder, "tokenizer_config.json") if has_config else None
    attrs = {}
    if os.path.exists(template := os.path.join(folder, "chat_template.jinja")):  # where transformers 5 saves it
        with open(template, encoding="utf-8") as f:
            attrs["chat_template"] = f.read()
    return kwargs, attrs, config
