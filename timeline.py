"""
timeline: a minillm engine trace drawn as one self-contained HTML page (inline SVG: no script, no network).

`LLM(..., trace=True)` records, per engine step, what the scheduler put in the batch and what the block
manager did. The record is plain JSON-able data; `check_trace` holds it to this contract:

  {"model": str, "num_blocks": int, "block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int,
   "requests": [{"id": str, "prompt_tokens": int, "num_cached_tokens": int, "output_tokens": int,
                 "finish_reason": str | None, "arrival_step": int  (optional, default 0)}, ...],
   "steps": [{"step": int (its index in the list), "wall_ms": float,
              "scheduled": [{"id": str, "kind": "prefill" | "decode", "start": int, "num_tokens": int}, ...],
              "num_batched_tokens": int (sum of num_tokens), "num_seqs": int (len(scheduled)),
              "allocated": [block_id], "freed": [block_id], "evicted": [block_id], "shared": [block_id],
              "prefix_hits": [{"id": str, "num_cached_tokens": int}], "preempted": [id], "resumed": [id],
              "finished": [{"id": str, "reason": str}],
              "blocks": {"free": int, "owned": int, "shared": int, "cached_free": int}}, ...]}

  scheduled    the step's batch in batch order. "prefill": num_tokens tokens from position `start`, a chunk
               of the prompt or, after a preemption, of the recompute of prompt + output; "decode": the one
               newest token, at position `start`.
  allocated    blocks that got an owner this step, having none (a fresh block, or a free one found in the
               prefix cache); freed: blocks whose last owner let go (so per block, allocated and freed
               alternate); evicted: allocated blocks whose cached K/V was dropped to reuse them; shared:
               blocks that gained an owner while another held them (a prefix cache hit on a held block).
  prefix_hits  sequences that started (or restarted) from cached blocks, with the tokens those blocks hold.
  preempted    running sequences whose blocks were freed to make room (they wait, then recompute);
  resumed      sequences scheduled again after a preemption; finished: sequences that ended this step
               (their last token reached the host, or they were aborted).
  blocks       the cache as this step's forward pass ran: free (no owner, no cached hash), cached_free (no
               owner, still findable in the prefix cache), owned (one owner), shared (more than one owner);
               the four sum to num_blocks.

A request with n > 1 completions is n sequences, and each is a request row here, "<request id>.<index>".
`Recorder` (below) is what builds a trace inside the engine.

The page: a timeline with x = engine step (one forward pass of the whole batch per column: the step index
keeps every step readable, where wall time would squeeze the fast decode steps) and one row per request;
under it the KV cache per step, the batch budgets used and the step's wall time. Hover a mark for details
(SVG <title> tooltips). Usage: `write_trace(trace, "trace.html")` or `write_trace(trace, "trace.json")`.
"""

import html
import json
import os
import time

from compat import Metrics

COLORS = {  # one colour per kind of mark; the legends name each
    "prefill": "#4e79a7", "recompute": "#f28e2b", "decode": "#59a14f", "cached": "#b07aa1",
    "preempted": "#e15759", "finish": "#222222", "waiting": "#9aa3af", "running": "#c3cad5",
    "free": "#e9ecef", "cached_free": "#dcc6e4", "owned": "#9dbce6", "shared": "#2f5fa7",
    "tokens": "#3b5b92", "seqs": "#d37295", "wall": "#b9b0a9",
}
ROW_TAB = "#33415c"      # the tab at the left of each request row, a colour used nowhere else (tests count it)
LABEL_W, RIGHT_W = 200, 100   # px left of step 0 (row labels) and right of the last step (finish labels)
ROW_H, BAND_H = 24, 20        # px per request row, and its shaded band (the rest is a gap between rows)
KV_H, BUDGET_H, WALL_H = 90, 60, 36
PLOT_W = 1050                 # px the steps are scaled to fill, a step kept between 2 and 24 px wide
BLOCK_KINDS = ("shared", "owned", "cached_free", "free")   # stacked bottom-up in the KV strip
STEP_LISTS = ("allocated", "freed", "evicted", "shared", "prefix_hits", "preempted", "resumed", "finished")


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"trace {where}".rstrip() + f": {msg}")


def _need_ints(d: dict, keys, where: str, least: int = 0) -> None:
    for key in keys:
        v = d.get(key)
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= least
        _need(ok, where + key, f"an int >= {least} expected, got {v!r}")


def check_trace(trace: dict) -> None:
    """Raise ValueError naming the request or step, and the field, where `trace` breaks the format above."""
    _need(isinstance(trace, dict), "", f"a dict expected, got {type(trace).__name__}")
    _need_ints(trace, ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"), "", least=1)
    _need(isinstance(trace.get("model"), str), "model", "a str expected")
    for key in ("requests", "steps"):
        _need(isinstance(trace.get(key), list), key, "a list expected")
    ids = set()
    for j, r in enumerate(trace["requests"]):
        _need(isinstance(r, dict) and isinstance(r.get("id"), str), f"requests[{j}]", "a dict with a str 'id' expected")
        where = f"request {r['id']!r} "
        _need(r["id"] not in ids, where + "id", "repeated")
        ids.add(r["id"])
        _need_ints(r | {"arrival_step": r.get("arrival_step", 0)},
                   ("prompt_tokens", "num_cached_tokens", "output_tokens", "arrival_step"), where)
        _need(r["num_cached_tokens"] <= r["prompt_tokens"], where + "num_cached_tokens", "more than prompt_tokens")
        _need("finish_reason" in r and r["finish_reason"] is None or isinstance(r.get("finish_reason"), str),
              where + "finish_reason", "a str or None expected")
    for i, s in enumerate(trace["steps"]):
        _need(isinstance(s, dict) and s.get("step") == i, f"step {i}", "a dict with 'step' equal to its index expected")
        _check_step(trace, ids, s, f"step {i} ")


def _check_step(trace: dict, ids: set, s: dict, where: str) -> None:
    _need(isinstance(s.get("wall_ms"), (int, float)) and s["wall_ms"] >= 0, where + "wall_ms", "a number >= 0 expected")
    for key in ("scheduled",) + STEP_LISTS:
        _need(isinstance(s.get(key), list), where + key, "a list expected")
    batch = set()
    for e in s["scheduled"]:
        ok = isinstance(e, dict) and e.get("id") in ids and e["id"] not in batch
        _need(ok, where + "scheduled", f"unknown or repeated id: {e!r}")
        batch.add(e["id"])
        culprit = f"{where}scheduled {e['id']!r} "
        _need(e.get("kind") in ("prefill", "decode"), culprit + "kind", f"'prefill' or 'decode', got {e.get('kind')!r}")
        _need_ints(e, ["start"], culprit)
        _need_ints(e, ["num_tokens"], culprit, least=1)
        _need(e["kind"] == "prefill" or e["num_tokens"] == 1, culprit + "num_tokens", "a decode is one token")
    used = sum(e["num_tokens"] for e in s["scheduled"])
    _need(s.get("num_batched_tokens") == used, where + "num_batched_tokens", f"{s.get('num_batched_tokens')!r}, not {used}")
    _need(used <= trace["max_num_batched_tokens"], where + "num_batched_tokens", f"{used} > max_num_batched_tokens")
    _need(s.get("num_seqs") == len(batch), where + "num_seqs", f"{s.get('num_seqs')!r}, scheduled {len(batch)}")
    _need(len(batch) <= trace["max_num_seqs"], where + "num_seqs", f"{len(batch)} > max_num_seqs")
    for key in ("allocated", "freed", "evicted", "shared"):
        ok = all(isinstance(b, int) and 0 <= b < trace["num_blocks"] for b in s[key])
        _need(ok, where + key, "block ids in [0, num_blocks) expected")
    for key in ("preempted", "resumed"):
        _need(all(rid in ids for rid in s[key]), where + key, f"unknown id in {s[key]!r}")
    _need(all(rid in batch for rid in s["resumed"]), where + "resumed", "a resumed request is scheduled in that step")
    for key, field, kind in (("prefix_hits", "num_cached_tokens", int), ("finished", "reason", str)):
        _need(all(isinstance(x, dict) and x.get("id") in ids and isinstance(x.get(field), kind) for x in s[key]),
              where + key, f"dicts with a known 'id' and a {kind.__name__} '{field}' expected")
    _need(isinstance(s.get("blocks"), dict), where + "blocks", "a dict expected")
    _need_ints(s["blocks"], BLOCK_KINDS, where + "blocks ")
    total = sum(s["blocks"][k] for k in BLOCK_KINDS)
    _need(total == trace["num_blocks"], where + "blocks", f"they sum to {total}, not num_blocks {trace['num_blocks']}")


def check_path(path: str) -> None:
    if not path.endswith((".html", ".json")):
        raise ValueError(f"trace path {path!r}: must end in .html (the page) or .json (the data)")


def write_trace(trace: dict, path: str) -> None:
    """Write `trace` to `path`: the page if it ends in .html, the plain data if it ends in .json."""
    check_path(path)
    text = render_html(trace) if path.endswith(".html") else json.dumps(trace, indent=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- recording: the engine tells a Recorder what it does, the Recorder keeps it as the plain data above --

class Recorder(Metrics):
    """What `LLM(..., trace=True)` records: the engine's observer (minillm.Observer's events), which also keeps
    vLLM's metrics (compat.Metrics). `added` as sequences are queued, `block` at each block event, `admitted` at
    each admission (its prefix-cache hit; "resumed" when a preempted sequence comes back), `preempted`,
    `scheduled` right after each schedule, `step_ended` at the end of each step. An event between two steps (an
    abort, say) goes into the next step's record. One row per sequence: the request id, or for n > 1
    "<request id>.<index>"."""

    def __init__(self, engine, model: str):
        super().__init__()
        self.engine = engine  # read for its block manager (the block counts) and its scheduler (the budgets)
        self.info = dict(model=os.path.basename(os.path.normpath(model)), num_blocks=len(engine.block_manager.blocks),
                         block_size=engine.block_manager.block_size, max_num_seqs=engine.scheduler.max_num_seqs,
                         max_num_batched_tokens=engine.scheduler.max_num_batched_tokens)
        self.rows: dict = {}  # sequence -> (its row id, the step it arrived at), in arrival order
        self.clear()

    def clear(self) -> None:
        """Start a new trace (LLM.generate does, for each call); unfinished sequences stay in it."""
        self.rows = {seq: (rid, 0) for seq, (rid, _) in self.rows.items() if seq.finish_reason is None}
        self.live, self.steps = list(self.rows), []
        self.events = {key: [] for key in STEP_LISTS if key != "finished"}
        self.batch, self.blocks, self.own_time = [], {}, 0.0

    def added(self, seqs: list) -> None:
        super().added(seqs)
        for seq in seqs:
            rid = seq.request_id if len(seqs) == 1 else f"{seq.request_id}.{seq.index}"
            self.rows[seq] = (rid, len(self.steps))
            self.live.append(seq)

    def note(self, kind: str, item) -> None:
        """A block event (kind "allocated", "freed", "evicted" or "shared", item a block id), or "preempted" or
        "resumed" (item a sequence)."""
        self.events[kind].append(item if isinstance(item, int) else self.rows[item][0])

    def block(self, kind: str, block_id: int) -> None:
        self.note(kind, block_id)

    def preempted(self, seq) -> None:
        self.note("preempted", seq)

    def admitted(self, seq) -> None:
        """A waiting sequence joins the running set, its first num_computed_tokens from the prefix cache."""
        super().admitted(seq)
        if seq.num_computed_tokens:
            self.events["prefix_hits"].append(dict(id=self.rows[seq][0], num_cached_tokens=seq.num_computed_tokens))
        if seq.num_cached_tokens is not None:  # (set at its first admission) it ran before: it was preempted
            self.note("resumed", seq)

    def scheduled(self, batch: list) -> None:
        """The batch [(sequence, new tokens)] before the forward pass moves num_computed_tokens, and the cache:
        one pass over every block (some ms per 100k blocks, left out of the step's wall time)."""
        began, self.batch = time.perf_counter(), []
        for seq, n in batch:
            start = seq.num_computed_tokens
            decode = n == 1 and start == seq.num_tokens - 1 and start >= len(seq.prompt_token_ids)
            self.batch.append(dict(id=self.rows[seq][0], kind="decode" if decode else "prefill", start=start, num_tokens=n))
        blocks = self.engine.block_manager.blocks
        self.blocks = dict(free=sum(b.ref_count == 0 and b.hash is None for b in blocks),
                           cached_free=sum(b.ref_count == 0 and b.hash is not None for b in blocks),
                           owned=sum(b.ref_count == 1 for b in blocks), shared=sum(b.ref_count > 1 for b in blocks))
        self.own_time = time.perf_counter() - began

    def step_ended(self, started: float) -> None:
        """Close the step that began at time.perf_counter() `started`; the sequences that got a finish reason in it."""
        wall_ms = 1e3 * (time.perf_counter() - started - self.own_time)
        finished = [dict(id=self.rows[s][0], reason=s.finish_reason) for s in self.live if s.finish_reason is not None]
        self.live = [s for s in self.live if s.finish_reason is None]
        self.steps.append(dict(step=len(self.steps), wall_ms=wall_ms, scheduled=self.batch,
                               num_batched_tokens=sum(e["num_tokens"] for e in self.batch), num_seqs=len(self.batch),
                               **self.events, finished=finished, blocks=self.blocks))
        self.events = {key: [] for key in self.events}
        self.batch = []

    def trace(self) -> dict:
        """The trace so far, as the plain data check_trace describes."""
        requests = [dict(id=rid, prompt_tokens=len(seq.prompt_token_ids), num_cached_tokens=seq.num_cached_tokens or 0,
                         output_tokens=sum(t >= 0 for t in seq.output_token_ids),  # (a token still on the device is -1)
                         finish_reason=seq.finish_reason, arrival_step=arrival) for seq, (rid, arrival) in self.rows.items()]
        return dict(self.info, requests=requests, steps=list(self.steps))


# -- the page: per-request history, then one SVG per strip, all sharing the same x = step --

def request_histories(trace: dict) -> dict:
    """Per request id: its marks in step order, its preempted spans and where it was first seen and finished."""
    hist = {r["id"]: dict(request=r, marks=[], hits={}, gaps=[], first=None, finish=None, preempted_at=None,
                          was_preempted=False) for r in trace["requests"]}
    for s in trace["steps"]:
        i = s["step"]
        for rid in s["preempted"]:
            hist[rid]["preempted_at"], hist[rid]["was_preempted"] = i, True
        for hit in s["prefix_hits"]:
            hist[hit["id"]]["hits"][i] = hit["num_cached_tokens"]
        for e in s["scheduled"]:
            h = hist[e["id"]]
            if h["preempted_at"] is not None:  # the gap ends when it is scheduled again
                h["gaps"].append((h["preempted_at"], i))
                h["preempted_at"] = None
            h["first"] = i if h["first"] is None else h["first"]
            kind = "recompute" if e["kind"] == "prefill" and h["was_preempted"] else e["kind"]
            h["marks"].append((i, kind, e))
        for f in s["finished"]:
            hist[f["id"]]["finish"] = (i, f["reason"])
    for h in hist.values():
        if h["preempted_at"] is not None:  # still waiting when the trace ends
            h["gaps"].append((h["preempted_at"], len(trace["steps"])))
    return hist


def _rect(x, y, w, h, fill, tip="", extra="") -> str:
    title = f"<title>{html.escape(tip)}</title>" if tip else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{fill}"{extra}>'
            f"{title}</rect>")


def _line(x1, x2, y, color, extra="") -> str:
    return f'<line x1="{x1:.1f}" x2="{x2:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"{extra}/>'


def _tick_every(step_w: float) -> int:  # label every k-th step, k a round number, labels >= 36 px apart
    return next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if k * step_w >= 36)


def _axis(n: int, step_w: float, y: float) -> str:
    ticks = [f'<text x="{LABEL_W + (i + 0.5) * step_w:.1f}" y="{y}" class="tick">{i}</text>'
             for i in range(0, n, _tick_every(step_w))]
    return f'<text x="{LABEL_W - 8}" y="{y}" class="axis">step</text>' + "".join(ticks)


def _request_label(r: dict, y: float, width: float) -> list:
    """The row's band and tab (both carry the request's summary as tooltip) and its name and prompt length."""
    cached = f", {r['num_cached_tokens']} from the prefix cache" if r["num_cached_tokens"] else ""
    summary = (f"request {r['id']}: {r['prompt_tokens']} prompt tokens{cached}, {r['output_tokens']} output tokens, "
               f"finished: {r['finish_reason'] or 'not yet'}")
    name = r["id"] if len(r["id"]) <= 12 else r["id"][:11] + "…"   # the full id is in the tooltip
    note = f" ({r['num_cached_tokens']} cached)" if r["num_cached_tokens"] else ""
    return [_rect(0, y, width, BAND_H, "#e9edf4", summary, ' class="band"'), _rect(0, y, 6, BAND_H, ROW_TAB, summary),
            f'<text x="14" y="{y + BAND_H / 2 + 4}" class="label"><tspan font-weight="600">req {html.escape(name)}</tspan>'
            f" · {r['prompt_tokens']} tok{note}</text>"]


def _request_row(h: dict, row: int, n: int, step_w: float, scale: float) -> str:
    r, y = h["request"], 22 + row * ROW_H
    rid, mid, x = r["id"], y + BAND_H / 2, lambda i: LABEL_W + i * step_w
    size = lambda tokens: 6 + (BAND_H - 6) * min(1.0, tokens / scale)   # a mark's height grows with its tokens
    out = [f'<g class="request-row" data-request="{html.escape(rid)}">'] + _request_label(r, y, x(n) + RIGHT_W)
    first, end = (h["first"] if h["first"] is not None else n), (h["finish"][0] + 1 if h["finish"] else n)
    out.append(_line(x(r.get("arrival_step", 0)), x(first), mid, COLORS["waiting"], ' stroke-dasharray="2 3"'))
    out.append(_line(x(first), x(max(first, end)), mid, COLORS["running"], ' stroke-width="2"'))
    for a, b in h["gaps"]:
        out.append(_rect(x(a), y + 2, (b - a) * step_w, BAND_H - 4, "url(#tl-hatch)", f"request {rid} preempted at step {a}: "
                         f"its blocks were freed; it waits, then recomputes (steps {a}-{b - 1})"))
    for i, tokens in h["hits"].items():  # just left of the step's mark: the tokens it did not have to compute
        w = max(3.0, step_w * 0.5)
        out.append(_rect(x(i) - w, mid - size(tokens) / 2, w, size(tokens), COLORS["cached"],
                         f"step {i}: {tokens} tokens of request {rid} found in the prefix cache: not computed again"))
    for i, kind, e in h["marks"]:
        if kind == "decode":
            w = max(1.0, step_w * 0.45)
            tip = f"step {i}: request {rid} decodes 1 token (position {e['start']})"
            out.append(_rect(x(i) + (step_w - w) / 2, mid - 3, w, 6, COLORS["decode"], tip))
        else:
            pad, hgt = (1 if step_w >= 5 else 0), size(e["num_tokens"])
            what = "recomputes (after preemption)" if kind == "recompute" else "prefills"
            tip = (f"step {i}: request {rid} {what} {e['num_tokens']} tokens "
                   f"(positions {e['start']}-{e['start'] + e['num_tokens'] - 1})")
            out.append(_rect(x(i) + pad, mid - hgt / 2, step_w - 2 * pad, hgt, COLORS[kind], tip))
    if h["finish"]:
        i, reason = h["finish"]
        tip = f"request {rid} finished at step {i}: {reason} ({r['output_tokens']} output tokens)"
        out.append(_rect(x(i + 1) + 2, mid - 4, 8, 8, COLORS["finish"], tip))
        out.append(f'<text x="{x(i + 1) + 13}" y="{mid + 4}" class="reason">{html.escape(reason)}'
                   f"<title>{html.escape(tip)}</title></text>")
    return "".join(out) + "</g>"


def _timeline_svg(trace: dict, step_w: float) -> str:
    n, hist = len(trace["steps"]), request_histories(trace)
    sizes = [e["num_tokens"] for s in trace["steps"] for e in s["scheduled"] if e["kind"] == "prefill"]
    sizes += [hit["num_cached_tokens"] for s in trace["steps"] for hit in s["prefix_hits"]]
    rows = [_request_row(h, row, n, step_w, max(sizes + [1])) for row, h in enumerate(hist.values())]
    height = 22 + len(rows) * ROW_H + 18
    grid = "".join(f'<line x1="{LABEL_W + i * step_w}" x2="{LABEL_W + i * step_w}" y1="18" y2="{height - 16}" '
                   f'stroke="#d5dbe5"/>' for i in range(0, n + 1, _tick_every(step_w)))  # seen through the row bands
    return (f'<svg class="timeline" width="{LABEL_W + n * step_w + RIGHT_W:.0f}" height="{height}">'
            + _axis(n, step_w, 14) + grid + "".join(rows) + _axis(n, step_w, height - 4) + "</svg>")


def _kv_svg(trace: dict, step_w: float) -> str:
    n, nb = len(trace["steps"]), trace["num_blocks"]
    out = [f'<svg class="kv" width="{LABEL_W + n * step_w + RIGHT_W:.0f}" height="{KV_H + 4}">',
           f'<text x="{LABEL_W - 8}" y="12" class="axis">{nb} blocks</text>',
           f'<text x="{LABEL_W - 8}" y="{KV_H}" class="axis">0</text>']
    for s in trace["steps"]:
        b, y = s["blocks"], KV_H
        events = ", ".join(f"{k} {s[k]}" for k in ("allocated", "freed", "evicted", "shared") if s[k])
        tip = f"step {s['step']}: " + ", ".join(f"{k.replace('_', ' ')} {b[k]}" for k in BLOCK_KINDS)
        tip += f"\nblocks {events}" if events else ""
        x0, x1 = round(LABEL_W + s["step"] * step_w), round(LABEL_W + (s["step"] + 1) * step_w)  # whole pixels:
        for kind in BLOCK_KINDS:  # stacked bottom-up                      # no seams between crisp columns
            h = KV_H * b[kind] / nb
            out.append(_rect(x0, y - h, x1 - x0, h, COLORS[kind], tip, ' shape-rendering="crispEdges"'))
            y -= h
    out.append(f'<rect x="{LABEL_W}" y="0.5" width="{n * step_w}" height="{KV_H - 0.5}" fill="none" stroke="#c9cfd8"/>')
    return "".join(out) + "</svg>"


def _budget_svg(trace: dict, step_w: float) -> str:
    """Per step: the token and sequence budgets used (lines, 0-100%) and the wall time (bars, by the slowest)."""
    steps, n, top = trace["steps"], len(trace["steps"]), 6
    y, cx = (lambda frac: top + BUDGET_H * (1 - frac)), (lambda i: LABEL_W + (i + 0.5) * step_w)
    wall_max, bar_pad = max([s["wall_ms"] for s in steps] + [1e-9]), (1 if step_w > 4 else 0)
    out = [f'<svg class="budget" width="{LABEL_W + n * step_w + RIGHT_W:.0f}" height="{top + BUDGET_H + WALL_H + 26}">',
           _line(LABEL_W, LABEL_W + n * step_w, y(1), "#999", ' stroke-dasharray="4 3"'),
           f'<text x="{LABEL_W - 8}" y="{y(1) + 4}" class="axis">100%</text>',
           f'<text x="{LABEL_W - 8}" y="{y(0)}" class="axis">0</text>',
           f'<text x="{LABEL_W - 8}" y="{y(0) + WALL_H / 2 + 8}" class="axis">step time</text>']
    for key, budget, color in (("num_batched_tokens", trace["max_num_batched_tokens"], COLORS["tokens"]),
                               ("num_seqs", trace["max_num_seqs"], COLORS["seqs"])):
        points = " ".join(f"{cx(s['step']):.1f},{y(s[key] / budget):.1f}" for s in steps)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    for s in steps:
        i, h = s["step"], WALL_H * s["wall_ms"] / wall_max
        tip = (f"step {i}: {s['num_batched_tokens']}/{trace['max_num_batched_tokens']} tokens, "
               f"{s['num_seqs']}/{trace['max_num_seqs']} sequences, {s['wall_ms']:.2f} ms")
        out.append(_rect(LABEL_W + i * step_w + bar_pad, y(0) + 4 + WALL_H - h, step_w - 2 * bar_pad, h, COLORS["wall"], tip))
        out.append(_rect(LABEL_W + i * step_w, top, step_w, BUDGET_H, "transparent", tip))  # a hover target for the lines
    return "".join(out) + _axis(n, step_w, top + BUDGET_H + WALL_H + 22) + "</svg>"


def _swatch(key: str) -> str:
    if key in ("waiting", "running", "tokens", "seqs"):  # drawn as lines
        dash = ' stroke-dasharray="2 3"' if key == "waiting" else ' stroke-width="2"'
        return f'<svg width="22" height="12">{_line(1, 21, 6, COLORS[key], dash)}</svg>'
    fill = "url(#tl-hatch)" if key == "preempted" else COLORS[key]
    return f'<svg width="14" height="12"><rect x="1" y="1" width="12" height="10" fill="{fill}"/></svg>'


def _legend(items) -> str:
    spans = (f"<span>{_swatch(key)} <b>{name}</b> {html.escape(text)}</span>" for key, name, text in items)
    return '<div class="legend">' + "".join(spans) + "</div>"


TIMELINE_LEGEND = [
    ("waiting", "waiting", "queued, not yet scheduled"), ("prefill", "prefill", "a chunk of the prompt; height = its tokens"),
    ("cached", "cached prefix", "prompt tokens found in the prefix cache, skipped"), ("decode", "decode", "one new token"),
    ("running", "running", "in the running set"), ("preempted", "preempted", "blocks taken back; waits to recompute"),
    ("recompute", "recompute", "prefill of prompt + output after a preemption"),
    ("finish", "finish", "with its reason: stop or length")]
KV_LEGEND = [("shared", "shared", "more than one owner (prefix shared)"), ("owned", "owned", "one owner"),
             ("cached_free", "cached, free", "no owner, K/V still findable in the prefix cache"), ("free", "free", "empty")]
BUDGET_LEGEND = [("tokens", "tokens", "batched / max_num_batched_tokens"), ("seqs", "sequences", "batched / max_num_seqs"),
                 ("wall", "step time", "wall time of the step, scaled to the slowest")]
STYLE = """body{font:14px system-ui,sans-serif;color:#222;margin:16px 20px;background:#fff}
h1{font-size:19px;margin:0 0 4px} h2{font-size:15px;margin:18px 0 4px} p{margin:2px 0 6px;color:#555}
.legend{display:flex;flex-wrap:wrap;gap:4px 18px;margin:4px 0 6px;font-size:12.5px;color:#444}
.legend svg{vertical-align:middle} .legend b{color:#222;font-weight:600}
svg text{font:11px system-ui,sans-serif;fill:#333} text.label{font-size:12px} text.tick{text-anchor:middle;fill:#777}
text.axis{text-anchor:end;fill:#777} text.reason{font-size:11px;fill:#222}
rect.band{fill-opacity:.5} .request-row:hover rect.band{fill-opacity:1}"""
HATCH = (f'<svg width="0" height="0" style="position:absolute"><defs><pattern id="tl-hatch" width="6" height="6" '
         f'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#fbe1e1"/>'
         f'<line x1="0" y1="0" x2="0" y2="6" stroke="{COLORS["preempted"]}" stroke-width="2.5"/></pattern></defs></svg>')


def _peak(trace: dict) -> str:  # said in words: on a big cache the strip can't show a few held blocks
    held = [s["blocks"]["owned"] + s["blocks"]["shared"] for s in trace["steps"]]
    return f"; at most {max(held)} of the {trace['num_blocks']} held at once (step {held.index(max(held))})" if held else ""


def render_html(trace: dict) -> str:
    """The whole page for `trace` (checked first), as one HTML string with inline SVG and CSS."""
    check_trace(trace)
    n, model = len(trace["steps"]), html.escape(trace["model"])
    step_w = max(2.0, min(24.0, PLOT_W / max(n, 1)))
    head = (f"{model} · {n} steps · {len(trace['requests'])} requests · {trace['num_blocks']} blocks of "
            f"{trace['block_size']} tokens · budgets {trace['max_num_seqs']} sequences, "
            f"{trace['max_num_batched_tokens']} tokens per step · {sum(s['wall_ms'] for s in trace['steps']):.1f} ms in all")
    return "\n".join([
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">', f"<title>minillm trace: {model}</title>",
        f"<style>{STYLE}</style></head><body>", HATCH, f"<h1>minillm engine trace</h1><p>{head}</p>",
        "<h2>Requests</h2><p>One column per engine step (one forward pass over the whole batch), one row per request. "
        "Hover any mark for details.</p>", _legend(TIMELINE_LEGEND), _timeline_svg(trace, step_w),
        f"<h2>KV cache blocks</h2><p>Every block of the cache in each step, by owner{_peak(trace)}.</p>", _legend(KV_LEGEND),
        _kv_svg(trace, step_w), "<h2>Batch budgets</h2><p>How full each step's batch was, and how long it took.</p>",
        _legend(BUDGET_LEGEND), _budget_svg(trace, step_w), "</body></html>\n"])
