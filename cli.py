"""
The command line of minillm: `python minillm.py --prompts file.txt` (or the `minillm` script pip installs).

    python minillm.py --prompts examples/prompts.txt                  # the built-in SmolLM2-135M-Instruct
    python minillm.py --prompts questions.txt --chat --max-tokens 200 --output answers.jsonl
    python minillm.py --prompts file.txt --model ./Llama-3.2-1B --temperature 0.8 --seed 0

    python minillm.py --prompts requests.jsonl --output results.jsonl [--resume]  # JSONL or OpenAI batch requests

Prompts in (.txt: one a line; .jsonl: one request a line), one JSON line per request out, written and flushed as
the request finishes, so that a crash keeps every finished line and --resume does only the rest. Every argument
and every input line is checked before the model loads, and every error is one line that names its culprit (for
an input line: file:line). The work is the core's: one `LLM` (minillm.py) whose LLMEngine is fed step by step
(Feeder).

With --data-parallel-size K, torchrun starts K copies of this command (ranks) and each one takes every K-th request
not yet done. Each rank writes its lines as they finish (flushed, whole, as above) to a part file of its own beside
--output, OUTPUT.rank{r}; when every rank is done, rank 0 merges the parts into --output in input order and removes
them. --resume first merges into --output the parts a killed run left (of any K), so a killed data-parallel run
keeps every finished line, as one process does. (Per-rank files, not lines sent to rank 0: nothing is held in
memory or in flight, and a rank writes at its own pace. Across hosts, --output's folder must be one they share.)

This file imports minillm only after the arguments parse, so that --help and a mistyped flag answer at once
instead of after torch's second and a half of importing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, NamedTuple, Optional


def cli_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="Offline batch generation with a Llama-family model.")
    arg = ap.add_argument
    arg("--prompts", required=True, help="a .txt file with one prompt per line (blank lines skipped; - reads stdin) "
        "or a .jsonl file of requests ({\"id\", \"prompt\" | \"messages\" | \"prompt_token_ids\", sampling "
        "fields}) or OpenAI batch requests")
    arg("--chat", action="store_true", help="send each line as a user message through the model's chat template")
    arg("--model", default=None, help="HF checkpoint folder, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    arg("--max-tokens", type=int, default=64, help="most tokens to generate per prompt (default 64)")
    arg("--temperature", type=float, default=0.0, help="0 is greedy (the default); higher is more random")
    arg("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass")
    arg("--top-k", type=int, default=0, help="keep only the k most likely tokens (0: off)")
    arg("--seed", type=int, default=None, help="seed for each prompt's sampling stream (reproducible runs)")
    arg("--output", default=None, help="write one JSON object per prompt here, each as soon as it finishes "
        "(id, prompt, text, token_ids, finish_reason; OpenAI batch output for OpenAI batch requests)")
    arg("--resume", action="store_true", help="keep the lines already in --output and generate only the missing ids")
    arg("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    arg("--lora", default=None, metavar="PATH", help="a PEFT LoRA adapter folder applied to every prompt")
    arg("--trace", default=None, metavar="PATH", help="write what each engine step did: .html (a picture) or .json")
    arg("--json-schema", default=None, metavar="FILE", help="every output is JSON valid under this schema (xgrammar)")
    arg("--regex", default=None, help="every output matches this regular expression (xgrammar)")
    arg("--tensor-parallel-size", type=int, default=1, metavar="N",
        help="GPUs per engine, each holding 1/N of every layer (default 1)")
    arg("--data-parallel-size", type=int, default=1, metavar="K",
        help="engines on this host, each with every K-th prompt (default 1; under torchrun, one per process)")
    return ap


def main(args=None) -> int:
    """Run the command line with `args` (a list of strings, or a parsed Namespace; default sys.argv). Returns the exit
    status: 0 done, 1 an error (printed as one line), 130 interrupted."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
    args = args if isinstance(args, argparse.Namespace) else cli_parser().parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error is one line, naming its culprit
        print(f"minillm: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Check every argument and every input line, then generate (on this data-parallel rank) and write the outputs
    (rank 0), each line as soon as its request finishes."""
    import compat
    import minillm
    import parallel
    constraint = None
    if args.json_schema or args.regex:
        constraint = minillm.StructuredOutputsParams(json=read_json(args.json_schema), regex=args.regex)
    base = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                max_tokens=args.max_tokens, structured_outputs=constraint)
    batch = BatchInput(args.prompts, args.chat, base)  # the first pass: every line checked, before anything else
    if args.resume and not args.output:
        raise ValueError("--resume needs --output (the file to continue)")
    device = compat.check_device(args.device)
    parallel.check_tensor_parallel(args.tensor_parallel_size, device)
    parallel.check_data_parallel(args, device)
    if args.trace:
        import timeline
        timeline.check_path(args.trace)
    for path in filter(None, (args.output, args.trace)) if int(os.environ.get("RANK", 0)) == 0 else ():
        check_writable(path)
    adapter, lora_kwargs = None, {}
    if args.lora:  # one adapter for every prompt: one slot, of exactly its rank
        import lora
        adapter = lora.LoRARequest(os.path.basename(os.path.normpath(args.lora)), 1, args.lora)
        lora_kwargs = dict(enable_lora=True, max_loras=1, max_lora_rank=lora.read_adapter_config(adapter)["r"])
    if args.data_parallel_size > 1 and "WORLD_SIZE" not in os.environ:
        # K engines on this host: torchrun starts this same command K times, one data-parallel rank each
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={args.data_parallel_size}", minillm.__file__, *argv]).returncode
    dp = parallel.DataParallel.from_env()
    done = prepare_output(dp, args, batch)
    return generate_shard(dp, args, batch, done, adapter, lora_kwargs)


# ---- the input: a first pass that checks every line, then a lazy second pass that yields the requests --------------

class Request(NamedTuple):
    line: int            # its line number in the input file, from 1
    key: str             # json.dumps of its id: what --resume compares
    id: Any              # the line's id (or custom_id), or its line number
    kind: str            # "text" (a .txt line), "native" (a JSONL request), "chat" or "completions" (OpenAI batch)
    prompt: Any          # a str or {"prompt_token_ids": [...]}; None for messages
    messages: Any        # a conversation for the chat template, or None
    params: Any          # its SamplingParams (output_kind FINAL_ONLY)


OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
OPENAI_IGNORED = {"model", "user", "stream_options", "service_tier", "store", "metadata"}
OPENAI_SAMPLING = {"temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias", "top_k", "min_p", "min_tokens", "repetition_penalty", "stop_token_ids",
                   "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"}  # (vLLM's server takes these)
NOT_FROM_JSON = {"output_kind", "logits_processors", "guided_decoding"}  # no JSON spelling: Python objects


class BatchInput:
    """The prompts file: .txt (one prompt a line) or .jsonl (one request a line). Made by a first pass that checks
    every line (JSON, fields, values, duplicate ids) and keeps only the ids and the count, so that memory does not
    grow with the file's prompts; iterating reads it again, lazily, one Request at a time."""

    def __init__(self, path: str, chat: bool, base: dict):
        self.path, self.chat, self.base, self.keys = path, chat, base, set()
        self.jsonl = path.endswith(".jsonl")
        self.stdin = sys.stdin.readlines() if path == "-" else None  # stdin can be read once only: kept
        for request in self:
            if request.key in self.keys:
                raise ValueError(f"{self.where(request.line)}: id {request.id!r} is also an earlier line's id")
            self.keys.add(request.key)
        if not self.keys:
            raise ValueError(f"{path}: no prompts (one per line)")

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def lines(self):
        """(line number, text) of each non-blank line."""
        try:
            src = self.stdin if self.stdin is not None else open(self.path, encoding="utf-8")
            for number, text in enumerate(src, 1):
                if text.strip():
                    yield number, text.rstrip("\n")
            if self.stdin is None:
                src.close()
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def __iter__(self):
        for number, text in self.lines():
            try:
                yield self.parse(number, text)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.where(number)}: {' '.join(str(e).split())}") from None

    def parse(self, number: int, text: str) -> Request:
        if not self.jsonl:
            messages = [{"role": "user", "content": text}] if self.chat else None
            return Request(number, json.dumps(number), number, "text", None if self.chat else text, messages,
                           sampling_params(self.base, {}))
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        return parse_openai(number, row, self.base) if "custom_id" in row else parse_native(number, row, self.base)


def sampling_params(base: dict, fields: dict):
    """The command line's sampling values with one line's fields over them, checked as the engine will."""
    import minillm
    merged = {**base, **fields}
    if isinstance(merged.get("structured_outputs"), dict):
        merged["structured_outputs"] = minillm.StructuredOutputsParams(**merged["structured_outputs"])
    params = minillm.SamplingParams(**merged, output_kind=minillm.FINAL_ONLY)
    params.verify()
    return params


def check_id(value, name: str):
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a string or an integer, got {value!r}")
    return value


def parse_native(number: int, row: dict, base: dict) -> Request:
    """{"id", one of "prompt" / "messages" / "prompt_token_ids", then any SamplingParams field by its name}."""
    import minillm
    fields = {f.name for f in dataclasses.fields(minillm.SamplingParams)} - NOT_FROM_JSON
    unknown = sorted(set(row) - fields - {"id", "prompt", "messages", "prompt_token_ids"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (a request has id, prompt, messages or prompt_token_ids, "
                         f"and SamplingParams fields)")
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in row]
    if len(given) != 1:
        raise ValueError(f"a request needs exactly one of prompt, messages and prompt_token_ids, got {given or 'none'}")
    rid = check_id(row.get("id", number), "id")
    prompt, messages = check_prompt(row), check_messages(row.get("messages"))
    params = sampling_params(base, {k: v for k, v in row.items() if k in fields})
    return Request(number, json.dumps(rid), rid, "native", prompt, messages, params)


def check_prompt(row: dict):
    """A line's prompt as the engine takes it: a str, or {"prompt_token_ids": [...]}, or None (messages)."""
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt_token_ids must be a non-empty list of integers, got {ids!r}")
        return {"prompt_token_ids": ids}
    prompt = row.get("prompt")
    if "prompt" in row and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {prompt!r}")
    return prompt


def check_messages(messages):
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ValueError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    return messages


def parse_openai(number: int, row: dict, base: dict) -> Request:
    """{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}."""
    unknown = sorted(set(row) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (an OpenAI batch request has custom_id, method, url, body)")
    rid, kind, body = check_id(row["custom_id"], "custom_id"), OPENAI_URLS.get(row.get("url")), row.get("body")
    if row.get("method") != "POST" or kind is None:
        raise ValueError(f"method must be POST and url one of {sorted(OPENAI_URLS)}, got "
                         f"{row.get('method')!r} {row.get('url')!r}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    main_field = "messages" if kind == "chat" else "prompt"
    known = OPENAI_SAMPLING | OPENAI_IGNORED | {main_field, "max_tokens", "max_completion_tokens", "logprobs",
                                                "stream"} | ({"top_logprobs"} if kind == "chat" else set())
    unknown = sorted(set(body) - known)
    if unknown or body.get("stream"):
        raise ValueError(f"body: unknown field {unknown[0]!r}" if unknown else "body: stream must be false in a batch")
    if main_field not in body:
        raise ValueError(f"body: {main_field} is required for {row['url']}")
    fields = openai_sampling_fields(kind, body)
    prompt = check_prompt({"prompt_token_ids": body["prompt"]} if isinstance(body.get("prompt"), list) else
                          {"prompt": body.get("prompt")}) if kind == "completions" else None
    params = sampling_params(base, fields)
    return Request(number, json.dumps(rid), rid, kind, prompt, check_messages(body.get("messages")), params)


def openai_sampling_fields(kind: str, body: dict) -> dict:
    """An OpenAI body's sampling fields as SamplingParams'."""
    fields = {k: v for k, v in body.items() if k in OPENAI_SAMPLING}
    if "logit_bias" in fields and isinstance(fields["logit_bias"], dict):
        fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            fields["max_tokens"] = body[name]
    if kind == "chat" and body.get("logprobs"):  # chat: a flag and top_logprobs; completions: the count
        fields["logprobs"] = body.get("top_logprobs") or 0
    elif kind == "completions" and body.get("logprobs") is not None:
        fields["logprobs"] = body["logprobs"]
    return fields


# ---- resuming ---------------------------------------------------------------------------------------------------

def whole_lines(path: str):
    """(id key, start, end) of each whole output line of `path`, in bytes. A torn last line (a crash mid-write) is
    left out; a bad line before it is an error."""
    with open(path, "rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            try:
                row = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                row = None
            if not isinstance(row, dict) or not ("custom_id" in row or "id" in row):
                if f.read(1):  # not the last line: the file is not ours to continue
                    raise ValueError(f"{path}:{number}: not an output line; --resume continues only its own files")
                return
            yield json.dumps(row["custom_id"] if "custom_id" in row else row["id"]), start, start + len(raw)
            start += len(raw)


def read_done(path: str, truncate: bool) -> set:
    """The ids (json.dumps keys) of the lines already in `path`. A torn last line is cut off (`truncate`) so that
    appending starts on a line of its own."""
    if not os.path.exists(path):
        return set()
    done, good_end = set(), 0
    for key, _, good_end in whole_lines(path):
        done.add(key)
    if truncate and good_end != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def part_path(output: str, rank: int) -> str:
    """Data-parallel rank `rank`'s part file: its finished lines, until rank 0 merges them into `output`."""
    return f"{output}.rank{rank}"


def part_files(output: str) -> list:
    """The part files beside `output` (OUTPUT.rank{r}): this run's, or a killed run's of any data-parallel size."""
    folder, name = os.path.split(output)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder or ".")
                  if n.startswith(f"{name}.rank") and n[len(name) + 5:].isdecimal())


def prepare_output(dp, args, batch: BatchInput) -> set:
    """Before any rank writes a line, rank 0 readies --output: with --resume, the part files a killed run left are
    merged into it; else it is emptied and old part files removed (a later --resume must not take their lines).
    Then (a barrier: no rank writes before rank 0 is done) every rank has the same done ids."""
    if not args.output:
        return set()
    done = set()
    if dp.rank == 0 and args.resume:
        done = merge_parts(args.output, batch)
    elif dp.rank == 0:
        for part in part_files(args.output):
            os.remove(part)
        open(args.output, "w").close()
    dp.barrier("output ready")
    return read_done(args.output, truncate=False) if dp.rank and args.resume else done


def merge_parts(output: str, batch: BatchInput) -> set:
    """Rank 0: append to `output` (its torn last line cut off) the whole lines of every part file whose ids it lacks,
    in input order, fsync, then remove the part files; returns the ids now in `output`. A crash anywhere in here loses
    nothing and duplicates nothing: the parts go only once their lines are in `output`, and a line already there is
    not copied again, so the next --resume does the rest."""
    done, parts, where = read_done(output, truncate=True), part_files(output), {}
    for part in parts:
        for key, start, end in whole_lines(part):
            if key not in done:
                where[key] = (part, start, end)  # (the lines stay on disk: rank 0 holds ids, not outputs)
    if where:
        out, files = Output(output, True, batch.jsonl, None), {part: open(part, "rb") for part in parts}
        try:
            for r in (r for r in batch if r.key in where):
                part, start, end = where[r.key]
                files[part].seek(start)
                out.write((r.line, files[part].read(end - start).decode("utf-8").removesuffix("\n")))
            out.sync()
        finally:
            out.close()
            for f in files.values():
                f.close()
    for part in parts:
        os.remove(part)
    return done | where.keys()


# ---- generation: the engine fed step by step, each finished request written at once ------------------------------

def generate_shard(dp, args, batch: BatchInput, done: set, adapter, lora_kwargs) -> int:
    """The generation on data-parallel rank dp.rank: every dp.size-th request not yet `done` through an engine of
    its own, each line written as its request finishes (shard_output says where); with several ranks, rank 0 then
    merges them (finish_shards)."""
    import compat
    import minillm
    device = args.device
    if dp.size > 1 and compat.check_device(device).type == "cuda":
        device = f"cuda:{(compat.check_device(device).index or 0) + dp.local_rank * args.tensor_parallel_size}"
    total, already, trace = len(batch.keys), len(batch.keys & done), bool(args.trace) and dp.rank == 0
    pending = (r for r in batch if r.key not in done)
    mine = (r for k, r in enumerate(pending) if k % dp.size == dp.rank)
    out = shard_output(dp, args, batch.jsonl)
    with minillm.LLM(args.model, device=device, tensor_parallel_size=args.tensor_parallel_size, trace=trace,
                     **lora_kwargs) as llm:
        try:
            Feeder(llm, adapter, Progress(dp, total, already)).run(mine, out.write)
        except BaseException:
            dp.close_progress()  # (rank 0's bar for every rank: closed before the error's line, not after)
            raise
        finally:
            out.close()
    if trace:  # (rank 0's engine: the others' steps are alike)
        import timeline
        timeline.write_trace(llm.last_trace, args.trace)
        print(f"wrote the trace of {len(llm.last_trace['steps'])} engine steps to {args.trace}", file=sys.stderr)
    if dp.size > 1:
        finish_shards(dp, args, batch, out)
    return 0


def shard_output(dp, args, jsonl: bool):
    """Where this rank's finished lines go: alone, --output (or stdout); with several ranks, this rank's part file,
    which rank 0 then checks it can see for every rank (across hosts they must share --output's folder); with
    several ranks and no --output, a list held for rank 0 to print at the end."""
    if dp.size == 1:
        return Output(args.output, args.resume, jsonl, None)
    if not args.output:
        return Held()
    out = Output(part_path(args.output, dp.rank), False, jsonl, None, quiet=True)
    dp.barrier("parts open")
    unseen = [r for r in range(dp.size) if not os.path.exists(part_path(args.output, r))] if dp.rank == 0 else []
    if unseen:
        out.close()
        raise ValueError(f"{part_path(args.output, unseen[0])}: rank {unseen[0]}'s part file is not in rank 0's "
                         f"folder; across hosts, --output must be in a folder every host shares")
    return out


class Held(list):
    """A data-parallel rank's (line number, JSON line) items when there is no --output: printed by rank 0 at the end."""

    def write(self, item) -> None:
        self.append(item)

    def close(self) -> None:
        pass


def finish_shards(dp, args, batch: BatchInput, out) -> None:
    """Once every rank has written its last line (a barrier), rank 0 merges the part files into --output in input
    order and removes them; without --output, rank 0 prints every rank's lines, gathered as JSON, in input order."""
    if not args.output:
        gathered, stdout = dp.gather(list(out)), Output(None, False, batch.jsonl, None)
        for item in sorted(gathered) if dp.rank == 0 else ():  # (line number, JSON line): input order
            stdout.write(item)
        return
    dp.barrier("finished")
    if dp.rank == 0:
        dp.close_progress()
        merge_parts(args.output, batch)


class Feeder:
    """Keeps at most 2 x max_num_seqs requests in the engine, taking the next ones from the input as the finished
    ones leave, so that the engine always has a full batch and memory does not grow with the input."""

    def __init__(self, llm, adapter, progress):
        self.llm, self.engine, self.adapter, self.progress = llm, llm.llm_engine, adapter, progress
        self.limit, self.inflight = 2 * self.engine.max_num_seqs, {}

    def run(self, requests, emit) -> None:
        """emit((line number, JSON line)) once for each request, as it finishes (or fails to be added)."""
        requests, engine = iter(requests), self.engine
        if engine.tracing:
            engine.observer.clear()
        try:
            while True:
                while len(self.inflight) < self.limit and (r := next(requests, None)) is not None:
                    self.add(r, emit)
                if not self.inflight:
                    break
                finished = [o for o in engine.step() if o.finished]
                for o in sorted(finished, key=lambda o: self.inflight[o.request_id].line):  # ties: input order
                    emit((self.inflight[o.request_id].line, output_line(self.inflight.pop(o.request_id), o,
                                                                        engine.model_name)))
                    self.progress.finished(sum(len(c.token_ids) for c in o.outputs))
        except BaseException:
            engine.recover(abort=list(self.inflight))
            raise
        finally:
            self.progress.close()
        self.llm.last_trace = engine.observer.trace() if engine.tracing else None

    def add(self, r: Request, emit) -> None:
        """Queue one request; one the engine refuses (a prompt too long, ...) gets an error line of its own."""
        import compat
        try:
            prompt = r.prompt if r.messages is None else compat.chat_prompt(
                self.llm.get_tokenizer(), r.messages, "the chat template", add_generation_prompt=True)
            self.engine.add_request(f"line-{r.line}", prompt, r.params, lora_request=self.adapter)
            self.inflight[f"line-{r.line}"] = r
        except (ValueError, TypeError) as e:
            emit((r.line, error_line(r, " ".join(str(e).split()))))
            self.progress.finished(0)


class Progress:
    """One bar over every line (done/total, tokens per second, time left), starting at the lines already done; with
    data parallelism rank 0 draws it from every rank's counts in the store (parallel.SharedProgress)."""

    def __init__(self, dp, total: int, already: int):
        from tqdm import tqdm
        self.started, self.tokens, self.shared = time.perf_counter(), 0, None
        if dp.size > 1:
            import parallel
            dp.progress(total)
            if dp.rank == 0:
                dp.bar.update(already)
                dp.store.add("done", already)
            self.shared, self.bar = parallel.SharedProgress(dp), dp.bar
        else:
            self.bar = tqdm(total=total, initial=already, desc="Processed prompts", dynamic_ncols=True,
                            file=sys.stderr)

    def finished(self, tokens: int) -> None:
        self.tokens += tokens
        if self.shared is not None:
            self.shared.update(1)
        if self.bar is not None:
            self.bar.update(0 if self.shared else 1)
            self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.started):.1f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None and self.shared is None:
            self.bar.close()


# ---- the output: one JSON line per request, flushed as it is written ---------------------------------------------

def open_output(path: str, mode: str):
    """(A seam for the tests: a full disk is a file object whose writes fail.)"""
    return open(path, mode, encoding="utf-8")


class Output:
    """Where the finished lines go: `path` (appended to with --resume, else rewritten), each line written whole and
    flushed at once, so that a crash at any moment leaves every finished line and at most one torn last one; no
    path: printed. fsync at most once a second, so that a power cut loses at most about a second of lines."""

    def __init__(self, path: Optional[str], resume: bool, jsonl: bool, model: Optional[str], quiet: bool = False):
        self.path, self.jsonl, self.count, self.synced, self.failed = path, jsonl, 0, time.monotonic(), False
        self.quiet = quiet  # a part file (removed by the merge, which says what --output got): no "wrote" line
        self.file = open_output(path, "a" if resume else "w") if path else None

    def write(self, item) -> None:
        _, line = item
        if self.file is None:
            print(line if self.jsonl else text_block(line))
            return
        try:
            self.file.write(line + "\n")
            self.file.flush()
            if time.monotonic() - self.synced > 1:
                os.fsync(self.file.fileno())
                self.synced = time.monotonic()
        except OSError as e:
            raise self.failure(e) from None
        self.count += 1

    def sync(self) -> None:
        """fsync now: the merge removes the part files only once their lines are on the disk in `path`."""
        try:
            os.fsync(self.file.fileno())
        except OSError as e:
            raise self.failure(e) from None

    def failure(self, e: OSError) -> OSError:
        self.failed = True
        return OSError(f"{self.path}: {e.strerror or e} after {self.count} whole lines were written; they stay, "
                       f"and --resume continues after them")

    def close(self) -> None:
        if self.file is None:
            return
        try:
            self.file.close()
        except OSError:
            if not self.failed:
                raise
        if not self.failed and not self.quiet:
            print(f"wrote {self.count} completions to {self.path}", file=sys.stderr)


def text_block(line: str) -> str:
    row = json.loads(line)
    return f"--- {row.get('prompt')}\n{row.get('text', row.get('error'))}\n"


def output_line(r: Request, o, model: str) -> str:
    """A finished request's output line: OpenAI batch output for OpenAI requests, else minillm's own."""
    if r.kind in ("chat", "completions"):
        return json.dumps(openai_output(r, o, model), ensure_ascii=False)
    first = o.outputs[0]
    prompt = r.messages[-1]["content"] if r.kind == "text" and r.messages else o.prompt  # --chat: the line itself
    row = {"id": r.id, "prompt": prompt, "text": first.text, "token_ids": first.token_ids,
           "finish_reason": first.finish_reason}
    if len(o.outputs) > 1:
        row["outputs"] = [completion_fields(c) for c in o.outputs]
    elif first.logprobs is not None:
        row.update(completion_fields(first))
    return json.dumps(row, ensure_ascii=False)


def completion_fields(c) -> dict:
    row = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:  # per token {token id: logprob}: the token itself and the top-k
        row["cumulative_logprob"] = c.cumulative_logprob
        row["logprobs"] = [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
    return row


def error_line(r: Request, message: str) -> str:
    if r.kind in ("chat", "completions"):
        return json.dumps({"id": f"batch_req_{r.line}", "custom_id": r.id, "response": None,
                           "error": {"code": "invalid_request", "message": message}}, ensure_ascii=False)
    return json.dumps({"id": r.id, "error": message}, ensure_ascii=False)


def openai_output(r: Request, o, model: str) -> dict:
    """OpenAI's batch output line: the response's body a chat.completion or a text_completion object."""
    chat = r.kind == "chat"
    choices = [{"index": c.index, "finish_reason": c.finish_reason,
                "logprobs": openai_logprobs(c, chat) if c.logprobs is not None else None,
                **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})}
               for c in o.outputs]
    completion = sum(len(c.token_ids) for c in o.outputs)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{r.line}", "object": "chat.completion" if chat else
            "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": len(o.prompt_token_ids), "completion_tokens": completion,
                      "total_tokens": len(o.prompt_token_ids) + completion}}
    return {"id": f"batch_req_{r.line}", "custom_id": r.id,
            "response": {"status_code": 200, "request_id": f"line-{r.line}", "body": body}, "error": None}


def openai_logprobs(c, chat: bool) -> dict:
    """Chat's {"content": [{token, logprob, top_logprobs}]}, or completions' {tokens, token_logprobs, top_logprobs}."""
    steps = []
    for token_id, step in zip(c.token_ids, c.logprobs):
        own = step.get(token_id) or next(iter(step.values()))
        top = [(lp.decoded_token, lp.logprob) for t, lp in step.items() if t != token_id or lp.rank == 1]
        steps.append((own.decoded_token, own.logprob, top))
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list((t or "").encode()),
                             "top_logprobs": [{"token": a, "logprob": b} for a, b in top]} for t, lp, top in steps]}
    return {"tokens": [t for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
            "top_logprobs": [dict(top) for _, _, top in steps], "text_offset": []}


def read_json(path: Optional[str]):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def check_writable(path: str) -> None:
    """Fail now, not after all the generation, if `path` cannot be written."""
    existed = os.path.exists(path)
    with open(path, "a", encoding="utf-8"):
        pass
    if not existed:
        os.remove(path)


if __name__ == "__main__":
    sys.exit(main())
