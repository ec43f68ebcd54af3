"""
The files minillm reads, byte by byte: llama.cpp's GGUF container (metadata and quantized tensors), and the
tokenizer formats that all become one tiktoken Encoding: a tiktoken tokenizer.model (Llama 3), a HF
tokenizer.json of byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2 style), and a GGUF file's vocabulary.

minillm.py's loading and tokenizer sections call these; what the engine needs of a tokenizer is minillm.Tokenizer.
"""

from __future__ import annotations

import base64
import json
import math
import mmap
import os
import struct

import numpy as np
import tiktoken
import torch

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
        import gguf
        with open(path, "rb") as f:  # copy-on-write: numpy and torch get writable views, the file stays as it is
            self.buf, self.pos = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 0
        magic, version, n_tensors, n_kv = self.unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        self.fields = {self.string(): self.value(self.unpack("<I")[0]) for _ in range(n_kv)}
        infos = [(self.string(), self.unpack(f"<{self.unpack('<I')[0]}Q"), *self.unpack("<IQ")) for _ in range(n_tensors)]
        align = self.fields.get("general.alignment", 32)
        start = -(-self.pos // align) * align
        self.tensors = []  # (name, ggml type, raw bytes shaped (rows..., bytes per row)) in file order
        for name, dims, kind, offset in infos:
            kind = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]  # elements per block, bytes per block
            shape = (*reversed(dims[1:]), dims[0] // block * block_bytes)
            data = np.frombuffer(self.buf, np.uint8, math.prod(shape), start + offset).reshape(shape)
            self.tensors.append((name, kind, data))

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self.pos += n
        return self.buf[self.pos - n: self.pos].decode("utf-8")

    def strings(self, count: int) -> list[str]:  # string() `count` times, in one tight loop (vocabularies)
        out, buf, pos, u64 = [], self.buf, self.pos, struct.Struct("<Q")
        for _ in range(count):
            (n,) = u64.unpack_from(buf, pos)
            out.append(buf[pos + 8: pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        self.pos = pos
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

# Llama 3's 256 special tokens from id 128000, named as in Meta's tokenizer.py. Llama 3.1 ships
# the same tokenizer.model but renamed ids 128004/128008/128010 (<|finetune_right_pad_id|>,
# <|eom_id|>, <|python_tag|>); a folder's tokenizer.json, preferred when present, has its names.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)]]

SUPPORTED = ("supported: a tiktoken tokenizer.model (Llama 3), a byte-level BPE tokenizer.json "
             "(GPT-2, Llama 3, SmolLM2, Qwen2 style), a GGUF with tokenizer.ggml.model 'gpt2'")


def byte_level_chars() -> dict[str, int]:
    # byte-level BPE spells each byte as a printable char: printable latin-1 bytes as themselves,
    # the other 68 as chr(256), chr(257), ... in byte order. This is the way back.
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(rest)}


UNBYTE = byte_level_chars()
BYTE_CHARS = {b: c for c, b in UNBYTE.items()}


def bpe_encoding(name, pat, vocab, added):
    """vocab: [(byte-level string, id)] sorted by id; added: {text: id} of tokens matched whole.
    Returns (Encoding, {id: bytes} of tokens it can't hold, ids made up for missing bytes)."""
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
    enc = tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks | unknown, special_tokens=dict(added))
    return enc, extra, set(unknown.values())



def new_tokenizer(*args, **kwargs) -> "Tokenizer":
    from minillm import Tokenizer  # (minillm imports this file: here the class is defined by the time it is called)
    return Tokenizer(*args, **kwargs)


def from_tiktoken_model(path) -> Tokenizer:
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
    return new_tokenizer(enc, specials.values(), bos_id=specials["<|begin_of_text|>"], add_bos=True,
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


def from_hf_json(path) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ValueError(f"{path}: a {model.get('type')} model with pre_tokenizer {pre.get('type')} is not "
                         f"supported (only byte-level BPE is, not SentencePiece-style as Llama 2); {SUPPORTED}")
    if tj.get("normalizer"):
        raise ValueError(f"{path}: normalizer {tj['normalizer'].get('type')} is not supported; {SUPPORTED}")
    # (added tokens' lstrip/rstrip/single_word flags are not honoured; Llama 3 and SmolLM2 set none)
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    # prepending BOS is the post-processor's job: a template like "<|begin_of_text|> $A" (Llama 3)
    bos_id, pp = None, tj.get("post_processor") or {}
    for proc in pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]:
        first = (proc.get("single") or [{}])[0] if proc.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            bos_id = added.get(first["SpecialToken"]["id"])
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    enc, extra, unknown = bpe_encoding(os.path.basename(path), hf_pattern(pre), vocab, added)
    return new_tokenizer(enc, special_ids, bos_id, (), bos_id is not None, extra, unknown, len(model["vocab"]))


def apply_tokenizer_config(tok: Tokenizer, cfg: dict):
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


def tokenizer_from_gguf(fields: dict) -> Tokenizer:
    """The vocabulary in a GGUF file's metadata (GGUFFile.fields: the model loader has them read already)."""
    import gguf
    get = fields.get
    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported ('llama' is SentencePiece); {SUPPORTED}")
    pats = {"llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT, "llama-v3": LLAMA3_PAT,
            "smollm": SMOLLM_PAT, "gpt2": GPT2_PAT, "gpt-2": GPT2_PAT}
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
    tok = new_tokenizer(enc, special_ids, get("tokenizer.ggml.bos_token_id"), eos_ids, add_bos, extra, unknown, len(tokens))
    tok.chat_template = get("tokenizer.chat_template")
    keys = {"eos_token": "eos_token_id", "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    for name, key in keys.items():  # the named special tokens, as transformers reads them from a GGUF
        if (i := get(f"tokenizer.ggml.{key}")) is not None:
            setattr(tok, name, tokens[i])
    return tok
