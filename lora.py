"""
lora.py: many LoRA adapters in one batch, each request with its own (or none), as vLLM does.

A LoRA adapter changes a projection y = x W^T into y = x W^T + scaling * (x A^T) B^T, with A (r, K)
and B (OUT, r) of a small rank r. Because the change is a separate sum, one batch can serve many
adapters at once: every token goes through the shared base weights W together, then adds the
delta of its own adapter. That is Punica's idea (Chen et al. 2023), and what this file implements:

  1. requests, loading   LoRARequest (vLLM's); PEFT adapter folders read, checked and kept on the host
  2. slots               LoRAManager: S device-resident slots of A and B per target module, those of
                         projections with the same input (q/k/v; gate/up) stacked together; adapters
                         are copied into a free slot when a scheduled request needs one, the least
                         recently used is evicted when more adapters are wanted than slots
  3. one step's tokens   LoRABatch: each token's slot (-1 = base model only), and tiles of tokens of
                         one slot, so each adapter's weights are read once per tile of its tokens
  4. the compute         add_lora_ref (plain PyTorch: the CPU path and the oracle) and add_lora_stacked
                         (two Triton kernels for a stack of projections: shrink x @ A^T into rank R
                         per projection, then expand @ B into each projection's y)

Contract with minillm.py: `LLM(enable_lora=True)` builds a LoRAManager (one per tensor-parallel rank,
slicing each adapter as `model.shards` slices the weights), which hangs on every
targetable nn.Linear of the model its slots, `proj.lora_a` (S, R, K) and `proj.lora_b` (S, R, OUT),
and its stack, `proj.lora_stack`; each step, `manager.prepare(...)` returns a LoRABatch (or None when
no token uses an adapter) that travels in the step's AttentionMetadata; the model's linear layers call
`add_stacked(ys, x, projs, batch)` for q/k/v and for gate/up, and `add(y, x, proj.lora_a,
proj.lora_b, batch)` for o_proj and down_proj. With LoRA off the model never calls into this file.
The K/V a sequence writes depend on its adapter, so prefix caching must key shared blocks by
lora_int_id as well as the tokens.

Dimension legend:
  N     tokens in the step
  K     input features of a projection (C for q/k/v/gate/up, H*D for o_proj, F for down_proj)
  OUT   output features of a projection;  ΣOUT: those of a stack's projections together
  G     projections in a stack (3 for q/k/v, 2 for gate/up, 1 for o_proj and down_proj)
  r     one adapter's rank;  R: max_lora_rank, every slot's rank (an adapter of rank r < R fills the
        first r rows; the rest stay zero and add nothing)
  S     max_loras: adapter slots on the device
  L     decoder layers

References: LoRA (Hu et al. 2021, arXiv:2106.09685); rsLoRA (Kalajdzievski 2023, arXiv:2312.03732);
Punica (Chen et al. 2023, arXiv:2310.18547); S-LoRA (Sheng et al. 2023, arXiv:2311.03285);
PEFT's adapter format; vLLM's LoRARequest.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# The projections an adapter may target, and the block that holds each (HF Llama names).
TARGET_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# ----------------------------------------------------------------------------------------------
# 1. Requests and adapter loading (host side)


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with; vLLM's meaning. lora_int_id names the adapter inside the
    engine (slots and the host cache are keyed by it): a positive integer, one per adapter."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_int_id must be a positive integer, "
                             f"got {self.lora_int_id!r}")


@dataclass
class LoRAAdapter:
    """One adapter on the host, ready to copy into a slot."""
    request: LoRARequest
    rank: int                  # r
    scaling: float             # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; folded into B below
    weights: dict              # module name -> (A (L, r, K), B (L, r, OUT) = scaling * B^T); zeros in untargeted layers


# PEFT key: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (the second "model." is
# there when the adapter was trained on LlamaForCausalLM, missing when on LlamaModel)
PEFT_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

# PEFT options that change the computation in ways this file does not implement: name -> "off" value
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None}


def _fail(req: LoRARequest, message: str, error=ValueError):
    raise error(f"LoRA adapter {req.lora_name!r} ({req.lora_path}): {message}")


def read_adapter_config(req: LoRARequest) -> dict:
    """adapter_config.json of a PEFT adapter folder, checked; errors name the adapter."""
    if not req.lora_path or not os.path.isdir(req.lora_path):
        _fail(req, "no such folder", FileNotFoundError)
    path = os.path.join(req.lora_path, "adapter_config.json")
    if not os.path.exists(path):
        _fail(req, "not a PEFT adapter folder: it has no adapter_config.json", FileNotFoundError)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(req, f"adapter_config.json is not valid JSON ({e})")
    if not isinstance(cfg, dict):
        _fail(req, "adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        _fail(req, f"peft_type {cfg['peft_type']!r} is not supported, only LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        _fail(req, f"adapter_config.json needs a positive integer r and a number lora_alpha, got r={r!r}, "
                   f"lora_alpha={alpha!r}")
    for name, off in UNSUPPORTED.items():
        if cfg.get(name, off) not in (off, None, False, {}, []):
            _fail(req, f"{name}={cfg[name]!r} is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex (or "all-linear"): checked against the weights instead
        for t in targets:
            if t not in TARGET_MODULES:
                _fail(req, f"targets {t!r}, which the model has no LoRA slot for; "
                           f"supported target modules: {', '.join(TARGET_MODULES)}")
    return cfg


def load_adapter(req: LoRARequest, shapes: dict, num_layers: int, max_lora_rank: int, shards: dict = {}) -> LoRAAdapter:
    """Read a PEFT adapter folder into host memory, checking it against the model.
    shapes: module name -> (K, OUT) of the model's projection. shards: under tensor parallelism, the slice of each
    projection's weight this rank holds (parallel.Shard: dim, start, size, full); its adapter is cut the same way:
    a column-parallel weight's B by its output rows, a row-parallel weight's A by its input columns."""
    from safetensors.torch import load_file
    cfg = read_adapter_config(req)
    r = cfg["r"]
    if r > max_lora_rank:
        _fail(req, f"its rank {r} is above max_lora_rank={max_lora_rank}; create the LLM with a larger max_lora_rank")
    path = os.path.join(req.lora_path, "adapter_model.safetensors")
    if not os.path.exists(path):
        _fail(req, "has no adapter_model.safetensors (pickled adapter_model.bin files are not supported)", FileNotFoundError)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        _fail(req, f"adapter_model.safetensors cannot be read ({e})")
    # -- PEFT keys -> (layer, module) -> {"A": (r, K), "B": (OUT, r)} --
    found: dict = {}
    for key, t in tensors.items():
        m = PEFT_KEY.fullmatch(key)
        if m is None or m.group(3) not in TARGET_MODULES or TARGET_MODULES[m.group(3)] != m.group(2):
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            _fail(req, f"has weights for {module!r}, which the model has no LoRA slot for; "
                       f"supported target modules: {', '.join(TARGET_MODULES)}")
        layer, name, which = int(m.group(1)), m.group(3), m.group(4)
        if layer >= num_layers:
            _fail(req, f"has weights for layer {layer}, but the model has {num_layers} layers")
        K, OUT = full_shape(shapes[name], shards.get(name))
        want = (r, K) if which == "A" else (OUT, r)
        if tuple(t.shape) != want:
            _fail(req, f"{key} has shape {tuple(t.shape)}, expected {want} (r={r}): "
                       f"was the adapter made for a different model?")
        found.setdefault((layer, name), {})[which] = t
    if not found:
        _fail(req, "adapter_model.safetensors holds no LoRA weights")
    for (layer, name), ab in found.items():
        if len(ab) != 2:
            _fail(req, f"layer {layer} {name} has lora_{'A' if 'A' in ab else 'B'} but not lora_{'B' if 'A' in ab else 'A'}")
    # -- stack per module over layers; fold the scaling into B, stored transposed (r, OUT) --
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = {}
    for name in sorted({name for _, name in found}, key=list(TARGET_MODULES).index):
        K, OUT = shapes[name]
        A, B = torch.zeros(num_layers, r, K), torch.zeros(num_layers, r, OUT)  # float32 on the host
        s = shards.get(name)
        mine = lambda t, dim: t if s is None or s.dim != dim else t.narrow(dim, s.start, s.size)  # this rank's part
        for (layer, n), ab in found.items():
            if n == name:
                A[layer] = mine(ab["A"], 1).float()              # (r, K): K cut for a row-parallel weight
                B[layer] = mine(ab["B"], 0).float().T * scaling  # (OUT, r): OUT cut for a column-parallel one
        weights[name] = (A, B)
    return LoRAAdapter(req, r, scaling, weights)


def full_shape(shape: tuple, shard) -> tuple:
    """(K, OUT) of a whole projection, from its shard's (K, OUT) under tensor parallelism."""
    K, OUT = shape
    return shape if shard is None else (K, shard.full) if shard.dim == 0 else (shard.full, OUT)


def per_prompt(lora_request, num_prompts: int, manager: Optional["LoRAManager"]) -> list:
    """generate()'s lora_request (None, one LoRARequest for all, or a list as long as the prompts)
    -> one LoRARequest or None per prompt. Every adapter is loaded and checked here, before any work."""
    if lora_request is None:
        return [None] * num_prompts
    reqs = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * num_prompts
    if len(reqs) != num_prompts:
        raise ValueError(f"the lengths of prompts ({num_prompts}) and lora_request ({len(reqs)}) must be the same")
    for i, r in enumerate(reqs):
        if r is not None and not isinstance(r, LoRARequest):
            raise TypeError(f"lora_request {i}: expected a LoRARequest or None, got {type(r).__name__}")
    used = [r for r in reqs if r is not None]
    if used and manager is None:
        raise ValueError(f"LoRA adapter {used[0].lora_name!r} was requested, but LoRA is off: "
                         f"create the LLM with enable_lora=True")
    for r in used:
        manager.add_adapter(r)
    return reqs


# ----------------------------------------------------------------------------------------------
# 2. Slots on the device
#
# Projections that read the same input are stored together: q/k/v all read the attention block's
# normed x, gate/up the MLP's. One shrink then reads x once for all of them and one expand writes
# all their outputs, so a layer runs 4 shrink/expand pairs, not 7 (vLLM stacks them the same way).
# At decode sizes each launch costs more than its work, so the count of launches is what matters.
# Per layer and stack of G projections, one pair of tensors holds every slot:
#
#     lora_a (S, G*R, K)     slot s: rows j*R .. j*R+r-1 = projection j's A; the rest of its R rows zero
#     lora_b (S, R, ΣOUT)    slot s: projection j's columns = scaling * its B^T; rows r..R-1 zero
#
# Each projection also gets its own slices of the two, proj.lora_a (S, R, K) and proj.lora_b
# (S, R, OUT). All layers of a stack live in one tensor (L, S, G*R, K) / (L, S, R, ΣOUT), so loading
# an adapter is two copies per projection. The tensors never move, which CUDA graphs need: a graph
# replays against these addresses and sees whatever adapters the slots hold at the time.

# the projections of each stack, in the order the model computes them (and the stack's order)
STACKS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(eq=False)
class LoRAStack:
    """One layer's slots for the projections of one input; hung on each of them as proj.lora_stack."""
    projs: tuple           # the nn.Linear modules, in stack order
    lora_a: torch.Tensor   # (S, G*R, K)
    lora_b: torch.Tensor   # (S, R, ΣOUT)


class LoRAManager:
    def __init__(self, model, max_loras: int, max_lora_rank: int):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be at least 1, got {max_loras} and {max_lora_rank}")
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.shards = getattr(model, "shards", {})  # tensor parallelism: the slice of each weight this rank holds
        S, R, L = max_loras, max_lora_rank, len(model.layers)
        weight = model.embed_tokens.weight
        self.device, self.num_layers = weight.device, L
        self.shapes = {}  # module name -> (K, OUT)
        self.views = {}   # module name -> (A (L, S, R, K), B (L, S, R, OUT)): its slices of the stack's tensors
        projs_of = lambda layer, names: tuple(getattr(getattr(layer, TARGET_MODULES[n]), n) for n in names)
        for names in STACKS:
            first = projs_of(model.layers[0], names)
            K, outs = first[0].in_features, [p.out_features for p in first]
            assert all(p.in_features == K for p in first), f"{names} must read inputs of the same width"
            A = torch.zeros(L, S, len(names) * R, K, dtype=weight.dtype, device=weight.device)
            B = torch.zeros(L, S, R, sum(outs), dtype=weight.dtype, device=weight.device)
            col = 0
            for j, (name, OUT) in enumerate(zip(names, outs)):
                self.shapes[name] = (K, OUT)
                self.views[name] = (A[:, :, j * R:(j + 1) * R], B[:, :, :, col:col + OUT])
                col += OUT
            for i, layer in enumerate(model.layers):  # each projection sees its layer's slots
                stack = LoRAStack(projs_of(layer, names), A[i], B[i])
                for proj, name in zip(stack.projs, names):
                    proj.lora_a, proj.lora_b = self.views[name][0][i], self.views[name][1][i]  # (S, R, K), (S, R, OUT)
                    proj.lora_stack = stack
        self.adapters: dict[int, LoRAAdapter] = {}      # lora_int_id -> adapter on the host (never evicted)
        self.slot_ids: list[Optional[int]] = [None] * S  # lora_int_id held by each slot
        self.last_used = [0] * S                        # step count at each slot's last use (LRU)
        self.clock = 0
        self.num_loads = 0                              # adapters copied into slots so far (tests read it)

    def add_adapter(self, req: LoRARequest) -> LoRAAdapter:
        """Load and check an adapter into the host cache (once per lora_int_id)."""
        known = self.adapters.get(req.lora_int_id)
        if known is not None:
            if (known.request.lora_name, known.request.lora_path) != (req.lora_name, req.lora_path):
                _fail(req, f"lora_int_id {req.lora_int_id} already names adapter {known.request.lora_name!r} "
                           f"({known.request.lora_path}); each adapter needs its own lora_int_id")
            return known
        adapter = load_adapter(req, self.shapes, self.num_layers, self.max_lora_rank, self.shards)
        self.adapters[req.lora_int_id] = adapter
        return adapter

    def prepare(self, batch: list) -> Optional["LoRABatch"]:
        """One step's [(LoRARequest or None, new tokens)] per sequence, in batch order -> the step's
        LoRABatch, after copying any missing adapter into a slot; None if no token uses an adapter."""
        wanted = {req.lora_int_id for req, _ in batch if req is not None}
        if not wanted:
            return None
        for req in {req for req, _ in batch if req is not None}:
            self.add_adapter(req)  # known already, but for a tensor-parallel worker's first step with it
        if len(wanted) > self.max_loras:  # the scheduler promises this never happens
            raise RuntimeError(f"{len(wanted)} adapters in one step, but only max_loras={self.max_loras} slots")
        self.clock += 1
        slot_of = {i: self.acquire_slot(i, wanted) for i in sorted(wanted)}
        seq_slots = torch.tensor([slot_of[req.lora_int_id] if req else -1 for req, _ in batch])
        token_slots = seq_slots.repeat_interleave(torch.tensor([n for _, n in batch]))  # (N,)
        if self.device.type == "cuda":
            token_slots = token_slots.pin_memory().to(self.device, non_blocking=True)
        return LoRABatch.build(token_slots, self.max_loras)

    def batch(self, token_slots: torch.Tensor) -> "LoRABatch":
        """The LoRABatch of these (N,) token slots, for a step the runner lays out itself (CUDA graph capture)."""
        return LoRABatch.build(token_slots, self.max_loras)

    def acquire_slot(self, lora_int_id: int, wanted: set) -> int:
        """The slot holding this adapter; copy it into a free slot, or the least recently used one
        that this step does not need, if it is not on the device."""
        if lora_int_id in self.slot_ids:
            slot = self.slot_ids.index(lora_int_id)
        else:
            free = [s for s, i in enumerate(self.slot_ids) if i is None]
            evictable = [s for s, i in enumerate(self.slot_ids) if i not in wanted]
            slot = free[0] if free else min(evictable, key=self.last_used.__getitem__)
            self.load_slot(slot, self.adapters[lora_int_id])
        self.last_used[slot] = self.clock
        return slot

    def load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, (A, B) in self.views.items():
            A[:, slot].zero_()  # (L, R, K): a module this adapter leaves alone adds zero
            B[:, slot].zero_()
            if name in adapter.weights:
                a, b = adapter.weights[name]  # (L, r, K), (L, r, OUT)
                A[:, slot, : adapter.rank].copy_(a)
                B[:, slot, : adapter.rank].copy_(b)
        self.slot_ids[slot] = adapter.request.lora_int_id
        self.num_loads += 1


# ----------------------------------------------------------------------------------------------
# 3. One step's tokens, grouped by slot


def block_m_for(N: int) -> int:
    """Tokens per kernel tile: decode steps have few tokens per adapter, prefill steps many."""
    return 16 if N <= 1024 else 64


class LoRABatch:
    """Which adapter slot each token of a step uses, and the kernels' tiles: runs of up to
    BLOCK_M = block_m_for(N) tokens of one slot, slot after slot (base-only tokens are in no tile).

        tokens by slot   [ slot 0 ..... | slot 1 .. | slot 2 ........ ]
        tiles            | t0  | t1 |     t2 |        t3  | t4 | t5 |    (then unused tiles)

    A kernel program reads its tile's slot and token indices straight from tile_slot and
    tile_tokens: two loads side by side, not a chain of lookups, before its real work starts.

    The tiles are built on first use, by one kernel launch on the GPU (group_tokens). A decode step
    replayed from a CUDA graph only copies token_slots into the graph's input (the graph builds its
    own tiles), and the CPU reference needs no tiles: neither pays for tiles it would throw away.
    """

    def __init__(self, token_slots: torch.Tensor, num_slots: int):
        self.token_slots = token_slots                    # (N,) int64: slot of each token's adapter; -1 = base model only
        self.num_slots = num_slots                        # S
        self.block_m = block_m_for(token_slots.shape[0])  # BLOCK_M the tiles are cut for

    @classmethod
    def build(cls, token_slots: torch.Tensor, num_slots: int) -> "LoRABatch":
        """The LoRABatch of these slots (what the engine calls); its tiles come on first use."""
        return cls(token_slots, num_slots)

    def add(self, ys: list, x, projs) -> list:
        """minillm.project's seam: ys[j] += each token's LoRA delta of projs[j] (all the projections of x)."""
        return add_stacked(ys, x, projs, self)

    @functools.cached_property
    def tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        group = group_tokens if use_kernels(self.token_slots) else group_tokens_ref
        return group(self.token_slots, self.num_slots, self.block_m)

    @property
    def tile_slot(self) -> torch.Tensor:  # (T,) int64: slot of each tile; S for the unused tiles at the end
        return self.tiles[0]

    @property
    def tile_tokens(self) -> torch.Tensor:  # (T, BLOCK_M) int64: each tile's token indices; -1 past the end of its run
        return self.tiles[1]


def num_tiles(N: int, num_slots: int, block_m: int) -> int:
    """T: the most tiles N tokens can need over S slots (each slot's last tile may be part-full). It
    depends on N only, so a CUDA graph can hold the kernels' grids."""
    return triton.cdiv(N, block_m) + num_slots


def group_tokens_ref(token_slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles in plain PyTorch (the oracle of group_tokens): a counting sort, then cut into tiles."""
    N, S, dev = token_slots.shape[0], num_slots, token_slots.device
    groups = torch.arange(-1, S, device=dev)                        # (S+1,): -1 = base only, then the slots
    member = token_slots[:, None] == groups[None, :]                 # (N, S+1) one-hot
    counts = member.sum(0)                                           # (S+1,) tokens per group
    group_end = counts.cumsum(0)                                     # (S+1,) group g ends at group_end[g]
    rank_in_group = (member.cumsum(0) * member).sum(1) - 1           # (N,) stable: earlier tokens first
    dest = (group_end - counts)[token_slots + 1] + rank_in_group     # (N,) where each token goes
    token_order = torch.empty_like(dest).scatter_(0, dest, torch.arange(N, device=dev))  # (N,) tokens, by group
    # -- tiles: slot s has ceil(count / BLOCK_M) of them --
    tiles = (counts[1:] + block_m - 1) // block_m                     # (S,)
    tiles_end = tiles.cumsum(0)                                       # (S,)
    t = torch.arange(num_tiles(N, S, block_m), device=dev)            # (T,)
    tile_slot = torch.searchsorted(tiles_end, t, right=True)          # (T,) S past the last tile
    s = tile_slot.clamp(max=S - 1)
    tile_start = group_end[s] + (t - (tiles_end - tiles)[s]) * block_m  # (T,) slot s's tokens start at group_end[s]
    place = tile_start[:, None] + torch.arange(block_m, device=dev)[None, :]  # (T, BLOCK_M) places in token_order
    valid = (place < group_end[s + 1][:, None]) & (tile_slot < S)[:, None]
    tile_tokens = torch.where(valid, token_order[place.clamp(max=N - 1)], -1)  # (T, BLOCK_M)
    return tile_slot, tile_tokens


@triton.jit
def _group_tokens_kernel(
    token_slots_ptr, tile_slot_ptr, tile_tokens_ptr,
    N, NUM_SLOTS, NUM_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BINS: tl.constexpr,
):
    # Program s < S writes slot s's tiles; program S marks the tiles after the last one in use as
    # unused. Each writes its own entries only: no atomics, the same result every time.
    s = tl.program_id(0)
    # -- tokens per slot, a histogram of slot + 1 (bin 0: base-only tokens). Slot s's tiles come
    #    after those of slots 0..s-1, so every program counts them all --
    counts = tl.zeros([BINS], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slots = tl.load(token_slots_ptr + offs_n, mask=offs_n < N, other=-1)  # past the end: as base-only
        counts += tl.histogram((slots + 1).to(tl.int32), BINS)
    bins = tl.arange(0, BINS)
    tiles = tl.where(bins > 0, (counts + BLOCK_M - 1) // BLOCK_M, 0)  # (BINS,) tiles of slot bin-1
    first = tl.sum(tl.where(bins <= s, tiles, 0))  # tiles of slots 0..s-1: where slot s's tiles start
    offs_m = tl.arange(0, BLOCK_M)
    if s < NUM_SLOTS:
        # -- slot s's tokens, in order: its k-th token goes to tile first + k // BLOCK_M, column
        #    k % BLOCK_M, which is place first * BLOCK_M + k of tile_tokens seen as one flat row --
        count = tl.sum(tl.where(bins == s + 1, counts, 0))
        seen = tl.sum(tl.zeros([BINS], dtype=tl.int32))  # slot s's tokens before this block (an int32 zero)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mine = (tl.load(token_slots_ptr + offs_n, mask=offs_n < N, other=-1) == s).to(tl.int32)
            k = seen + tl.cumsum(mine, axis=0) - 1  # (BLOCK_N,) rank of each of slot s's tokens
            tl.store(tile_tokens_ptr + first * BLOCK_M + k, offs_n.to(tl.int64), mask=mine != 0)
            seen += tl.sum(mine)
        # -- the rest of its last tile holds no token; its tiles are slot s's --
        pad = (BLOCK_M - count % BLOCK_M) % BLOCK_M
        tl.store(tile_tokens_ptr + first * BLOCK_M + count + offs_m, -1, mask=offs_m < pad)
        my_tiles = (count + BLOCK_M - 1) // BLOCK_M
        for t0 in range(0, my_tiles, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            tl.store(tile_slot_ptr + first + offs_t, s.to(tl.int64), mask=offs_t < my_tiles)
    else:
        # -- `first` is now the number of tiles in use; the rest: slot S (unused), no tokens --
        ROWS: tl.constexpr = BLOCK_N // BLOCK_M
        for t0 in range(first, NUM_TILES, ROWS):
            offs_t = t0 + tl.arange(0, ROWS)
            tl.store(tile_slot_ptr + offs_t, NUM_SLOTS, mask=offs_t < NUM_TILES)
            tl.store(tile_tokens_ptr + offs_t[:, None] * BLOCK_M + offs_m[None, :], -1,
                     mask=(offs_t < NUM_TILES)[:, None])


def group_tokens(token_slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """group_tokens_ref in one kernel launch (the PyTorch version is some 35 small kernels)."""
    N, S = token_slots.shape[0], num_slots
    T = num_tiles(N, S, block_m)
    tile_slot = torch.empty(T, dtype=torch.int64, device=token_slots.device)
    tile_tokens = torch.empty(T, block_m, dtype=torch.int64, device=token_slots.device)
    _group_tokens_kernel[(S + 1,)](
        token_slots, tile_slot, tile_tokens, N, S, T,
        BLOCK_M=block_m, BLOCK_N=1024, BINS=triton.next_power_of_2(S + 1),
    )
    return tile_slot, tile_tokens


# ----------------------------------------------------------------------------------------------
# 4. The compute: y (N, OUT) += (x (N, K) @ A[slot]^T) @ B[slot] for every token with a slot


def use_kernels(t: torch.Tensor) -> bool:
    """The Triton kernels on the GPU, the PyTorch reference on the CPU (a test turns the kernels on
    under the Triton interpreter)."""
    return t.is_cuda


def add(y, x, lora_a, lora_b, batch: LoRABatch) -> torch.Tensor:
    """What the model calls for a projection with an input of its own (o_proj, down_proj): y += each
    token's LoRA delta, in place. y (N, OUT), x (N, K), lora_a (S, R, K), lora_b (S, R, OUT)."""
    if use_kernels(x):
        return add_lora_stacked([y], x, lora_a, lora_b, batch)[0]
    return add_lora_ref(y, x, lora_a, lora_b, batch.token_slots)


def add_stacked(ys: list, x, projs, batch: LoRABatch) -> list:
    """What the model calls for projections that read the same x (q/k/v, gate/up): ys[j] += each
    token's LoRA delta of projs[j], in place, with one shrink and one expand for all of them."""
    stack = projs[0].lora_stack
    if tuple(projs) != stack.projs or len(ys) != len(projs):
        raise ValueError("add_stacked: projs must be all the projections of one LoRAStack, in its order, one y each")
    if use_kernels(x):
        return add_lora_stacked(ys, x, stack.lora_a, stack.lora_b, batch)
    for y, proj in zip(ys, projs):
        add_lora_ref(y, x, proj.lora_a, proj.lora_b, batch.token_slots)
    return ys


def add_lora_ref(y, x, lora_a, lora_b, token_slots) -> torch.Tensor:
    """Plain PyTorch, one adapter at a time; in place on y. The CPU path and the kernels' oracle."""
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue  # base model only
        rows = (token_slots == slot).nonzero().squeeze(1)  # (n,) this adapter's tokens
        xa = x[rows] @ lora_a[slot].T                       # (n, K) @ (K, R) -> (n, R)
        y[rows] += (xa @ lora_b[slot]).to(y.dtype)          # (n, R) @ (R, OUT) -> (n, OUT)
    return y


# Two kernels, as in Punica, over a stack of G projections of the same input (G = 1 for o_proj and
# down_proj). Both have the grid (tiles, ...): program (t, .) takes LoRABatch's tile t, up to BLOCK_M
# tokens of one slot, so the tokens of a tile share one adapter and its weights are loaded once for
# all of them. The grid is sized for the most tiles any N tokens can need (num_tiles), so it depends
# on N only and a CUDA graph can hold it; unused tiles return at once.
#
#   shrink: xa[split] (N, G*R) = x (N, K) @ A[s]^T over a 1/SPLIT_K share of K, float32: the G
#           projections' ranks side by side, so x is read once for all of them
#   expand: y_j (N, OUT_j) += (sum over splits of xa[:, j*R : j*R+R]) @ B[s][:, y_j's columns],
#           one program per tile and BLOCK_N columns of one of the outputs: y_0's blocks, then y_1's...
#
# Shrink has little output (G*R columns) and a long K: with few tokens there would be only a handful
# of programs, each walking all of K. Splitting K gives the GPU enough programs; the partial sums
# are added in a fixed order by expand, so results do not depend on timing (no atomics).


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, tile_slot_ptr, tile_tokens_ptr,
    K, R, NUM_SLOTS,  # R: rows of A, G ranks stacked
    stride_xn, stride_as, stride_ar, stride_xas, stride_xan,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    # -- this tile's slot and its up to BLOCK_M tokens (-1: no token) --
    offs_m = tl.arange(0, BLOCK_M)
    slot = tl.load(tile_slot_ptr + tile)
    tokens = tl.load(tile_tokens_ptr + tile * BLOCK_M + offs_m)
    # an unused tile: slot S, no tokens. (The test reads both loads so the compiler issues them
    # together; on the slot alone it would load the tokens after the branch, a round trip later.)
    if (slot >= NUM_SLOTS) | (tl.max(tokens) < 0):
        return
    mask_m = tokens >= 0
    tokens = tl.where(mask_m, tokens, 0)
    offs_r = tl.arange(0, BLOCK_R)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    # -- walk this split's share of K: acc += x tile (BLOCK_M, BLOCK_K) @ A^T tile (BLOCK_K, BLOCK_R) --
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):  # K-tiles split, split + SPLIT_K, ...
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + tokens[:, None] * stride_xn + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None],
                    mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    # -- this split's partial sums, one row per token --
    tl.store(xa_ptr + split * stride_xas + tokens[:, None] * stride_xan + offs_r[None, :], acc,
             mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _lora_expand_kernel(
    xa_ptr, b_ptr, y0_ptr, y1_ptr, y2_ptr, tile_slot_ptr, tile_tokens_ptr,
    OUT0, OUT1, OUT2, R, NUM_SLOTS,  # OUT_j = 0: no such output; R: one projection's rank
    stride_xas, stride_xan, stride_bs, stride_br, stride_y0, stride_y1, stride_y2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    slot = tl.load(tile_slot_ptr + tile)
    tokens = tl.load(tile_tokens_ptr + tile * BLOCK_M + offs_m)
    if (slot >= NUM_SLOTS) | (tl.max(tokens) < 0):  # an unused tile (both loads tested: see shrink)
        return
    mask_m = tokens >= 0
    tokens = tl.where(mask_m, tokens, 0)
    # -- which output this program writes (j), and which of its columns: y0's blocks come first --
    blocks0 = tl.cdiv(OUT0, BLOCK_N)
    blocks1 = tl.cdiv(OUT1, BLOCK_N)
    j = (pid_n >= blocks0).to(tl.int32) + (pid_n >= blocks0 + blocks1).to(tl.int32)
    y_ptr = tl.where(j == 0, y0_ptr, tl.where(j == 1, y1_ptr, y2_ptr))
    stride_yn = tl.where(j == 0, stride_y0, tl.where(j == 1, stride_y1, stride_y2))
    OUT = tl.where(j == 0, OUT0, tl.where(j == 1, OUT1, OUT2))
    block = pid_n - tl.where(j >= 1, blocks0, 0) - tl.where(j >= 2, blocks1, 0)  # BLOCK_N-block of y_j
    b_col = tl.where(j >= 1, OUT0, 0) + tl.where(j >= 2, OUT1, 0)               # y_j's columns start here in B
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < OUT
    # -- the loads: y_j's rows, B's tile and the partial sums xa, all in flight at once (each needs only
    #    the tile's slot and tokens; xa's sum waits for its load, so it comes last) --
    y_ptrs = y_ptr + tokens[:, None] * stride_yn + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)                                  # (BLOCK_M, BLOCK_N)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + b_col + offs_n[None, :],
                mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)       # (BLOCK_R, BLOCK_N)
    offs_s = tl.arange(0, SPLIT_K)
    xa_ptrs = (xa_ptr + j * R + offs_s[:, None, None] * stride_xas + tokens[None, :, None] * stride_xan
               + offs_r[None, None, :])
    mask_mr = mask_m[:, None] & (offs_r[None, :] < R)
    # projection j's R columns of the shrink's SPLIT_K partial sums, added: (SPLIT_K, BLOCK_M, BLOCK_R) -> (BLOCK_M, BLOCK_R)
    xa = tl.sum(tl.load(xa_ptrs, mask=mask_mr[None, :, :], other=0.0), axis=0)
    # -- delta = xa @ B tile, in B's dtype as a half-precision model computes it --
    delta = tl.dot(xa.to(b.dtype), b, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) float32
    # -- y += delta (each token belongs to one slot: no other program writes these rows) --
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the CPU tests exercise the split sum


def _config(N: int, K: int, OUT: int, rows: int, R: int, device) -> dict:
    """Tile sizes from Python ints only (so a CUDA graph can be captured per batch size).
    OUT: the widest output of the stack; rows: G*R, the rows of the stacked A; R: one rank."""
    cuda = device.type == "cuda"
    block_m = block_m_for(N)
    block_k = 128 if cuda else 32
    # tl.dot needs every side >= 16; extra lanes are masked
    shrink_block_r, expand_block_r = max(16, triton.next_power_of_2(rows)), max(16, triton.next_power_of_2(R))
    # The split depends on K and on the tile height (block_m, which N picks: 16 or 64), not on N
    # itself: between two tile heights a token's result does not depend on the batch size (CUDA graphs
    # pad it), and no new variant compiles as N changes. Decode-sized steps (16-token tiles) have few
    # tiles and each program is a chain of memory round trips: 2 K-tiles per split. Prefill-sized
    # steps have tiles enough: 4 splits. A power of two, as expand loads all splits as one block.
    want = K // (2 * block_k) if block_m == 16 else 4
    split_k = 1 << (max(1, min(want, 32)).bit_length() - 1)  # round down to a power of two
    # Every expand program re-reads its tokens' partial sums: wide outputs take wide tiles. 64-token
    # tiles (prefill) run on 8 warps: a 64 x 256 tile on 4 takes ~210 registers a thread (ptxas,
    # sm_90), so only 2 programs (8 warps) fit an SM, too few loads in flight for a memory-bound kernel.
    block_n = (256 if OUT >= 4096 else 128) if cuda else 32
    expand_warps = 8 if block_m * block_n >= 64 * 128 else 4
    shrink_warps = 8 if block_m * shrink_block_r >= 64 * 128 else 4
    return dict(block_k=block_k, shrink_block_r=shrink_block_r, expand_block_r=expand_block_r,
                split_k=split_k, block_n=block_n, shrink_warps=shrink_warps, expand_warps=expand_warps)


def add_lora(y, x, lora_a, lora_b, batch: LoRABatch) -> torch.Tensor:
    """The Triton path of add_lora_ref, for one projection: in place on y (N, OUT); x (N, K);
    lora_a (S, R, K); lora_b (S, R, OUT)."""
    return add_lora_stacked([y], x, lora_a, lora_b, batch)[0]


def add_lora_stacked(ys: list, x, lora_a, lora_b, batch: LoRABatch) -> list:
    """The Triton path for a stack of G <= 3 projections of the same input: in place on each
    ys[j] (N, OUT_j); x (N, K); lora_a (S, G*R, K); lora_b (S, R, ΣOUT), y_j's columns after y_0..y_j-1's."""
    G, (N, K) = len(ys), x.shape
    S, R, width = lora_b.shape
    outs = [y.shape[-1] for y in ys]
    if not (1 <= G <= 3 and lora_a.shape == (S, G * R, K) and width == sum(outs)
            and all(y.dim() == 2 and y.shape[0] == N for y in ys)):
        raise ValueError(f"add_lora: expected 1 to 3 ys (N, OUT_j), x (N, K), lora_a (S, G*R, K), lora_b (S, R, ΣOUT_j), "
                         f"got ys {[tuple(y.shape) for y in ys]}, x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, "
                         f"lora_b {tuple(lora_b.shape)}")
    if not all(t.dtype == x.dtype for t in (*ys, lora_a, lora_b)):
        raise ValueError(f"add_lora: x, ys, lora_a and lora_b must share a dtype, got x {x.dtype}, ys "
                         f"{[y.dtype for y in ys]}, lora_a {lora_a.dtype}, lora_b {lora_b.dtype}")
    if not all(t.stride(-1) == 1 for t in (x, *ys, lora_a, lora_b)):
        raise ValueError("add_lora: x, ys, lora_a and lora_b must be contiguous in their last dimension")
    if batch.token_slots.shape != (N,) or batch.num_slots != S:
        raise ValueError(f"add_lora: the LoRABatch is for {batch.token_slots.shape[0]} tokens and "
                         f"{batch.num_slots} slots, not {N} and {S}")
    if N == 0:
        return ys
    cfg = _config(N, K, max(outs), G * R, R, x.device)
    bm, sk, T = batch.block_m, cfg["split_k"], batch.tile_slot.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32: exact products, as the reference
    xa = torch.empty(sk, N, G * R, dtype=torch.float32, device=x.device)  # rows of base-only tokens stay unwritten, unread
    _lora_shrink_kernel[(T, sk)](
        x, lora_a, xa, batch.tile_slot, batch.tile_tokens,
        K, G * R, S,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), xa.stride(0), xa.stride(1),
        BLOCK_M=bm, BLOCK_K=cfg["block_k"], BLOCK_R=cfg["shrink_block_r"], SPLIT_K=sk, DOT_PRECISION=precision,
        num_warps=cfg["shrink_warps"],
    )
    y0, y1, y2 = (ys + [ys[0]] * 2)[:3]  # a missing output: OUT_j = 0, so no program writes it
    out0, out1, out2 = (outs + [0, 0])[:3]
    blocks = sum(triton.cdiv(out, cfg["block_n"]) for out in outs)
    _lora_expand_kernel[(T, blocks)](
        xa, lora_b, y0, y1, y2, batch.tile_slot, batch.tile_tokens,
        out0, out1, out2, R, S,
        xa.stride(0), xa.stride(1), lora_b.stride(0), lora_b.stride(1), y0.stride(0), y1.stride(0), y2.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg["block_n"], BLOCK_R=cfg["expand_block_r"], SPLIT_K=sk, DOT_PRECISION=precision,
        num_warps=cfg["expand_warps"],
    )
    return ys
