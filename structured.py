"""
Constrained decoding for minillm: structured outputs (JSON schema, regex, choice, grammar), the
per-request logits controls (logit_bias, allowed_token_ids, bad_words, logits_processors), and vLLM v1's
engine-level logits processors (LLM(logits_processors=[cls, ...]), section 5).

The contract: pure logits transforms and grammar states, no engine knowledge; LogitsHook (at the end) is the one
object minillm's engine holds, its seam between the logits and the sampler. Through it the engine
  1. validates a request's params before any work (StructuredOutputsParams checks itself;
     GrammarCompiler.compile raises ValueError for a bad schema/regex/grammar; LogitsControls.from_params
     checks the ids; EngineLogitsProcessors.validate asks each processor class),
  2. gives each completion its own GrammarState (n > 1: one per child) and LogitsControls,
  3. each step asks for_rows(sequences) and, once the rows' output tokens are on the host (needs_tokens), the
     runner calls apply_masks, apply_logits_controls and EngineLogitsProcessors.apply, before sampling, on the
     (S, V) logits of only the rows sampled this step (not the prompt-logprobs rows, nor a prefill chunk that
     samples nothing),
  4. calls accept(seq, token) when a token lands (its grammar state advances),
  5. after an exception in a step, calls EngineLogitsProcessors.reset.

How a mask is made: the grammar engine, xgrammar, compiles the vocabulary once per tokenizer and each
distinct constraint once; a GrammarState is a pushdown-automaton matcher that writes the next token's
allowed set as a bitmask, 32 tokens to an int32 word (bit j of word w is token 32*w + j), on the CPU.
apply_masks uploads the bitmask of the constrained rows in one copy and sets the disallowed logits to -inf
on the device. Rows without a constraint are never touched. xgrammar is an optional dependency
(`pip install 'minillm[structured]'`), imported on the first constrained request.

Why xgrammar (benchmarks/grammar_engines.py compares it with llguidance and outlines-core): the fastest mask per token at
49k and 128k vocabularies, its mask equals its own token-by-token acceptance exactly (the reference test
below holds it to that), unlimited rollback and fork for free, EBNF/GBNF, Lark, regex and JSON schema; it
is vLLM's default backend.

Dimension legend: S rows of the logits given (the engine gives the rows it samples this step, one per
sampled sequence), R constrained rows, V vocab size (the model's: padded rows included), W = ceil(V / 32)
bitmask words per row.

References: vLLM's structured outputs and v1 logits processors; XGrammar (Dong et al. 2024, arXiv:2411.15100).
"""

from __future__ import annotations

import collections.abc
import functools
import importlib
import inspect
import json
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Callable, Optional, Sequence

import torch

INSTALL_HINT = "pip install 'minillm[structured]' (or: pip install xgrammar)"

# ----------------------------------------------------------------------------------------------
# 1. Params


@dataclass
class StructuredOutputsParams:
    """What the output must match; exactly one of the five kinds. vLLM's names."""
    json: Optional[str | dict] = None    # a JSON schema, as a dict or its JSON text
    regex: Optional[str] = None          # the whole output matches it
    choice: Optional[list[str]] = None   # the output is one of these strings
    grammar: Optional[str] = None        # EBNF as llama.cpp's GBNF (rules `name ::= ...`, root `root`), or Lark (`start: ...`)
    json_object: Optional[bool] = None   # True: any JSON object or array (xgrammar's builtin JSON grammar, as vLLM)
    disable_any_whitespace: bool = False  # JSON: no free whitespace between items (compact `,` and `:`)

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        name = type(self).__name__
        if len(given) != 1:
            raise ValueError(f"{name} needs exactly one of {', '.join(self.KINDS)}; "
                             f"got {', '.join(given) if given else 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}.json is not valid JSON: {e}") from None
            elif not isinstance(value, dict):
                raise ValueError(f"{name}.json must be a dict or a JSON string, got {type(value).__name__}")
        elif kind in ("regex", "grammar") and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name}.{kind} must be a non-empty string, got {value!r}")
        elif kind == "choice":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name}.choice must be a non-empty list of strings, got {value!r}")
            if not all(isinstance(c, str) and c for c in value):
                raise ValueError(f"{name}.choice must hold non-empty strings, got {value!r}")
            self.choice = list(value)
        elif kind == "json_object" and value is not True:
            raise ValueError(f"{name}.json_object must be True or None, got {value!r}")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """Equal for constraints that compile to the same grammar."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value)  # same text for the same schema
        elif self.kind == "choice":
            value = tuple(value)
        return self.kind, value, self.disable_any_whitespace


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for StructuredOutputsParams (SamplingParams(guided_decoding=...))."""
    backend: Optional[str] = None  # accepted for old code; only xgrammar is here

    def __post_init__(self):
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"GuidedDecodingParams.backend: only 'xgrammar' is available, got {self.backend!r}")
        super().__post_init__()


# ----------------------------------------------------------------------------------------------
# 2. Grammars: one compiler per tokenizer, one state per completion


def require_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ImportError(f"structured outputs need the xgrammar package: {INSTALL_HINT}") from None
    return xgrammar


def token_vocabulary(tokenizer, vocab_size: int) -> list[bytes]:
    """Each id's raw bytes, as the grammar engine matches them. Special tokens, ids standing for bytes
    the vocabulary lacks, and padded embedding rows past the tokenizer are b"": they are not text, so a
    grammar never allows them (xgrammar treats empty tokens as special), except as a stop token."""
    skip = tokenizer.special_ids | tokenizer.unknown
    return [b"" if i in skip else tokenizer.token_bytes(i) for i in range(vocab_size)]


def ebnf_literal(text: str) -> str:
    """A string as an EBNF literal: quotes and backslashes escaped, control characters as \\uXXXX
    (xgrammar reads \\x greedily, so \\x01f would be one character)."""
    def escape(c):
        if c in '"\\':
            return "\\" + c
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
    return '"' + "".join(map(escape, text)) + '"'


# JSON's free whitespace, at most this many characters between two items: room for pretty-printing ("\n" and
# 16 spaces), but a small model can no longer loop on newlines forever (greedy SmolLM2-135M did, in 8 of 32
# outputs of tests/test_structured.py's SCHEMA, inside an array of numbers). vLLM leaves it unbounded.
MAX_JSON_WHITESPACE = 20


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary size: the vocabulary once (here), each
    distinct constraint once (the cache). stop_ids: the engine's EOS ids; a finished grammar allows only them."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        xgr = require_xgrammar()
        self.xgr, self.vocab_size, self.stop_ids = xgr, vocab_size, sorted(stop_ids)
        if not self.stop_ids:
            raise ValueError("GrammarCompiler needs at least one stop (EOS) token id")
        info = xgr.TokenizerInfo(token_vocabulary(tokenizer, vocab_size), xgr.VocabType.RAW,
                                 vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self.cache: dict[tuple, Any] = {}  # cache_key -> xgrammar CompiledGrammar

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params`, from the cache when seen before. A bad schema, regex or grammar
        is a ValueError naming the field."""
        key = params.cache_key()
        if key not in self.cache:
            try:
                self.cache[key] = self.compile_uncached(params)
            except RuntimeError as e:  # xgrammar reports parse errors as RuntimeError("[time] file.cc:line: what")
                what = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())
                raise ValueError(f"structured_outputs.{params.kind} does not compile: {what}") from None
        return self.cache[key]

    def compile_uncached(self, params: StructuredOutputsParams):
        c, kind = self.compiler, params.kind
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
            if params.disable_any_whitespace:
                return c.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            return c.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(params.regex)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(map(ebnf_literal, params.choice)))
        is_ebnf = any("::=" in line for line in params.grammar.splitlines() if not line.lstrip().startswith("#"))
        return c.compile_grammar(params.grammar) if is_ebnf else c.compile_lark(params.grammar)

    def new_state(self, params: StructuredOutputsParams) -> "GrammarState":
        """A fresh state at the start of the output, for one completion."""
        return GrammarState(self.xgr.GrammarMatcher(self.compile(params)), self.stop_ids, self.vocab_size)


class GrammarState:
    """Where one completion is in its grammar. It advances when a token lands (accept), and tells which
    tokens may come next (fill_mask). After a stop token it is terminated, and allows only stop tokens.

    Preemption by recompute keeps the output tokens, so it keeps the state too; to rebuild a state from
    a completion's output tokens, reset() and replay(tokens), or sync(tokens) to accept the ones not yet seen."""

    def __init__(self, matcher, stop_ids: list[int], vocab_size: int):
        self.matcher, self.stop_ids, self.vocab_size = matcher, stop_ids, vocab_size
        self.num_accepted = 0  # tokens accepted so far: the output tokens this state has seen

    def accept(self, token_id: int) -> bool:
        """Advance by one token. False (and no change) if the grammar does not allow it here."""
        if self.matcher.is_terminated():
            return token_id in self.stop_ids  # stays terminated
        if not self.matcher.accept_token(token_id):
            return False
        self.num_accepted += 1
        return True

    def sync(self, output_ids: Sequence[int]) -> bool:
        """Accept the tokens of `output_ids` (a completion's output so far) that this state has not seen.
        False if one is refused (the state stops before it)."""
        for t in output_ids[self.num_accepted:]:
            if not self.accept(t):
                return False
            if self.matcher.is_terminated():
                break  # tokens after a stop token are the engine's to drop
        return True

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into `bitmask_row`, (W,) int32 on the CPU, contiguous."""
        if self.matcher.is_terminated():  # xgrammar has no mask after the stop token: allow the stop tokens
            bitmask_row.zero_()
            for t in self.stop_ids:
                bitmask_row[t // 32] |= to_int32(1 << (t % 32))
            return
        self.matcher.fill_next_token_bitmask(bitmask_row[None], 0)

    def allowed_mask(self, vocab_size: Optional[int] = None) -> torch.Tensor:
        """(V,) bool: which tokens may come next."""
        V = vocab_size or self.vocab_size
        bitmask = torch.zeros(1, words(V), dtype=torch.int32)
        self.fill_mask(bitmask[0])
        return unpack_bitmask(bitmask, V)[0]

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a whole sentence of the grammar: a stop token may come next."""
        return self.matcher.is_terminated() or self.matcher.is_completed()

    def rollback(self, k: int) -> None:
        """Undo the last k accepted tokens (a stop token counts as one)."""
        self.matcher.rollback(k)
        self.num_accepted -= k

    def reset(self) -> None:
        self.matcher.reset()
        self.num_accepted = 0

    def replay(self, token_ids: Sequence[int]) -> bool:
        """Start over and accept `token_ids`."""
        self.reset()
        return self.sync(token_ids)

    def copy(self) -> "GrammarState":
        """An independent state at the same place (e.g. for a second completion or a beam)."""
        other = GrammarState(self.matcher.fork(), self.stop_ids, self.vocab_size)
        other.num_accepted = self.num_accepted
        return other


# ----------------------------------------------------------------------------------------------
# 3. Masks on the device


def words(vocab_size: int) -> int:  # W: int32 words of a bitmask row
    return math.ceil(vocab_size / 32)


def to_int32(x: int) -> int:  # bit 31 set is a negative int32
    return x - (1 << 32) if x >= 1 << 31 else x


def unpack_bitmask_reference(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 -> (R, V) bool: bit j of word w says whether token 32*w + j is allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]  # (R, W, 32) -> (R, V)


@functools.cache
def byte_bits(device) -> torch.Tensor:
    """(256, 8) bool: the bits of each byte value, lowest first."""
    return ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """unpack_bitmask_reference through a table: each byte of the bitmask looks up its 8 bits, one gather
    instead of 32 shifts per word (4x less memory traffic). The int32 words are little-endian (x86, ARM, CUDA),
    so byte k of word w holds tokens 32*w + 8*k ... + 7."""
    R = bitmask.shape[0]
    as_bytes = bitmask.view(torch.uint8).long()                          # (R, W) int32 -> (R, 4W) bytes
    return byte_bits(bitmask.device)[as_bytes].view(R, -1)[:, :vocab_size]  # (R, 4W, 8) -> (R, V)


@functools.cache
def batch_filler():
    """xgrammar's thread pool that fills many rows of a bitmask at once (half the cores)."""
    return require_xgrammar().BatchGrammarMatcher("auto")


def constrained_bitmask(states: Sequence[Optional[GrammarState]], vocab_size: int, pin: bool) -> tuple[list[int], torch.Tensor]:
    """The rows that have a state, and their bitmask (R, W) int32 on the CPU (pinned for a fast async copy).
    The same as states[rows[r]].fill_mask(bitmask[r]) for each r, with the live rows filled in parallel."""
    rows = [i for i, s in enumerate(states) if s is not None]
    bitmask = torch.empty(len(rows), words(vocab_size), dtype=torch.int32, pin_memory=pin)
    live = [r for r, i in enumerate(rows) if not states[i].is_terminated()]
    if live:
        batch_filler().batch_fill_next_token_bitmask([states[rows[r]].matcher for r in live], bitmask, live)
    for r in sorted(set(range(len(rows))) - set(live)):
        states[rows[r]].fill_mask(bitmask[r])  # terminated: only the stop tokens
    return rows, bitmask


def apply_masks(logits: torch.Tensor, states: Sequence[Optional[GrammarState]]) -> torch.Tensor:
    """logits (S, V) on the device, states one per row (None: unconstrained). Sets the logits of
    disallowed tokens to -inf in the rows with a state, in place; other rows are not touched.
    The states must have seen their rows' output tokens so far (see GrammarState.sync)."""
    if all(s is None for s in states):
        return logits
    S, V = logits.shape
    wrong = {s.vocab_size for s in states if s is not None} - {V}
    if wrong:
        raise ValueError(f"apply_masks: logits have {V} columns, a grammar state was compiled for {wrong.pop()}")
    rows, bitmask = constrained_bitmask(states, V, pin=logits.is_cuda)
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), V)  # (R, V)
    if len(rows) == S:
        return logits.masked_fill_(~allowed, float("-inf"))
    index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)  # (R,)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def allowed_tokens_reference(state: GrammarState, tokenizer, vocab_size: int) -> torch.Tensor:
    """The slow, obvious mask: (V,) bool, token t allowed iff a copy of the state accepts t's bytes as text.
    A token without text (special, unknown, padded) is allowed only as a stop token at the grammar's end.
    This walks the grammar byte by byte, not through xgrammar's token-mask machinery."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    text = token_vocabulary(tokenizer, vocab_size)
    for t in range(vocab_size):
        if t in state.stop_ids:
            allowed[t] = state.is_completed()
        elif text[t] and not state.is_terminated():
            allowed[t] = state.copy().matcher.accept_string(text[t])
    return allowed


def apply_masks_reference(logits: torch.Tensor, states: Sequence[Optional[GrammarState]]) -> torch.Tensor:
    """apply_masks row by row, out of place, from allowed_mask."""
    out = logits.clone()
    for i, s in enumerate(states):
        if s is not None:
            out[i][~s.allowed_mask(logits.shape[1]).to(logits.device)] = float("-inf")
    return out


# ----------------------------------------------------------------------------------------------
# 4. Per-request logits controls: logit_bias, allowed_token_ids, bad_words, logits_processors

LOGIT_BIAS_LIMIT = 100.0  # vLLM (and OpenAI) clamp each bias to [-100, 100]


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """ids as a list; a ValueError naming `name` for anything that is not an id of this vocabulary."""
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size}): {bad[:10]}")
    return ids


def bad_words_token_ids(bad_words: Sequence[str], tokenizer, vocab_size: int) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word (leading spaces stripped) is banned as it tokenizes
    alone, and also with one leading space, when that is a different first token in the same number of
    tokens (a word at the start of the text and the same word after a space are different tokens)."""
    sequences = []
    for word in bad_words:
        if not isinstance(word, str) or not word:
            raise ValueError(f"bad_words must hold non-empty strings, got {word!r}")
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            raise ValueError(f"bad_words: {word!r} tokenizes to no token")
        sequences.append(bare)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    check_token_ids("bad_words", (t for s in sequences for t in s), vocab_size)
    return sequences


def processor_arity(fn: Callable) -> int:
    """2 for fn(output_ids, logits), 3 for fn(prompt_ids, output_ids, logits); vLLM's per-request forms."""
    if not callable(fn):
        raise ValueError(f"logits_processors must hold callables, got {fn!r}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: take the common form
        return 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if any(p.kind is p.VAR_POSITIONAL for p in params) and len(positional) <= 2:
        return 2
    if len(positional) not in (2, 3):
        raise ValueError(f"logits_processors: {getattr(fn, '__name__', fn)!r} must take (output_ids, logits) or "
                         f"(prompt_ids, output_ids, logits), it takes {len(positional)} arguments")
    return len(positional)


@dataclass
class LogitsControls:
    """One request's logits controls, checked and prepared once (from_params), applied every step."""
    logit_bias: dict[int, float] = field(default_factory=dict)   # id -> bias, clamped
    allowed_token_ids: Optional[list[int]] = None                # None: all
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences; the last token is banned after the rest
    processors: list[tuple[Callable, int]] = field(default_factory=list)  # (fn, arity)

    @classmethod
    def from_params(cls, params, tokenizer, vocab_size: int) -> Optional["LogitsControls"]:
        """From a SamplingParams-like object's logit_bias, allowed_token_ids, bad_words and logits_processors
        (absent attributes count as unset). None when none is set, so such rows cost nothing."""
        bias = getattr(params, "logit_bias", None) or {}
        allowed = getattr(params, "allowed_token_ids", None)
        words_ = getattr(params, "bad_words", None) or []
        procs = getattr(params, "logits_processors", None) or []
        if not (bias or allowed is not None or words_ or procs):
            return None
        try:
            bias = {int(t): float(b) for t, b in bias.items()}  # JSON gives string keys; vLLM takes them
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
        check_token_ids("logit_bias", bias, vocab_size)
        if allowed is not None:
            allowed = check_token_ids("allowed_token_ids", allowed, vocab_size)
            if not allowed:
                raise ValueError("allowed_token_ids must not be empty")
        return cls({t: max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, b)) for t, b in bias.items()}, allowed,
                   bad_words_token_ids(words_, tokenizer, vocab_size), [(fn, processor_arity(fn)) for fn in procs])

    @property
    def needs_output_ids(self) -> bool:
        """Whether applying these needs the row's output tokens up to the last one (on the host)."""
        return bool(self.processors) or any(len(s) > 1 for s in self.bad_words_ids)

    def banned_tokens(self, output_ids: Sequence[int]) -> list[int]:
        """bad_words: a one-token word always; a longer one's last token when the output ends with the rest."""
        banned = []
        for seq in self.bad_words_ids:
            prefix = seq[:-1]
            if len(prefix) <= len(output_ids) and list(output_ids[len(output_ids) - len(prefix):]) == prefix:
                banned.append(seq[-1])
        return banned


def apply_logits_controls(logits: torch.Tensor, controls: Sequence[Optional[LogitsControls]],
                          output_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """logits (S, V) on the device; one LogitsControls (or None) per row; each row's output (and prompt) ids
    so far. Order: allowed_token_ids, bad_words, logit_bias (each one indexed op over all rows), then the
    per-request processors row by row. Returns the logits (changed in place where possible)."""
    if all(c is None for c in controls):
        return logits
    device, V = logits.device, logits.shape[1]
    todo = [(i, c) for i, c in enumerate(controls) if c is not None]
    # allowed_token_ids: keep the listed ids of the rows that have a list, -inf for the rest of those rows
    limited = [(i, c.allowed_token_ids) for i, c in todo if c.allowed_token_ids is not None]
    if limited:
        pairs = torch.tensor([(r, t) for r, (_, ids) in enumerate(limited) for t in ids], dtype=torch.long)  # (n, 2)
        r, t = pairs.to(device, non_blocking=True).unbind(1)
        keep = torch.zeros(len(limited), V, dtype=torch.bool, device=device).index_put_((r, t), torch.tensor(True, device=device))
        rows = torch.tensor([i for i, _ in limited], dtype=torch.long).to(device, non_blocking=True)  # (L,)
        logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))  # (L, V)
    # bad_words: the (row, token) pairs to ban, then one write
    banned = [(i, t) for i, c in todo for t in c.banned_tokens(output_ids[i])]
    if banned:
        r, t = torch.tensor(banned, dtype=torch.long).to(device).unbind(1)
        logits[r, t] = float("-inf")
    # logit_bias: added in one indexed add (ids are unique per row)
    biased = [(i, t, b) for i, c in todo for t, b in c.logit_bias.items()]
    if biased:
        r = torch.tensor([i for i, _, _ in biased], dtype=torch.long, device=device)
        t = torch.tensor([t for _, t, _ in biased], dtype=torch.long, device=device)
        logits.index_put_((r, t), torch.tensor([b for _, _, b in biased], dtype=logits.dtype, device=device), accumulate=True)
    # per-request processors: user code, one row at a time, each seeing the previous one's result
    for i, c in todo:
        for fn, arity in c.processors:
            out, view = list(output_ids[i]), logits[i]
            row = fn(out, view) if arity == 2 else fn(list(prompt_ids[i]) if prompt_ids else [], out, view)
            if row is not view:  # (a processor may change the row in place and return it)
                logits[i] = row
    return logits


def apply_logits_controls_reference(logits, controls, output_ids, prompt_ids=None):
    """The same, row by row and token by token, out of place."""
    out = logits.clone()
    for i, c in enumerate(controls):
        if c is None:
            continue
        if c.allowed_token_ids is not None:
            for t in range(logits.shape[1]):
                if t not in c.allowed_token_ids:
                    out[i, t] = float("-inf")
        for seq in c.bad_words_ids:
            n = len(seq) - 1
            if n == 0 or (n <= len(output_ids[i]) and list(output_ids[i])[-n:] == seq[:-1]):
                out[i, seq[-1]] = float("-inf")
        for t, b in c.logit_bias.items():
            out[i, t] += b
        for fn, arity in c.processors:
            args = (list(output_ids[i]), out[i]) if arity == 2 else (list(prompt_ids[i]) if prompt_ids else [], list(output_ids[i]), out[i])
            out[i] = fn(*args)
    return out


# ----------------------------------------------------------------------------------------------
# 5. Engine-level logits processors: vLLM v1's interface, for LLM(logits_processors=[cls, ...])
#
# One object per class for the whole engine, acting on the whole batch. It keeps its own state per row (which
# rows it acts on, and how), so before each step that samples the engine tells it how the rows changed since
# the last one (a BatchUpdate), then hands it the (S, V) logits of the rows that sample. A row is one sampled
# sequence (each of a request's n completions is its own), in the step's order. A sequence joins the batch at
# the step that samples its first token and leaves it at the first step that does not sample it: finished,
# aborted or preempted (vLLM also takes unscheduled requests out of its batch); a preempted one is added again
# when it resumes, its output_ids as long as they were.


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()  # (a, b, UNIDIRECTIONAL): the row at a moves to b; a is left empty
    SWAP = auto()            # (a, b, SWAP): the rows at a and b trade places


@dataclass(frozen=True)
class BatchUpdate:
    """How the rows changed since the last update, to apply in this order: `removed`, rows left empty;
    `added`, (row, params, prompt_ids, output_ids) a new request at that row, replacing whatever was there;
    `moved`, (a, b, MoveDirectionality) one after another. output_ids is live: it grows as the row's tokens land.
    As in vLLM, no row is both removed and added in one update, so removed and added may be read in either order
    (vLLM's own helper, process_dict_updates, reads added first)."""
    batch_size: int
    removed: Sequence[int]
    added: Sequence[tuple]
    moved: Sequence[tuple]


class LogitsProcessor(ABC):
    """vLLM v1's engine-level logits processor. The engine makes one of each class given to LLM, as
    cls(vllm_config, device, is_pin_memory); before every step that samples it calls update_state (a BatchUpdate,
    or None when the rows are those of the last call), then apply with the (S, V) logits of those rows."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Raise ValueError for a request this processor cannot take: called for every request, before any work."""

    @abstractmethod
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        ...

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (S, V) -> (S, V), changed in place or a new tensor."""

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when apply never changes which token of a row is the most likely: greedy rows skip it then."""

    def needs_output_token_ids(self) -> bool:
        """vLLM's hint that output_ids must hold real tokens, not placeholders; minillm's always do."""
        return False

    @abstractmethod
    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        ...


def process_dict_updates(state: dict, update: Optional[BatchUpdate], new_state: Callable) -> bool:
    """vLLM's helper for a processor that acts on some rows: `state` maps a row to that row's entry, made by
    new_state(params, prompt_ids, output_ids) when its request is added (None: the processor leaves that row
    alone). Applies `update` to `state`; returns whether any entry changed."""
    if update is None:
        return False
    changed = False
    for row in update.removed:
        changed |= state.pop(row, None) is not None
    for row, params, prompt_ids, output_ids in update.added:
        entry = new_state(params, prompt_ids, output_ids)
        changed |= state.pop(row, None) is not None or entry is not None
        if entry is not None:
            state[row] = entry
    for a, b, direction in update.moved:
        entry_a, entry_b = state.pop(a, None), state.pop(b, None)
        changed |= entry_a is not None or entry_b is not None
        for row, entry in ((b, entry_a), (a, entry_b if direction is MoveDirectionality.SWAP else None)):
            if entry is not None:
                state[row] = entry
    return changed


@dataclass(frozen=True)
class ModelConfig:
    model: str           # the checkpoint's path
    max_model_len: int   # prompt + output
    vocab_size: int      # V, the logits' width (the model's: padded rows included)
    dtype: torch.dtype

    def get_vocab_size(self) -> int:
        return self.vocab_size


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int            # the most rows a step samples (vLLM's MinP sizes its buffers by it)
    max_num_batched_tokens: int


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int    # processors run on rank 0 only, on the whole vocabulary


@dataclass(frozen=True)
class VllmConfig:
    """What a processor's __init__ gets as vllm_config: the few fields of vLLM's engine config that processors
    commonly read. Any other is an AttributeError that names it."""
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    speculative_config: None = None  # minillm does not speculate


class OutputTokenIds(collections.abc.Sequence):
    """A live, read-only view of one sequence's output token ids, as BatchUpdate.added hands it out: it grows as
    tokens land. A negative id at the end is a token still on the device (minillm's PENDING), not part of the
    view; the engine lands those before it calls the processors, so there the view holds every token."""

    def __init__(self, seq):  # seq: anything with token_ids (prompt + output) and prompt_token_ids
        self.seq = seq

    def __len__(self) -> int:
        ids, start = self.seq.token_ids, len(self.seq.prompt_token_ids)
        end = len(ids)
        while end > start and ids[end - 1] < 0:
            end -= 1
        return end - start

    def __getitem__(self, i):
        start, n = len(self.seq.prompt_token_ids), len(self)
        if isinstance(i, slice):
            return [self.seq.token_ids[start + j] for j in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(f"output token {i} of {n}")
        return self.seq.token_ids[start + i % n]

    def __eq__(self, other) -> bool:
        return isinstance(other, collections.abc.Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


def batch_update(previous: Sequence, current: Sequence, added_info: Callable[[Any], tuple]) -> Optional[BatchUpdate]:
    """The BatchUpdate from the rows the processors hold (`previous`, a key per row; None: a row of unknown
    content, to clear) to this step's rows (`current`, distinct keys). A key in both keeps its entry and only moves.
    A new key is added at its own row when that row is free, else at the lowest free row, and moved from there.
    The row of a key that left is removed, unless a new key is added there (never both, as in vLLM).
    added_info(key) -> (params, prompt_ids, output_ids). None when nothing changed."""
    if list(previous) == list(current):
        return None
    kept = set(previous) & set(current)
    at = {k: i for i, k in enumerate(previous) if k in kept}  # key -> the row it holds
    free = {i for i in range(max(len(previous), len(current))) if i >= len(previous) or previous[i] not in kept}
    new = [k for k in current if k not in kept]
    for row, k in enumerate(current):  # new keys whose own row is free go there ...
        if k not in kept and row in free:
            at[k] = row
            free.discard(row)
    rest = iter(sorted(free))           # ... the others to the lowest free rows
    for k in new:
        if k not in at:
            at[k] = next(rest)
    added = [(at[k], *added_info(k)) for k in new]
    taken = {at[k] for k in new}
    removed = [i for i, k in enumerate(previous) if k not in kept and i not in taken]
    # then every key to its row, in row order: into an empty row, or trading places with the key there
    holder = {i: k for k, i in at.items()}  # row -> key
    moved = []
    for row, k in enumerate(current):
        src = at[k]
        if src == row:
            continue
        if row in holder:  # its key belongs to a later row: it takes k's old one
            other = holder[row]
            moved.append((src, row, MoveDirectionality.SWAP))
            at[other], holder[src] = src, other
        else:
            moved.append((src, row, MoveDirectionality.UNIDIRECTIONAL))
            del holder[src]
        at[k], holder[row] = row, k
    return BatchUpdate(len(current), removed, added, moved)


def load_processor_class(entry, label: str) -> type:
    """An engine-level processor as a class: a LogitsProcessor subclass, or its fully qualified name,
    "pkg.module:Class" (vLLM's spelling) or "pkg.module.Class". A TypeError or ValueError naming `label` else."""
    if isinstance(entry, str):
        module_name, _, qualname = entry.partition(":") if ":" in entry else entry.rpartition(".")
        if not module_name or not qualname:
            raise ValueError(f"{label}: {entry!r} is not a qualified class name ('pkg.module:Class' or 'pkg.module.Class')")
        try:
            obj = importlib.import_module(module_name)
            for attr in qualname.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{label}: cannot load {entry!r}: {e}") from e
        entry = obj
    if not (isinstance(entry, type) and issubclass(entry, LogitsProcessor)):
        hint = ("; a per-request function goes in SamplingParams(logits_processors=[...])"
                if callable(entry) and not isinstance(entry, type) else "")
        raise TypeError(f"{label}: expected a subclass of LogitsProcessor (structured.LogitsProcessor, importable "
                        f"from minillm) or its qualified name, got {entry!r}{hint}")
    return entry


class EngineLogitsProcessors:
    """The engine's logits processors, LLM(logits_processors=[...]), and the rows they hold.

    apply(logits, sequences), each step that samples: one BatchUpdate from the last step's rows to this step's
    (keyed by sequence id) to every processor's update_state, then each processor's apply on the (S, V) logits,
    whose rows the sampler then reads (a processor that returns a new tensor has it copied back). The engine
    lands every in-flight token first, so the output_ids views are complete.

    is_argmax_invariant() follows vLLM's rule: greedy rows skip such a processor (vLLM takes their argmax before
    it runs, then applies it for the sampled rows only). So it is not called in a step whose rows are all
    greedy, and otherwise greedy rows get their logits back after it; update_state is still called every step.
    The argmax-invariant ones run after the others, as in vLLM; unlike vLLM, which runs them after penalties and
    temperature, they see the logits before min_tokens, penalties and temperature, as the others do.

    After an exception anywhere in a step, reset() forgets which processor holds which row: the next update adds
    every row anew and removes every other row a processor may hold."""

    @classmethod
    def for_engine(cls, entries, device: torch.device, model: str, max_model_len: int, vocab_size: int, dtype,
                   max_num_seqs: int, max_num_batched_tokens: int, tensor_parallel_size: int) -> "EngineLogitsProcessors":
        config = VllmConfig(ModelConfig(model, max_model_len, vocab_size, dtype),
                            SchedulerConfig(max_num_seqs, max_num_batched_tokens), ParallelConfig(tensor_parallel_size))
        return cls(entries, config, device)

    def __init__(self, entries, vllm_config: VllmConfig, device: torch.device):
        if not isinstance(entries, (list, tuple)):
            raise TypeError(f"logits_processors: expected a list of LogitsProcessor classes or their names, got {entries!r}")
        self.classes = [load_processor_class(e, f"logits_processors[{i}]") for i, e in enumerate(entries)]
        made = [cls(vllm_config, device, device.type == "cuda") for cls in self.classes]  # vLLM's arguments
        invariant = [p.is_argmax_invariant() for p in made]  # asked once, as vLLM does
        self.argmax_invariant = [p for p, yes in zip(made, invariant) if yes]
        self.non_argmax_invariant = [p for p, yes in zip(made, invariant) if not yes]
        self.rows: list = []  # the key (sequence id) of each row the processors hold; None: unknown (after reset)
        self.width = 0        # how many rows a processor may hold, should an update_state fail half way

    def validate(self, params) -> None:
        """Every class's validate_params; its ValueError gets the class's name (the engine adds the request's)."""
        for cls in self.classes:
            try:
                cls.validate_params(params)
            except ValueError as e:
                raise ValueError(f"{cls.__name__}: {e}") from e

    def apply(self, logits: torch.Tensor, sequences: Sequence) -> torch.Tensor:
        """logits (S, V) of the rows that sample, `sequences` their S minillm Sequences in row order, their output
        tokens landed. Returns logits, changed in place."""
        assert logits.shape[0] == len(sequences), (logits.shape, len(sequences))
        keys, by_key = [s.seq_id for s in sequences], {s.seq_id: s for s in sequences}
        update = batch_update(self.rows, keys, lambda k: (by_key[k].params, by_key[k].prompt_token_ids, OutputTokenIds(by_key[k])))
        self.width = max(len(self.rows), len(keys))
        for p in self.non_argmax_invariant + self.argmax_invariant:
            p.update_state(update)
        self.rows, self.width = keys, len(keys)
        for p in self.non_argmax_invariant:
            self.write(logits, p.apply(logits))
        greedy = [i for i, s in enumerate(sequences) if s.params.greedy]
        if self.argmax_invariant and len(greedy) < len(sequences):
            greedy_logits = logits[greedy].clone()  # (G, V)
            for p in self.argmax_invariant:
                self.write(logits, p.apply(logits))
            logits[greedy] = greedy_logits
        return logits

    @staticmethod
    def write(logits: torch.Tensor, out: torch.Tensor) -> None:
        if out is not logits:
            logits.copy_(out)

    def reset(self) -> None:
        self.rows = [None] * self.width


# ----------------------------------------------------------------------------------------------
# 6. The engine's seam: one hook between the logits and the sampler


@dataclass
class SequenceControls:
    """What the hook keeps on one minillm Sequence (seq.controls): its grammar state and its request's controls."""
    grammar: Optional[GrammarState] = None
    controls: Optional[LogitsControls] = None


class LogitsHook:
    """Everything that changes logits before the sampler, behind the few calls minillm's engine makes:
    check(params) when a request arrives (before any work), attach(seqs, params) as its sequences are queued,
    applies / needs_tokens / apply(logits, sequences) each step, accept(seq, token) as each token lands (the
    grammar advances), and reset() after an exception. It holds the grammar compiler (made by the first request
    with structured outputs: that imports xgrammar) and the engine's logits processors, if any."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids, processors: Optional[EngineLogitsProcessors] = None):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self.compiler: Optional[GrammarCompiler] = None
        self.processors = processors

    @classmethod
    def for_engine(cls, engine, processors=None, model_path=None, dtype=None, max_tokens=None, tp_size=None):
        """The hook of a minillm LLMEngine; `processors` and the rest: LLM(logits_processors=[...]) and what those
        processors are told of the engine (EngineLogitsProcessors.for_engine)."""
        engine_processors = processors and EngineLogitsProcessors.for_engine(
            processors, engine.device, model_path, engine.max_model_len, engine.cfg.vocab_size, dtype,
            engine.max_num_seqs, max_tokens, tp_size or 1)
        return cls(engine.tokenizer, engine.cfg.vocab_size, engine.eos_ids, engine_processors)

    def check(self, params) -> None:
        """ValueError for a bad grammar, a bad token id or what a logits processor refuses."""
        if params.structured_outputs is not None:  # compiled once per distinct grammar (the compiler caches)
            if self.compiler is None:
                self.compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
            self.compiler.compile(params.structured_outputs)
        LogitsControls.from_params(params, self.tokenizer, self.vocab_size)
        if self.processors is not None:
            self.processors.validate(params)

    def attach(self, seqs: Sequence, params) -> None:
        """Each completion its own grammar state; the request's controls shared."""
        controls = LogitsControls.from_params(params, self.tokenizer, self.vocab_size)
        for seq in seqs:
            grammar = None if params.structured_outputs is None else self.compiler.new_state(params.structured_outputs)
            seq.controls = None if grammar is None and controls is None else SequenceControls(grammar, controls)

    def for_rows(self, sequences: Sequence) -> Optional[Callable]:
        """What the runner calls on this step's (S, V) sampling logits: apply, for these S sequences; None when
        none of them needs the hook (no control of its own, no engine-level processor)."""
        if self.processors is None and all(seq.controls is None for seq in sequences):
            return None
        return functools.partial(self.apply, sequences=sequences)

    def needs_tokens(self, sequences: Sequence) -> bool:
        """Whether apply needs every row's output on the host up to its last token (so the engine lands the last
        step's tokens before sampling this one): a grammar, a multi-token bad word, a logits processor."""
        return self.processors is not None or any(
            c is not None and (c.grammar is not None or (c.controls is not None and c.controls.needs_output_ids))
            for c in (seq.controls for seq in sequences))

    def apply(self, logits: torch.Tensor, sequences: Sequence) -> None:
        """logits (S, V) of the rows that sample, in place; `sequences` their S minillm Sequences in row order."""
        controls = [seq.controls or SequenceControls() for seq in sequences]
        apply_masks(logits, [c.grammar for c in controls])
        apply_logits_controls(logits, [c.controls for c in controls], [seq.output_token_ids for seq in sequences],
                              [seq.prompt_token_ids for seq in sequences])
        if self.processors is not None:  # the engine-level ones see every row, and need each row's output ids
            self.processors.apply(logits, sequences)

    def accept(self, seq, token: int) -> bool:
        """A token of seq landed: its grammar advances. False when the grammar does not allow it (only when other
        masks left the row nothing the grammar allows: the engine finishes the sequence)."""
        grammar = seq.controls.grammar if seq.controls is not None else None
        return grammar is None or grammar.accept(token)

    def reset(self) -> None:
        """After an exception: the engine's logits processors are told every row anew."""
        if self.processors is not None:
            self.processors.reset()
