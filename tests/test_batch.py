"""The batch job (cli.py): .txt, JSONL and OpenAI batch files in, each line written as its request finishes,
--resume after a crash (SIGKILL included), every input line checked before the model loads."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import cli
import minillm
from test_engine import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
            "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama with a chat template."""
    folder = tmp_path_factory.mktemp("batch") / "llama"
    make_checkpoint(str(folder))
    json.dump({"chat_template": TEMPLATE}, open(folder / "tokenizer_config.json", "w"))
    return str(folder)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run_batch(model, prompts, out, *extra):
    return cli.main(["--prompts", prompts, "--model", model, "--device", "cpu", "--max-tokens", "5",
                     "--output", str(out), *extra])


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def by_id(rows):
    return {json.dumps(r.get("custom_id", r.get("id"))): r for r in rows}


def test_each_input_form_with_its_overrides(model, tmp_path):
    rows = [{"id": "p", "prompt": "Hello there", "max_tokens": 3},
            {"messages": [{"role": "user", "content": "Hi"}]},  # no id: its line number, 2
            {"id": "ids", "prompt_token_ids": [128000, 9906, 1070], "logprobs": 2, "max_tokens": 2},
            {"id": "stop", "prompt": "Hello there", "ignore_eos": True, "min_tokens": 4}]
    out = tmp_path / "out.jsonl"
    assert run_batch(model, write_jsonl(tmp_path / "in.jsonl", rows), out) == 0
    got = by_id(read_rows(out))
    assert set(got) == {'"p"', "2", '"ids"', '"stop"'}
    assert len(got['"p"']["token_ids"]) == 3 and len(got['"stop"']["token_ids"]) == 5  # per-line max_tokens
    assert got['"stop"']["token_ids"][:3] == got['"p"']["token_ids"]  # greedy: the same start
    assert len(got['"ids"']["logprobs"]) == 2 and all(len(step) >= 2 for step in got['"ids"']["logprobs"])
    assert got["2"]["prompt"].startswith("<|start_header_id|>user")  # through the chat template
    with minillm.LLM(model, device="cpu") as llm:  # the same as LLM.generate and LLM.chat
        want = llm.generate(["Hello there"], minillm.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        chat = llm.chat([{"role": "user", "content": "Hi"}], minillm.SamplingParams(temperature=0, max_tokens=5),
                        use_tqdm=False)
    assert got['"p"']["token_ids"] == want[0].outputs[0].token_ids
    assert got["2"]["token_ids"] == chat[0].outputs[0].token_ids


def test_txt_input_keeps_its_format_with_ids(model, tmp_path):
    (tmp_path / "p.txt").write_text("Hello there\n\nOne, two\n")
    out = tmp_path / "out.jsonl"
    assert run_batch(model, str(tmp_path / "p.txt"), out, "--chat") == 0
    rows = sorted(read_rows(out), key=lambda r: r["id"])
    assert [(r["id"], r["prompt"]) for r in rows] == [(1, "Hello there"), (3, "One, two")]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in rows)


def test_openai_batch_in_and_out_for_both_urls(model, tmp_path):
    rows = [{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4,
                      "logprobs": True, "top_logprobs": 2}},
            {"custom_id": "t", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": "Once upon", "max_tokens": 3, "n": 2, "temperature": 0.9, "seed": 3, "logprobs": 1}}]
    out = tmp_path / "out.jsonl"
    assert run_batch(model, write_jsonl(tmp_path / "in.jsonl", rows), out) == 0
    got = by_id(read_rows(out))
    chat, text = got['"c"'], got['"t"']
    assert chat["error"] is None and chat["response"]["status_code"] == 200 and chat["id"].startswith("batch_req_")
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 4 == len(body["choices"][0]["logprobs"]["content"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert all(len(t["top_logprobs"]) >= 2 for t in body["choices"][0]["logprobs"]["content"])
    body = text["response"]["body"]
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6 and all(len(c["logprobs"]["tokens"]) == 3 for c in body["choices"])


def test_n_above_one(model, tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [{"id": 1, "prompt": "Hi", "n": 3, "temperature": 1.0, "seed": 0}]
    assert run_batch(model, write_jsonl(tmp_path / "in.jsonl", rows), out) == 0
    (row,) = read_rows(out)
    assert len(row["outputs"]) == 3 and row["text"] == row["outputs"][0]["text"]
    assert len({tuple(c["token_ids"]) for c in row["outputs"]}) > 1  # sampled: not all alike


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a"}', '{"prompt": "b"'], ":2: not JSON"),
    (['{"prompt": "a", "temprature": 0.5}'], ":1: unknown field 'temprature'"),
    (['{"prompt": "a"}', '{"prompt": "a", "temperature": -1}'], ":2: temperature must be a finite number >= 0"),
    (['{"id": "x", "prompt": "a"}', '{"prompt": "b"}', '{"id": "x", "prompt": "c"}'], ":3: id 'x' is also"),
    (['{"id": 2, "prompt": "a"}', '{"prompt": "b"}'], ":2: id 2 is also"),  # a line number as id
    (['{"prompt": "a", "messages": []}'], ":1: a request needs exactly one of"),
    (['{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "a"}}'], ":1: method"),
    (['{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a", "best": 2}}'],
     ":1: body: unknown field 'best'"),
    ([], "no prompts"),
])
def test_bad_lines_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, lines, message):
    monkeypatch.setattr(minillm, "LLM", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.jsonl"
    assert run_batch("unused", write_jsonl(tmp_path / "in.jsonl", lines), out) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert ("in.jsonl" + message if message.startswith(":") else message) in err
    assert not out.exists()


def test_resume_after_a_torn_last_line(model, tmp_path):
    rows = [{"id": i, "prompt": f"Number {i}", "max_tokens": 1 + i % 4} for i in range(6)]
    src, full, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert run_batch(model, src, full) == 0
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # two whole lines, a third torn mid-write
    assert run_batch(model, src, out, "--resume") == 0
    assert sorted(out.read_text().splitlines()) == sorted(full.read_text().splitlines())


class FullDisk:
    """An output file on a disk that fills up after three writes."""

    def __init__(self, path, mode):
        self.f, self.writes = open(path, mode, encoding="utf-8"), 0

    def write(self, text):
        self.writes += 1
        if self.writes > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()


def test_a_full_disk_keeps_the_lines_written_before(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "open_output", FullDisk)
    rows = [{"id": i, "prompt": f"Number {i}", "max_tokens": 1 + i} for i in range(6)]
    out = tmp_path / "out.jsonl"
    assert run_batch(model, write_jsonl(tmp_path / "in.jsonl", rows), out) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device after 3 whole lines" in err and "--resume" in err
    assert [r["id"] for r in read_rows(out)] == [0, 1, 2]  # they finish in order: 1, 2, 3 tokens


def cli_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "minillm.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_tree(proc):
    """SIGKILL a command and every process under it (torchrun starts its ranks in sessions of their own)."""
    if proc.poll() is None:  # (else it finished: the caller's check of the return code says so)
        tree = psutil.Process(proc.pid)
        for p in [tree, *tree.children(recursive=True)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    proc.wait()


def test_sigkill_then_resume_gives_each_id_once_as_an_uninterrupted_run(model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Tell me about {i}", "max_tokens": 1 + i % 50} for i in range(300)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--prompts", src, "--model", model, "--device", "cpu"]
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert cli.main([*common, "--output", str(full)]) == 0
    proc = cli_process(*common, "--output", str(out))
    while proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 30):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()  # killed mid-run, not finished
    kept = out.read_text().count("\n")
    assert 30 <= kept < 300
    assert cli.main([*common, "--output", str(out), "--resume"]) == 0
    ids = [r["id"] for r in read_rows(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # each id once
    assert by_id(read_rows(out)) == by_id(read_rows(full))  # greedy: the same as the uninterrupted run


PEAK = """
import sys, tracemalloc
sys.path.insert(0, {root!r})
import cli
import minillm
# The CPU's KV cache is allocated untouched (torch.empty), and the block manager hands out the least recently freed
# block first, so each new request touches pages no request touched before, until the whole cache has been used:
# RSS would grow with the number of requests up to the cache's size. Touched up front, the cache is one constant.
allocate = minillm.allocate_kv_cache
minillm.allocate_kv_cache = lambda *args: [(k.zero_(), v.zero_()) for k, v in allocate(*args)]
run = cli.Feeder.run
def measured(self, *args):  # peaks from here on: the model's loading (the same for both) left out
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    tracemalloc.start()
    return run(self, *args)
cli.Feeder.run = measured
assert cli.main(["--prompts", sys.argv[1], "--model", {model!r}, "--device", "cpu", "--max-tokens", "1",
                 "--output", sys.argv[2]]) == 0
print(tracemalloc.get_traced_memory()[1], [int(line.split()[1]) for line in open("/proc/self/status")
                                           if line.startswith("VmHWM")][0] * 1024)
"""


def peaks(model, tmp_path, count) -> tuple:
    """(Python's peak heap, the process's peak RSS) in bytes while generating `count` one-token requests."""
    src = write_jsonl(tmp_path / f"in{count}.jsonl", [{"prompt": f"Say {i}"} for i in range(count)])
    r = subprocess.run([sys.executable, "-c", PEAK.format(root=ROOT, model=model), src,
                        str(tmp_path / f"out{count}.jsonl")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sum(1 for _ in open(tmp_path / f"out{count}.jsonl")) == count
    return tuple(map(int, r.stdout.split()[-2:]))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak-RSS reset")
def test_memory_does_not_grow_with_the_input(model, tmp_path):
    """The peak heap and the peak RSS while generating 20,000 one-token requests are within a few tens of MiB of
    2,000's: the input is read as the engine needs it, and each output leaves as it finishes."""
    (small_heap, small_rss), (large_heap, large_rss) = peaks(model, tmp_path, 2000), peaks(model, tmp_path, 20000)
    print(f"Python heap peak: {small_heap / 2**20:.1f} / {large_heap / 2**20:.1f} MiB, "
          f"peak RSS: {small_rss / 2**20:.1f} / {large_rss / 2**20:.1f} MiB (2,000 / 20,000 lines)")
    assert large_heap - small_heap < 20 * 2**20 and large_rss - small_rss < 40 * 2**20


def test_data_parallel_with_jsonl_and_resume(model, tmp_path, capfd):
    """--data-parallel-size 2 on a JSONL of both kinds: each rank its share, written to its part file, which rank 0
    merges in input order; the same lines as one process, and --resume on it skips what is there."""
    rows = [{"id": i, "prompt": f"Number {i}", "max_tokens": 1 + i % 3} for i in range(5)] + [
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}]
    src, one, two = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_batch(model, src, one) == 0
    strip = lambda rows: {k: {**r, "response": {**r["response"], "body": {**r["response"]["body"], "created": 0}}}
                          if "response" in r else r for k, r in by_id(rows).items()}
    lines = one.read_text().splitlines(keepends=True)
    two.write_text("".join(lines[:3]))
    assert run_batch(model, src, two, "--data-parallel-size", "2", "--resume") == 0
    assert "6/6" in capfd.readouterr().err
    assert strip(read_rows(two)) == strip(read_rows(one)) and len(read_rows(two)) == 6


def test_a_killed_data_parallel_run_keeps_its_finished_lines_in_part_files(model, tmp_path, capfd):
    """Each rank writes its lines as they finish to out.jsonl.rank{r}: a run SIGKILLed partway (all its processes)
    leaves them there, whole, and --resume with K = 2 merges them and does only the rest."""
    rows = [{"id": f"r{i}", "prompt": f"Tell me about {i}", "max_tokens": 1 + i % 40} for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--prompts", src, "--model", model, "--device", "cpu"]
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert cli.main([*common, "--output", str(full)]) == 0
    want = by_id(read_rows(full))
    parts = lambda: sorted(tmp_path.glob("out.jsonl.rank*"))
    proc = cli_process(*common, "--output", str(out), "--data-parallel-size", "2")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and (
            len(parts()) < 2 or min(p.read_bytes().count(b"\n") for p in parts()) < 10):
        time.sleep(0.02)
    kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()  # killed mid-run, not finished
    assert out.read_text() == "" and [p.name for p in parts()] == ["out.jsonl.rank0", "out.jsonl.rank1"]
    kept = {}
    for part in parts():
        lines = part.read_text().split("\n")  # whole lines, then at most one torn one (or "")
        kept.update(by_id(json.loads(line) for line in lines[:-1]))
    assert 20 <= len(kept) < 200 and all(row == want[key] for key, row in kept.items())  # greedy: as uninterrupted
    capfd.readouterr()
    assert cli.main([*common, "--output", str(out), "--resume", "--data-parallel-size", "2"]) == 0
    err = capfd.readouterr().err
    assert f"wrote {len(kept)} completions to {out}" in err  # the killed run's lines, merged first
    assert f"wrote {200 - len(kept)} completions to {out}" in err  # then only the rest was generated
    assert ".rank" not in err  # the part files are the ranks' own business: they are gone once merged
    assert sorted(r["id"] for r in read_rows(out)) == sorted(r["id"] for r in rows)  # each id once
    assert by_id(read_rows(out)) == want and parts() == []


def test_resume_merges_part_files_of_any_data_parallel_size(model, tmp_path, capsys):
    """--resume with one process after data-parallel runs: the lines in out.jsonl stay, the whole lines of every
    part file (here of K = 2 and K = 4) are appended in input order unless out.jsonl has them already (a merge that
    was killed before it removed the parts), torn last lines are dropped, and only the rest is generated."""
    rows = [{"id": i, "prompt": f"Number {i}"} for i in range(8)]
    src, full, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert run_batch(model, src, full) == 0
    line = {r["id"]: json.dumps(r, ensure_ascii=False) + "\n" for r in read_rows(full)}
    out.write_text(line[0] + line[1] + line[5][:10])
    (tmp_path / "out.jsonl.rank0").write_text(line[1] + line[4] + line[2] + line[6][:7])
    (tmp_path / "out.jsonl.rank3").write_text(line[3] + line[5])
    (tmp_path / "out.jsonl.rank1.bak").write_text("not a part file\n")
    capsys.readouterr()
    assert run_batch(model, src, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"wrote 4 completions to {out}" in err and f"wrote 2 completions to {out}" in err  # merged, generated
    got = out.read_text().splitlines(keepends=True)
    assert got[:6] == [line[i] for i in range(6)]  # kept, then merged in input order
    assert sorted(got) == sorted(line.values())  # each id once, as the uninterrupted run
    assert sorted(p.name for p in tmp_path.glob("out.jsonl.*")) == ["out.jsonl.rank1.bak"]


def test_a_part_file_on_a_full_disk_or_out_of_sight(model, tmp_path, capsys, monkeypatch):
    """Rank 0 of 2 in this process (its partner faked): a part file that rank 0 cannot see, or that cannot be
    written, is one line naming it."""
    import torch.distributed as dist
    import parallel
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(parallel.DataParallel, "from_env", classmethod(lambda cls: cls(0, 2, dist.HashStore())))
    monkeypatch.setattr(parallel.DataParallel, "barrier", lambda self, name: None)
    src, out = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"N {i}"} for i in range(12)]), tmp_path / "o"
    assert run_batch(model, src, out, "--data-parallel-size", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out}.rank1: rank 1's part file is not in rank 0's folder" in err  # (another host's disk)

    def partner(self, name):  # rank 1 opens its part file
        if name == "parts open":
            (tmp_path / "o.rank1").touch()
    monkeypatch.setattr(parallel.DataParallel, "barrier", partner)
    monkeypatch.setattr(cli, "open_output", FullDisk)
    assert run_batch(model, src, out, "--data-parallel-size", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out}.rank0: No space left on device after 3 whole lines" in err and "--resume" in err
    assert [r["id"] for r in read_rows(f"{out}.rank0")] == [0, 2, 4]  # rank 0's share, as they finished
