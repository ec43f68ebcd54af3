"""timeline.py: the trace format, the page it renders, and the page in a real browser (headless Chromium).

Traces here are built by hand (a small one whose every event is known) or by a tiny simulated scheduler
(continuous batching, chunked prefill, prefix cache, preemption by recompute) for sizes a hand can't write."""
import collections
import copy
import json
import os
import random
import shutil
import struct
import subprocess
import zlib

import pytest

import timeline


def step(i, scheduled, blocks, wall_ms=2.0, **events):
    """One step record: num_batched_tokens and num_seqs follow from `scheduled`, absent event lists are empty."""
    s = dict(step=i, wall_ms=wall_ms, scheduled=[dict(id=r, kind=k, start=p, num_tokens=n) for r, k, p, n in scheduled],
             num_batched_tokens=sum(n for *_, n in scheduled), num_seqs=len(scheduled), blocks=blocks)
    return s | {key: events.get(key, []) for key in timeline.STEP_LISTS}


def blocks(free=0, owned=0, shared=0, cached_free=0):
    return dict(free=free, owned=owned, shared=shared, cached_free=cached_free)


def small_trace():
    """Three requests, 5 blocks of 16: "a" prefills 48 tokens in two chunks; "b" reuses a's first block from the
    prefix cache; "c" is preempted at step 2 (a needs a block) and recomputed at step 4."""
    return dict(model="tiny", num_blocks=5, block_size=16, max_num_seqs=3, max_num_batched_tokens=32, requests=[
        dict(id="a", prompt_tokens=48, num_cached_tokens=0, output_tokens=5, finish_reason="length"),
        dict(id="b", prompt_tokens=20, num_cached_tokens=16, output_tokens=3, finish_reason="stop"),
        dict(id="c", prompt_tokens=10, num_cached_tokens=0, output_tokens=4, finish_reason="stop")], steps=[
        step(0, [("a", "prefill", 0, 32)], blocks(free=3, owned=2), wall_ms=9.0, allocated=[0, 1]),
        step(1, [("a", "prefill", 32, 16), ("b", "prefill", 16, 4), ("c", "prefill", 0, 10)], blocks(shared=1, owned=4),
             wall_ms=8.0, allocated=[2, 3, 4], shared=[0], prefix_hits=[dict(id="b", num_cached_tokens=16)]),
        step(2, [("a", "decode", 48, 1), ("b", "decode", 20, 1)], blocks(shared=1, owned=4), preempted=["c"],
             freed=[4], allocated=[4]),
        step(3, [("a", "decode", 49, 1), ("b", "decode", 21, 1)], blocks(shared=1, owned=4),
             finished=[dict(id="b", reason="stop")], freed=[3]),
        step(4, [("a", "decode", 50, 1), ("c", "prefill", 0, 11)], blocks(owned=5), resumed=["c"], allocated=[3]),
        step(5, [("a", "decode", 51, 1), ("c", "decode", 11, 1)], blocks(owned=5),
             finished=[dict(id="a", reason="length")], freed=[4, 2, 1, 0]),
        step(6, [("c", "decode", 12, 1)], blocks(free=1, owned=1, cached_free=3), finished=[dict(id="c", reason="stop")],
             freed=[3])])


def simulated_trace(num_requests=8, num_blocks=16, block_size=16, max_num_seqs=4, max_tokens=64, seed=0):
    """A trace from a toy scheduler with a real block accounting: every even request starts with the same
    16-token system prompt (a prefix cache hit once someone computed it); too few blocks force preemptions."""
    rng = random.Random(seed)
    reqs = [dict(id=str(i), prompt_tokens=rng.randint(18, 90), num_cached_tokens=0, output_tokens=0, finish_reason=None)
            for i in range(num_requests)]
    target = {r["id"]: rng.randint(3, 40) for r in reqs}
    ref, cached, block_key = [0] * num_blocks, {}, {}              # per block: owners; key -> block; block -> key
    free, table, computed = list(range(num_blocks)), {r["id"]: [] for r in reqs}, {r["id"]: 0 for r in reqs}
    total = lambda r: r["prompt_tokens"] + r["output_tokens"]
    key = lambda r, j: ("system",) if j == 0 and int(r["id"]) % 2 == 0 else (r["id"], j)
    waiting, running, steps, was_preempted = list(reqs), [], [], set()

    def release(r, ev):
        for b in reversed(table[r["id"]]):
            ref[b] -= 1
            if ref[b] == 0:
                free.append(b)
                ev["freed"].append(b)
        table[r["id"]], computed[r["id"]] = [], 0

    def grow(r, n, ev):  # take fresh blocks for n more tokens; False when the cache has too few
        need = -(-(computed[r["id"]] + n) // block_size) - len(table[r["id"]])
        if need > len(free):
            return False
        for _ in range(need):
            b = free.pop(0)
            if b in block_key:  # its cached K/V is overwritten
                del cached[block_key.pop(b)]
                ev["evicted"].append(b)
            ref[b] = 1
            table[r["id"]].append(b)
            ev["allocated"].append(b)
        return True

    while waiting or running:
        ev = {k: [] for k in timeline.STEP_LISTS}
        budget, sched = max_tokens, []
        for r in list(running):
            n = min(total(r) - computed[r["id"]], budget)
            while r in running and not grow(r, n, ev):
                victim = running.pop()
                release(victim, ev)
                waiting.insert(0, victim)
                was_preempted.add(victim["id"])
                ev["preempted"].append(victim["id"])
            if r not in running or n == 0:
                break
            sched.append((r, n))
            budget -= n
        while waiting and budget > 0 and len(running) < max_num_seqs and not ev["preempted"]:
            r = waiting[0]
            hits = []
            while len(hits) < (total(r) - 1) // block_size and key(r, len(hits)) in cached:
                hits.append(cached[key(r, len(hits))])
            n = min(total(r) - len(hits) * block_size, budget)
            if -(-(len(hits) * block_size + n) // block_size) - len(hits) + sum(ref[b] == 0 for b in hits) > len(free):
                break
            waiting.pop(0)
            for b in hits:
                (ev["shared"].append(b) if ref[b] else free.remove(b))
                ref[b] += 1
            table[r["id"]], computed[r["id"]] = list(hits), len(hits) * block_size
            if hits:
                ev["prefix_hits"].append(dict(id=r["id"], num_cached_tokens=len(hits) * block_size))
            if r["id"] in was_preempted:
                ev["resumed"].append(r["id"])
            else:
                r["num_cached_tokens"] = len(hits) * block_size
            grow(r, n, ev)
            running.append(r)
            sched.append((r, n))
            budget -= n
        counts = blocks(free=sum(ref[b] == 0 and b not in block_key for b in range(num_blocks)),
                        cached_free=sum(ref[b] == 0 and b in block_key for b in range(num_blocks)),
                        owned=ref.count(1), shared=sum(c > 1 for c in ref))
        entries = [(r["id"], "decode" if n == 1 and r["output_tokens"] else "prefill", computed[r["id"]], n) for r, n in sched]
        for r, n in sched:  # the forward pass: K/V written, full blocks enter the prefix cache, one token sampled
            computed[r["id"]] += n
            for j in range(computed[r["id"]] // block_size):
                b = table[r["id"]][j]
                if key(r, j) not in cached and b not in block_key:
                    cached[key(r, j)], block_key[b] = b, key(r, j)
            if computed[r["id"]] == total(r):
                r["output_tokens"] += 1
                if r["output_tokens"] == target[r["id"]]:
                    r["finish_reason"] = "length" if int(r["id"]) % 3 else "stop"
                    ev["finished"].append(dict(id=r["id"], reason=r["finish_reason"]))
                    running.remove(r)
                    release(r, ev)
        steps.append(step(len(steps), entries, counts, wall_ms=1.0 + 0.05 * sum(n for _, n in sched), **ev))
    return dict(model="simulated", num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_tokens, requests=reqs, steps=steps)


def test_traces_pass_the_check():
    timeline.check_trace(small_trace())
    sim = simulated_trace()
    timeline.check_trace(sim)
    events = {k: sum(len(s[k]) for s in sim["steps"]) for k in ("preempted", "prefix_hits", "evicted", "shared")}
    assert all(events.values()), f"the simulated trace should show every event: {events}"
    assert any(e["kind"] == "prefill" and e["start"] > 0 for s in sim["steps"] for e in s["scheduled"]), "no chunked prefill"


BREAKAGES = {  # (what to break, words the error must name)
    "step index": (lambda t: t["steps"][2].update(step=7), "step 2"),
    "blocks sum": (lambda t: t["steps"][3]["blocks"].update(free=2), "step 3 blocks"),
    "unknown id": (lambda t: t["steps"][1]["scheduled"][0].update(id="zz"), "step 1 scheduled"),
    "bad kind": (lambda t: t["steps"][0]["scheduled"][0].update(kind="chunk"), "step 0 scheduled 'a' kind"),
    "long decode": (lambda t: t["steps"][2]["scheduled"][0].update(num_tokens=2), "step 2"),
    "token count": (lambda t: t["steps"][1].update(num_batched_tokens=31), "step 1 num_batched_tokens"),
    "over budget": (lambda t: t.update(max_num_batched_tokens=16), "step 0 num_batched_tokens"),
    "missing list": (lambda t: t["steps"][4].pop("resumed"), "step 4 resumed"),
    "resumed unscheduled": (lambda t: t["steps"][5].update(resumed=["b"]), "step 5 resumed"),
    "block id": (lambda t: t["steps"][0].update(allocated=[5]), "step 0 allocated"),
    "cached > prompt": (lambda t: t["requests"][1].update(num_cached_tokens=21), "request 'b' num_cached_tokens"),
    "finish reason": (lambda t: t["steps"][6]["finished"][0].update(reason=None), "step 6 finished"),
    "no model": (lambda t: t.pop("model"), "model"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_check_trace_names_the_culprit(name):
    trace = small_trace()
    breaks, culprit = BREAKAGES[name]
    breaks(trace)
    with pytest.raises(ValueError, match=culprit.replace("'", ".")):
        timeline.check_trace(trace)
    with pytest.raises(ValueError):
        timeline.render_html(trace)


def test_page_is_self_contained():
    page = timeline.render_html(simulated_trace())
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    for banned in ("http://", "https://", "<script", "src=", "@import", "<link"):
        assert banned not in page.lower(), banned
    assert page.count("url(") == page.count("url(#tl-hatch)"), "only the page's own hatch pattern may be referenced"


def test_one_row_per_request_with_its_marks():
    trace = small_trace()
    page = timeline.render_html(trace)
    assert page.count('class="request-row"') == 3
    assert [part.split('"')[0] for part in page.split('data-request="')[1:]] == ["a", "b", "c"]
    rows = {r: page.split(f'data-request="{r}"')[1].split("</g>")[0] for r in "abc"}
    assert "prefills 32 tokens (positions 0-31)" in rows["a"] and "prefills 16 tokens (positions 32-47)" in rows["a"]
    assert "16 tokens of request b found in the prefix cache" in rows["b"]
    assert "preempted at step 2" in rows["c"] and "recomputes (after preemption) 11 tokens" in rows["c"]
    assert "finished at step 5: length" in rows["a"] and "finished at step 3: stop" in rows["b"]
    assert sum(rows[r].count("decodes 1 token") for r in "abc") == 8  # a 4, b 2, c 2
    assert "tiny · 7 steps · 3 requests · 5 blocks of 16 tokens" in page and "27.0 ms in all" in page
    assert "at most 5 of the 5 held at once (step 1)" in page


def test_page_escapes_names():
    trace = small_trace()
    trace["model"] = "<b>x</b>"
    assert "<b>x</b>" not in timeline.render_html(trace)


def test_large_trace_stays_in_bounds():
    trace = simulated_trace(num_requests=50, num_blocks=64, max_num_seqs=8, max_tokens=128, seed=1)
    assert len(trace["steps"]) > 150
    page = timeline.render_html(trace)
    assert page.count('class="request-row"') == 50
    widths = {int(w) for w in (part.split('"')[0] for part in page.split('<svg class="timeline" width="')[1:])}
    assert widths and max(widths) <= timeline.LABEL_W + max(2 * len(trace["steps"]), timeline.PLOT_W) + timeline.RIGHT_W


def test_write_trace(tmp_path):
    trace = small_trace()
    timeline.write_trace(trace, str(tmp_path / "t.json"))
    assert json.load(open(tmp_path / "t.json")) == trace
    timeline.write_trace(trace, str(tmp_path / "t.html"))
    assert open(tmp_path / "t.html").read() == timeline.render_html(trace)
    with pytest.raises(ValueError, match="t.txt"):
        timeline.write_trace(trace, str(tmp_path / "t.txt"))


def test_renderer_leaves_the_trace_alone():
    trace = small_trace()
    before = copy.deepcopy(trace)
    timeline.render_html(trace)
    assert trace == before


# -- in a real browser -------------------------------------------------------------------------------

def read_png(path, max_width):
    """(width, height, rows) of an 8-bit RGB/RGBA, non-interlaced PNG; rows[y] holds the RGB of the first
    max_width pixels only. Each filter reads only pixels left of and above, so a left strip decodes alone."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, pos = data[pos + 8:pos + 8 + length], pos + 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and color in (2, 6) and not interlace, f"unsupported PNG: depth {depth}, colour type {color}"
    bpp, raw = (3 if color == 2 else 4), zlib.decompress(b"".join(idat))
    stride, keep = width * bpp + 1, min(max_width, width) * bpp
    prev, rows = bytearray(keep), []
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1:y * stride + 1 + keep])
        for i in range(keep) if kind else ():
            a, b = (line[i - bpp] if i >= bpp else 0), prev[i]
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            else:  # Paeth: whichever of left, above, upper-left is nearest to left + above - upper-left
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(v for x in range(0, keep, bpp) for v in line[x:x + 3]))
        prev = line
    return width, height, rows


def bands(rows, x, color, tolerance=10):
    """The vertical runs (y0, y1) of pixels near `color` in column x."""
    near = [all(abs(p - q) <= tolerance for p, q in zip(row[3 * x:3 * x + 3], color)) for row in rows]
    runs, y0 = [], None
    for y, hit in enumerate(near + [False]):
        if hit and y0 is None:
            y0 = y
        elif not hit and y0 is not None:
            runs.append((y0, y))
            y0 = None
    return runs


def rgb(hex_color):
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="chromium not installed: apt-get install chromium")
def test_page_in_headless_chromium(tmp_path):
    trace = simulated_trace(num_requests=9)
    page, png = tmp_path / "trace.html", tmp_path / "shot.png"
    timeline.write_trace(trace, str(page))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1400,900", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    width, height, rows = read_png(png, max_width=420)
    assert (width, height) == (1400, 900)
    colors = {row[i:i + 3] for row in rows for i in range(0, len(row), 3)}
    assert len(colors) > 20, f"the screenshot looks blank: {len(colors)} colours"
    for mark in ("prefill", "decode"):  # the first steps' marks, right of the labels
        assert bytes(rgb(timeline.COLORS[mark])) in colors, f"no {mark} mark in the screenshot"
    # one tab per request row, at the row's left edge: the most runs of ROW_TAB in any one column
    tab = rgb(timeline.ROW_TAB)
    runs = max((bands(rows, x, tab) for x in range(0, 420, 2)), key=len)
    assert len(runs) == len(trace["requests"]), f"{len(runs)} rows of the row tab colour, want {len(trace['requests'])}"
    assert all(abs((y1 - y0) - timeline.BAND_H) <= 2 for y0, y1 in runs), runs
    gaps = {b[0] - a[0] for a, b in zip(runs, runs[1:])}
    assert max(gaps) - min(gaps) <= 1, f"rows not evenly spaced: {runs}"


# -- recorded by the engine: LLM(trace=True) on a tiny random checkpoint -------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from test_engine import make_checkpoint
    folder = str(tmp_path_factory.mktemp("tiny_trace"))
    make_checkpoint(folder)
    return folder


def traced_run(folder):
    """Six requests (one of them n=2) sharing an 8-token system prompt, on 12 blocks of 4 slots: too few for
    all at once, so sequences are preempted; a 16-token step budget chunks the prompts. Returns the LLM, its
    outputs, and per forward pass (its tokens, [(start, num_tokens) of each sequence the model ran])."""
    from minillm import LLM, SamplingParams
    from test_engine import random_prompts
    llm = LLM(folder, block_size=4, num_gpu_blocks_override=12, max_num_seqs=4, max_num_batched_tokens=16, trace=True)
    ran, forward = [], llm.llm_engine.runner.forward

    def spy(step, *args):  # the batch as the model runner gets it: its tokens, each sequence's first position and count
        firsts = [sum(step.query_lens[:j]) for j in range(len(step.query_lens))]
        ran.append((len(step.input_ids), [(step.positions[f], n) for f, n in zip(firsts, step.query_lens)]))
        return forward(step, *args)

    llm.llm_engine.runner.forward = spy
    system = random_prompts([8], seed=5)[0]
    prompts = [{"prompt_token_ids": system + p} for p in random_prompts([3, 9, 14, 5, 2, 11], seed=6)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True, n=2 if i == 1 else 1) for i in range(6)]
    return llm, llm.generate(prompts, params, use_tqdm=False), ran


@pytest.fixture(scope="module")
def traced(tiny_folder):
    return traced_run(tiny_folder)


def test_trace_passes_the_check_and_renders(traced):
    llm, outs, _ = traced
    trace = llm.last_trace
    timeline.check_trace(trace)
    assert trace["num_blocks"] == 12 and trace["block_size"] == 4 and trace["max_num_batched_tokens"] == 16
    ids = [o.request_id for o in outs]
    assert [r["id"] for r in trace["requests"]] == [ids[0], f"{ids[1]}.0", f"{ids[1]}.1", *ids[2:]]
    page = timeline.render_html(trace)
    assert page.count('class="request-row"') == 7
    json.dumps(trace)  # plain data


def test_trace_steps_are_the_batches_the_model_ran(traced):
    llm, _, ran = traced
    steps = llm.last_trace["steps"]
    recorded = [(s["num_batched_tokens"], [(e["start"], e["num_tokens"]) for e in s["scheduled"]]) for s in steps]
    assert [r for r in recorded if r[0]] == ran  # (a step with an empty batch only lands the last tokens)
    prompt_tokens = {r["id"]: r["prompt_tokens"] for r in llm.last_trace["requests"]}
    for s in steps:  # a decode: the one newest token, an output token (a prompt's last token alone is a prefill)
        for e in s["scheduled"]:
            assert (e["kind"] == "decode") == (e["num_tokens"] == 1 and e["start"] >= prompt_tokens[e["id"]]), e
    assert any(e["kind"] == "prefill" and e["start"] > 0 for s in steps for e in s["scheduled"]), "no chunked prefill"


def test_trace_blocks_allocated_are_freed_or_still_owned(traced):
    """Per block, allocated and freed alternate. A step keeps its events in lists, not in their order (a
    preemption can free a block that the same step allocates again), so this holds at every step's end."""
    llm, _, _ = traced
    held = collections.Counter()  # block -> times allocated - times freed, so far
    for s in llm.last_trace["steps"]:
        before = {b for b, k in held.items() if k}
        held.update(s["allocated"])
        held.subtract(s["freed"])
        assert all(k in (0, 1) for k in held.values()), f"step {s['step']}: {held}"
        assert set(s["evicted"]) <= set(s["allocated"]) and set(s["shared"]) <= before | set(s["allocated"]), s["step"]
        # the counts are taken after schedule, the last allocation of the step; only frees come after it
        now = sum(held.values())
        assert now <= s["blocks"]["owned"] + s["blocks"]["shared"] <= now + len(s["freed"]), s["step"]
    still_owned = {b.block_id for b in llm.llm_engine.block_manager.blocks if b.ref_count}
    assert {b for b, k in held.items() if k} == still_owned == set()  # generate returned: every block is free again
    assert any(s["evicted"] for s in llm.last_trace["steps"]) and any(s["shared"] for s in llm.last_trace["steps"])


def test_trace_every_preemption_is_followed_by_a_resumption(traced):
    llm, _, _ = traced
    steps, history = llm.last_trace["steps"], {}
    for s in steps:  # per row: "P" preempted, "R" resumed, "S" scheduled, in order within the step
        for rid in s["preempted"]:
            history[rid] = history.get(rid, "") + "P"
        for e in s["scheduled"]:
            history[e["id"]] = history.get(e["id"], "") + ("R" if e["id"] in s["resumed"] else "S")
    assert sum(len(s["preempted"]) for s in steps) == llm.llm_engine.scheduler.num_preemptions > 0
    for rid, h in history.items():
        assert "PS" not in h and "PP" not in h and not h.endswith("P"), f"{rid}: {h}"
        assert h.count("P") == h.count("R"), f"{rid}: {h}"


def test_trace_prefix_hits_are_what_num_cached_tokens_says(traced):
    llm, outs, _ = traced
    trace = llm.last_trace
    first_hit = {}  # row -> the tokens found in the cache at its first admission (0: none)
    for s in trace["steps"]:
        hits = {h["id"]: h["num_cached_tokens"] for h in s["prefix_hits"]}
        for e in s["scheduled"]:
            first_hit.setdefault(e["id"], hits.get(e["id"], 0))
    rows = {r["id"]: r for r in trace["requests"]}
    for out in outs:
        mine = [rid for rid in rows if rid == out.request_id or rid.startswith(out.request_id + ".")]
        assert max(first_hit[rid] for rid in mine) == out.num_cached_tokens
        assert all(first_hit[rid] == rows[rid]["num_cached_tokens"] for rid in mine)
        assert [rows[rid]["output_tokens"] for rid in mine] == [len(c.token_ids) for c in out.outputs]
        finishes = [f for s in trace["steps"] for f in s["finished"] if f["id"] in mine]
        assert sorted(f["id"] for f in finishes) == mine and all(f["reason"] == "length" for f in finishes)
    assert sum(1 for v in first_hit.values() if v) >= 3  # the system prompt's 2 blocks, found by later requests


def test_trace_is_per_generate_call(traced, tiny_folder):
    llm, _, _ = traced
    from minillm import SamplingParams
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    trace = llm.last_trace
    timeline.check_trace(trace)
    assert [r["id"] for r in trace["requests"]] == [out[0].request_id] and len(trace["steps"]) == 3  # prefill, decode, land


def test_no_trace_touches_nothing(tiny_folder, monkeypatch):
    from minillm import LLM, SamplingParams

    def refuse(*args, **kwargs):
        raise AssertionError("a Recorder was made with trace off")

    monkeypatch.setattr(timeline, "Recorder", refuse)
    llm = LLM(tiny_folder, block_size=4, num_gpu_blocks_override=20)
    engine = llm.llm_engine
    import compat
    assert not engine.tracing and type(engine.observer) is compat.Metrics  # (counts for get_metrics, records no steps)
    assert engine.block_manager.observer is engine.observer and engine.scheduler.observer is engine.observer
    llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.last_trace is None


def test_cli_writes_the_trace(tmp_path, capsys, monkeypatch):
    import cli
    root, page, written = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), tmp_path / "trace.html", []
    write = timeline.write_trace
    monkeypatch.setattr(timeline, "write_trace", lambda trace, path: (written.append(trace), write(trace, path)))
    assert cli.main(["--prompts", os.path.join(root, "examples", "prompts.txt"), "--max-tokens", "4",
                     "--device", "cpu", "--trace", str(page)]) == 0
    text, (trace,) = page.read_text(), written
    assert text.startswith("<!doctype html>") and text.count('class="request-row"') == 4
    assert f"wrote the trace of {len(trace['steps'])} engine steps" in capsys.readouterr().err
    assert trace["steps"][0]["num_batched_tokens"] == sum(r["prompt_tokens"] for r in trace["requests"])
    assert all(r["output_tokens"] <= 4 and r["finish_reason"] for r in trace["requests"])


def test_cli_checks_the_trace_path_before_loading(tmp_path, capsys, monkeypatch):
    import cli
    import minillm
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    monkeypatch.setattr(minillm, "LLM", lambda *a, **k: pytest.fail("the model was loaded"))
    for path, message in ((tmp_path / "t.txt", "must end in .html"), (tmp_path / "no" / "t.html", "No such file")):
        assert cli.main(["--prompts", str(prompts), "--trace", str(path)]) == 1
        assert message in capsys.readouterr().err
