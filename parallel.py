"""
Tensor and data parallelism for minillm, through torch.distributed (NCCL between GPUs, gloo on the CPU).

  tensor parallelism   one engine over tp GPUs: each rank holds a slice of every large weight (tp_plan says which)
                       and runs the same ModelRunner on it; rank 0 is the LLM's process, the others are workers it
                       starts (TPWorkers, tp_worker) and drives through pipes, one StepInput per step
  data parallelism     K engines, each with every K-th prompt (DataParallel): the processes torchrun starts,
                       meeting in its key-value store; `--data-parallel-size K` on the command line

minillm.py knows nothing of ranks. It reaches this file at two seams: load_model's `tp` (a TP: it cuts each
tensor to this rank's slice as it is read, gives the shape of this rank's model, and wraps that model with its
all-reduces and vocab-parallel embedding and head, as gpt-fast's tp.py does), and the engine's runner, which
for tensor_parallel_size > 1 is a TPModelRunner: the same ModelRunner, driving its workers' runners.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import formats
import minillm

# ----------------------------------------------------------------------------------------------
# 1. Which slice of every weight each rank holds


@dataclass(frozen=True)
class TP:
    """Tensor parallelism: this process holds shard `rank` of `size` of every large weight (tp_plan says which
    slices) and computes its part of every layer; size 1 is the whole model in one process."""
    rank: int = 0
    size: int = 1

    def part(self, cfg):
        """The shape of this rank's part of a model of config cfg (a minillm.ModelConfig)."""
        return tp_plan(cfg, self)[0]

    def cut(self, cfg):
        """cut(name, tensor) -> this rank's part of checkpoint tensor `name` (the loaders' seam, see take_shard).
        A tensor is cut by its module's Shard: layers.0.self_attn.q_proj.weight and .bias alike by q_proj's."""
        shards = tp_plan(cfg, self)[1]  # (a size that does not split fails here, before any tensor is read)

        def cut(name: str, t):
            module, kind = name.split(".")[-2:]
            shard = shards.get(module)
            if kind == "bias" and shard is not None and shard.dim == 1:
                # each rank's partial sum would carry the bias, and the all-reduce add it tp times
                raise ValueError(f"{name}: a bias on a row-parallel projection is not supported under tensor "
                                 f"parallelism")
            return take_shard(t, shard)
        return cut

    def wrap(self, model, cfg) -> None:
        """Make this rank's part (a minillm.Llama of part(cfg)'s shape, its weights loaded) compute its share of
        the whole model: the row-parallel outputs of attention and MLP are summed over the ranks by a forward
        hook, and the embedding and the LM head become vocab-parallel. model.shards tells lora.py the slices."""
        model.shards = tp_plan(cfg, self)[1]
        for layer in model.layers:
            layer.self_attn.register_forward_hook(all_reduce_output)
            layer.mlp.register_forward_hook(all_reduce_output)
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, model.shards["embed_tokens"].start)
        model.lm_head = VocabParallelHead(model.lm_head.weight, cfg.vocab_size, self)


# Tensor parallelism, Megatron-LM style (Shoeybi et al. 2019, arXiv:1909.08053): with tp ranks, each rank holds a
# slice of every large weight and computes that part of every layer; one all-reduce (a sum over the ranks)
# after attention and one after the MLP put the pieces together.
#
#   q/k/v, gate/up    column-parallel: each rank holds H/tp query heads (KVH/tp K/V heads) and F/tp MLP columns;
#                     attention and SwiGLU need nothing from other ranks, as heads and columns are independent
#   o_proj, down_proj row-parallel: each rank multiplies its heads' / columns' part of the input by the matching
#                     input columns; the ranks' (N, C) results are partial sums: all-reduce
#   embed_tokens      vocab-parallel: each rank looks up the ids in its V/tp rows, zeros elsewhere: all-reduce
#   lm_head           vocab-parallel: each rank scores its V/tp tokens; rank 0 gathers the (rows, V) logits, samples
#
# With fewer KV heads than ranks, each KV head is copied to the tp/KVH ranks whose query heads read it. A rank's
# model is a Llama of the shard's shape (tp_plan's config: minillm.ModelConfig), so Attention and MLP only
# add the all-reduce.
#
# The families' extras follow their projection. Qwen2's q/k/v biases are column-parallel like their weights: a rank
# holds the bias entries of its own output rows (its heads), cut by the same Shard. Qwen3's q_norm and k_norm weigh
# the D dimensions of any one head, so every rank holds them whole, as it does the layers' RMSNorms.


class Shard(NamedTuple):
    """The slice of a checkpoint tensor one rank holds: [start, start + size) along dim (0: output rows, 1: input
    columns) of the `full` the checkpoint has."""
    dim: int
    start: int
    size: int
    full: int


def tp_plan(cfg, tp: TP) -> tuple:
    """What rank tp.rank of tp.size holds: the config of its part of each layer, and the Shard of each sharded
    module by name, for its weight and its bias (the norms, q_norm and k_norm too, are whole on every rank).
    ValueError naming a size that does not split."""
    if tp.size == 1:
        return cfg, {}
    n, r, H, KVH, D, Fi, V = tp.size, tp.rank, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    for name, value in (("num_heads", H), ("intermediate_size", Fi)):
        if value % n:
            raise ValueError(f"tensor_parallel_size={n} must divide the model's {name} ({value})")
    if KVH % n and n % KVH:
        raise ValueError(f"the model's num_kv_heads ({KVH}) and tensor_parallel_size={n} must divide one another")
    h, kvh, f, v = H // n, max(1, KVH // n), Fi // n, -(-V // n)  # per rank; the last vocab shard is padded
    kv = Shard(0, r * KVH // n * D, kvh * D, KVH * D)  # the K/V heads of this rank's query heads
    q, mlp, vocab = Shard(0, r * h * D, h * D, H * D), Shard(0, r * f, f, Fi), Shard(0, r * v, v, V)
    shards = dict(q_proj=q, k_proj=kv, v_proj=kv, o_proj=q._replace(dim=1), gate_proj=mlp, up_proj=mlp,
                  down_proj=mlp._replace(dim=1), embed_tokens=vocab, lm_head=vocab)
    return replace(cfg, num_heads=h, num_kv_heads=kvh, intermediate_size=f, vocab_size=v), shards


def take_shard(t, shard: Optional[Shard]) -> torch.Tensor:
    """This rank's part of checkpoint tensor t (a tensor, or a safetensors slice, which reads only that part): a
    weight's (OUT, K) or a bias's (OUT,); a vocab shard past the end of the vocabulary is padded with zero rows
    (their logits are cut off)."""
    if shard is None:
        return t[:]
    cut = slice(shard.start, shard.start + shard.size)
    if shard.dim == 1:
        return t[:, cut]
    part = t[cut]
    # zeros after dim 0's last entry; F.pad lists the last dim's (before, after) first, so a (0, 0) per dim after 0
    return F.pad(part, (0, 0) * (part.dim() - 1) + (0, shard.size - part.shape[0]))


def all_reduce_output(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: the (N, C) output of a row-parallel block (this rank's heads' or columns' partial sums),
    summed over the ranks in place."""
    dist.all_reduce(output)
    return output


class VocabParallelEmbedding(torch.nn.Module):
    """embed_tokens with V/tp rows a rank: each looks up the ids in its rows, zeros elsewhere, and the all-reduce
    gives every token its row from the one rank that holds it."""

    def __init__(self, weight: torch.nn.Parameter, start: int):
        super().__init__()
        self.weight, self.start = weight, start

    def forward(self, input_ids):  # (N,) -> (N, C)
        local = input_ids - self.start  # (N,) row in this rank's vocab shard
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        dist.all_reduce(x)
        return x


class VocabParallelHead(torch.nn.Module):
    """lm_head with V/tp rows a rank: each scores its vocab shard, (rows, V/tp), and rank 0 gathers the whole
    (rows, V) (the padding rows' scores cut off), as rank 0 samples; another rank gets its own shard's back."""

    def __init__(self, weight: torch.nn.Parameter, vocab_size: int, tp: TP):
        super().__init__()
        self.weight, self.vocab_size, self.tp = weight, vocab_size, tp

    def forward(self, h):  # (rows, C) -> (rows, V) on rank 0
        logits = F.linear(h, self.weight)  # (rows, C) @ (C, V/tp) -> (rows, V/tp)
        parts = [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return logits if parts is None else torch.cat(parts, dim=-1)[:, :self.vocab_size]


def check_tensor_parallel(size, device: torch.device) -> TP:
    """Rank 0 of a tensor_parallel_size group, checked before anything loads: enough GPUs from `device` on."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer of at least 1, got {size!r}")
    first, count = device.index or 0, torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and first + size > count:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs from cuda:{first} on, but this machine has {count}")
    return TP(0, size)


# ----------------------------------------------------------------------------------------------
# 2. The tensor-parallel worker processes

# Tensor parallelism's processes. Rank 0 is the LLM's own process; ranks 1..N-1 are workers started here, one per
# GPU (spawned: CUDA cannot be forked). Each worker loads its own shard and builds its own ModelRunner, then runs
# the runner calls rank 0 sends through a pipe (the StepInput once per step), in the same order as rank 0: the
# collectives inside (all-reduces, the logits gather, the tokens broadcast) meet in the same order on every rank.
#
# Everything on the pipes is JSON, never a pickle (loading a pickle can run any code; JSON is plain values): rank 0
# sends a worker its start-up arguments first (worker_start), then one [method, args] per runner call, a StepInput
# among the args as step_to_json's object, and null to stop; the worker answers ["loaded"] or ["error", why].

# The longest a collective or a store lookup waits for another rank. Ranks reach a step's collectives within
# milliseconds of each other; start-up (loading, compiling) is watched apart, through the pipes.
DIST_TIMEOUT = timedelta(minutes=5)


class TPWorkers:
    """Rank 0's handle on the tensor-parallel workers: their processes, a pipe to each, and the process group."""

    def __init__(self, size: int, device: torch.device, load_args: dict, runner_args: dict, lora_args):
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed process group (another LLM with "
                               "tensor_parallel_size > 1?); close() it first: a process holds one at a time")
        self.procs, self.pipes, self.broken, self.has_group = [], [], None, False
        device = torch.device("cuda", device.index or 0) if device.type == "cuda" else device  # rank r: GPU index + r
        # (made before any process starts: what cannot be JSON fails here)
        start = json.dumps(worker_start(device, load_args, runner_args, lora_args)).encode()
        atexit.register(self.close)  # interpreter exit stops the workers too
        try:
            # a free port, picked by the OS: where the ranks meet to set up the process group
            self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=DIST_TIMEOUT)
            context = torch.multiprocessing.get_context("spawn")
            for rank in range(1, size):
                pipe, theirs = context.Pipe()
                self.procs.append(context.Process(target=tp_worker, name=f"minillm-tp{rank}", daemon=True,
                                                  args=(rank, size, self.store.port, theirs)))
                with main_script_hidden():
                    self.procs[-1].start()
                theirs.close()
                self.pipes.append(pipe)
                with contextlib.suppress(OSError):  # (a worker that died at once: the wait below says how)
                    pipe.send_bytes(start)
            for rank in range(1, size):  # wait until each worker's shard is loaded, or it said why not
                while (message := self.message(rank, 0.1)) is None:
                    pass
                if message[0] == "error":
                    raise self.failure(rank, message)
            init_tp_group(0, size, self.store, device)
            self.has_group = True
        except BaseException:
            self.close()
            raise

    def message(self, rank: int, wait: float) -> Optional[tuple]:
        """Worker `rank`'s next message within `wait` seconds, else None; ("error", why) once it has stopped."""
        pipe, proc = self.pipes[rank - 1], self.procs[rank - 1]
        if not pipe.poll(wait):  # (the pipe of a worker that has died is readable at once: end of file)
            return None
        try:
            return tuple(json.loads(pipe.recv_bytes()))
        except (EOFError, OSError):
            proc.join(timeout=1)
            return "error", "it has exited" + (f" with code {proc.exitcode}" if proc.exitcode is not None else "")

    def failure(self, rank: int, message: tuple) -> RuntimeError:
        return RuntimeError(f"tensor-parallel worker {rank} (pid {self.procs[rank - 1].pid}) failed: {message[1]}")

    def run(self, name: str, args: tuple, local):
        """runner.<name>(*args) on every worker, then local() (the same call on rank 0). A Ctrl-C waits until
        the call is done, as the ranks must finish its collectives together; any other exception leaves them out
        of step, so the workers are stopped and this LLM can do no more work."""
        if self.broken:
            raise RuntimeError(f"this LLM's tensor-parallel workers were stopped ({self.broken}); create a new LLM")
        payload = json.dumps([name, [None if a is None else step_to_json(a) for a in args]]).encode()
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send_bytes(payload)
            except OSError:
                self.stop(self.failure(rank, self.message(rank, 1) or ("error", "its pipe is closed")))
        with sigint_deferred():
            try:
                return local()
            except Exception as e:  # a worker's error (it says so within a second), or rank 0's own
                said = [(rank, m) for rank in range(1, len(self.pipes) + 1) if (m := self.message(rank, 1))]
                self.stop(self.failure(*said[0]) if said else e)

    def stop(self, error: BaseException):
        self.broken = f"{type(error).__name__}: {error}"
        self.close()
        raise error

    def close(self) -> None:
        """Stop the workers: each is asked to leave its loop, and made to after a few seconds. Idempotent."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send_bytes(b"null")
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in self.pipes:
            pipe.close()
        self.procs, self.pipes = [], []
        if self.has_group:  # (only ours: a closed LLM's close must not end a newer LLM's group)
            dist.destroy_process_group()
            self.has_group = False
        atexit.unregister(self.close)


class ShardRunner(minillm.ModelRunner):
    """A minillm.ModelRunner for one rank's shard. One block table serves every rank, so the KV cache has the
    fewest blocks any rank has room for."""

    def count_kv_blocks(self, *args) -> int:
        fewest = torch.tensor([super().count_kv_blocks(*args)], device=self.device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        return int(fewest)


def for_workers(step):
    """What a worker needs of a minillm.StepInput: all but the sampler's inputs."""
    return replace(step, params=[], generators=[], blocked=[], penalty_ids=[], logprob_rows=[], prompt_targets=[])


def step_to_json(step) -> dict:
    """A minillm.StepInput as plain JSON values, for the pipes: every field as it is, but each LoRARequest as a
    dict of its fields. params and generators hold objects; they are the sampler's, rank 0's alone (for_workers)."""
    if step.params or step.generators:
        raise ValueError("a StepInput's params and generators stay on rank 0: send for_workers(step)")
    obj = {f.name: getattr(step, f.name) for f in fields(step)}
    obj["lora"] = [(None if req is None else lora_request_to_json(req), n) for req, n in step.lora]
    return obj


def step_from_json(obj: dict):
    """step_to_json's StepInput again, equal to the one sent: JSON's lists become the tuples they were, and
    LoRARequests are rebuilt (a worker's LoRAManager loads the adapter from lora_path when it first sees it)."""
    step = minillm.StepInput(**obj)
    step.lora = [(None if req is None else lora_request_from_json(req), n) for req, n in step.lora]
    step.pending, step.penalty_ids = [tuple(p) for p in step.pending], [tuple(p) for p in step.penalty_ids]
    return step


def lora_request_to_json(req) -> dict:
    import lora  # (as tp_worker does: LoRA's module is loaded when LoRA is used)
    return {f.name: getattr(req, f.name) for f in fields(lora.LoRARequest)}


def lora_request_from_json(obj: dict):
    import lora
    return lora.LoRARequest(**obj)


def worker_start(device: torch.device, load_args: dict, runner_args: dict, lora_args) -> dict:
    """A worker's start-up arguments as plain JSON values (its first message): torch's device and dtype become
    their names, and a function hf_overrides the dict of what it changes (overrides_as_dict). runner_args
    (numbers, bools, None) and lora_args (max_loras, max_lora_rank) are plain already."""
    dtype = str(load_args["dtype"]).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", a name load_model takes
    hf_overrides = overrides_as_dict(load_args["path"], load_args.get("hf_overrides"))
    return dict(device=str(device), load_args=dict(load_args, dtype=dtype, hf_overrides=hf_overrides),
                runner_args=runner_args, lora_args=lora_args)


def overrides_as_dict(path: str, hf_overrides):
    """vLLM's hf_overrides may be a function of the config: code, which JSON cannot carry. So rank 0 runs it on
    the config a worker's load reads (formats calls it just as that load would), and the worker gets the dict of
    the keys it changed or added, which has the same effect. A dict (or None) is sent as it is."""
    if not callable(hf_overrides):
        return hf_overrides
    changed = {}

    def recording(config):
        before = copy.deepcopy(vars(config))  # (the function may change the config in place)
        after = vars(hf_overrides(config))
        if before.keys() - after.keys():
            raise ValueError(f"hf_overrides removes {sorted(before.keys() - after.keys())} from the config; under "
                             f"tensor parallelism the workers get only what it changes or adds")
        changed.update({key: value for key, value in after.items() if key not in before or before[key] != value})
        return argparse.Namespace(**after)
    (formats.read_gguf if path.endswith(".gguf") else formats.read_hf_config)(path, recording)
    return changed


class TPModelRunner(ShardRunner):
    """Rank 0's runner under tensor parallelism: minillm.ModelRunner's methods, each sent to the workers first
    (forward, sample), the sampled tokens broadcast to them; close() stops them."""

    def __init__(self, model, tp: TP, load_args: dict, lora_args, lora_manager=None, **runner_args):
        # each worker makes its own LoRA slots from lora_args; rank 0's are lora_manager
        self.workers = TPWorkers(tp.size, model.embed_tokens.weight.device, load_args, runner_args, lora_args)
        try:
            super().__init__(model, lora_manager=lora_manager, **runner_args)
        except BaseException:
            self.workers.close()
            raise

    def forward(self, step):
        return self.workers.run("forward", (for_workers(step),), lambda: super(TPModelRunner, self).forward(step))

    def sample(self, out, step, logits_hook=None):
        def local():
            sampled = super(TPModelRunner, self).sample(out, step, logits_hook)
            if step.sample_rows:  # every rank feeds the tokens to the next step (PENDING)
                dist.broadcast(self.last_sampled, src=0)
            return sampled
        return self.workers.run("sample", (None, for_workers(step)), local)

    def close(self) -> None:
        self.workers.close()
        self.workers.broken = "the LLM was closed"


class WorkerRunner(ShardRunner):
    """A worker's runner: minillm.ModelRunner, but its sample takes rank 0's tokens instead of sampling."""

    def sample(self, out, step, logits_hook=None):
        if step.sample_rows:
            self.last_sampled = torch.empty(len(step.sample_rows), dtype=torch.long, device=self.device)
            dist.broadcast(self.last_sampled, src=0)


def init_tp_group(rank: int, size: int, store, device: torch.device) -> None:
    """The tensor-parallel ranks' default process group: NCCL between GPUs, gloo on the CPU."""
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size, timeout=DIST_TIMEOUT,
                            device_id=device if cuda else None)


@contextlib.contextmanager
def main_script_hidden():
    """A spawned process first runs the parent's main script again (without its `if __name__ == "__main__":`
    part). A worker needs only minillm, and a script may make its LLM at the top, unguarded (the seed page's
    large-scale example does): hide the script from multiprocessing while a worker starts."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


@contextlib.contextmanager
def sigint_deferred():
    """Hold a Ctrl-C back until the block is done, then raise it (only the main thread gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if caught:
            raise KeyboardInterrupt


def tp_worker(rank: int, size: int, port: int, pipe):
    """Tensor-parallel rank `rank` > 0, in a process of its own: read the start-up arguments (worker_start's JSON)
    from the pipe, load this rank's shard, build its ModelRunner, then run each call rank 0 sends until it sends
    null (LLM.close) or goes away. Spawn pickles this function's name and its arguments, plain numbers and the
    pipe's end (which multiprocessing hands over as a file descriptor); all else comes as JSON, on the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's: it lets the step end, then stops us
    try:
        import lora
        start = json.loads(pipe.recv_bytes())
        device = torch.device(start["device"])
        if device.type == "cuda":
            device = torch.device("cuda", device.index + rank)
            torch.cuda.set_device(device)
        else:  # the ranks share the CPU's cores
            torch.set_num_threads(max(1, torch.get_num_threads() // size))
        llama = minillm.load_model(device=device, tp=TP(rank, size), **start["load_args"])[0]
        pipe.send_bytes(json.dumps(["loaded"]).encode())
        init_tp_group(rank, size, dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=DIST_TIMEOUT), device)
        manager = lora.LoRAManager(llama, *start["lora_args"]) if start["lora_args"] else None
        runner = WorkerRunner(llama, lora_manager=manager, **start["runner_args"])
        while (call := json.loads(pipe.recv_bytes())) is not None:
            method, args = call  # ["forward", [step]] or ["sample", [null, step]]
            getattr(runner, method)(*[None if a is None else step_from_json(a) for a in args])
    except EOFError:  # rank 0 has gone: so do we
        pass
    except BaseException as e:
        import traceback
        traceback.print_exc()
        with contextlib.suppress(OSError):
            pipe.send_bytes(json.dumps(["error", f"{type(e).__name__}: {e}"]).encode())
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# 3. Data parallelism


class DataParallel:
    """Data parallelism: `size` engines (ranks), each generating every size-th prompt, their outputs gathered on rank
    0 in input order. The ranks are processes torchrun starts (on one host or many); they meet in its key-value
    store (a TCPStore), not a process group, as each engine's default process group is its tensor-parallel ranks'.

        dp = DataParallel.from_env()   # under torchrun: RANK of WORLD_SIZE; else rank 0 of 1
        llm = LLM(model, device=f"cuda:{dp.local_rank}")
        texts = dp.gather([o.outputs[0].text for o in llm.generate(dp.shard(prompts), params,
                                                                  use_tqdm=dp.progress(len(prompts)))])
    """

    def __init__(self, rank: int, size: int, store, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.store, self.bar = dist.PrefixStore("minillm/", store), None

    @classmethod
    def from_env(cls) -> "DataParallel":
        """This process's rank under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, its store at MASTER_ADDR:MASTER_PORT)."""
        if "WORLD_SIZE" not in os.environ:
            return cls(0, 1, dist.HashStore())
        store, rank, size = next(dist.rendezvous("env://", timeout=DIST_TIMEOUT))
        return cls(rank, size, store, int(os.environ.get("LOCAL_RANK", rank)))

    def shard(self, prompts: list) -> list:
        return prompts[self.rank::self.size]

    def progress(self, total: int):
        """generate's use_tqdm: every rank counts its finished prompts in the store, rank 0 draws one bar for all."""
        if self.size == 1:
            return True  # alone: generate's own bar
        if self.rank == 0:
            self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        return lambda **_: SharedProgress(self)

    def gather(self, outputs: list) -> Optional[list]:
        """Every rank's outputs to rank 0, in the order of the prompts shard() split: rank 0 gets them all, the
        others None. (A rank that fails makes torchrun stop them all: rank 0 does not wait for it.) The outputs must be
        JSON values (the command line sends its output lines): nothing crosses a process boundary as a pickle, which
        would run whatever code a forged message names."""
        if self.size == 1:
            return outputs
        self.store.set(f"outputs/{self.rank}", json.dumps(outputs))
        if self.rank:
            return None
        parts = []
        for rank in range(self.size):
            while not self.store.check([f"outputs/{rank}"]):
                self.draw()
                time.sleep(0.05)
            parts.append(json.loads(self.store.get(f"outputs/{rank}")))
        merged = [None] * sum(map(len, parts))
        for rank, part in enumerate(parts):
            merged[rank::self.size] = part
        self.close_progress()
        return merged

    def barrier(self, name: str) -> None:
        """Wait until every rank has called barrier(name): a count in the store (rank 0 draws the bar meanwhile).
        (As in gather, a rank that fails makes torchrun stop them all: nobody waits for it forever.)"""
        if self.size == 1:
            return
        self.store.add(f"barrier/{name}", 1)
        while int(self.store.add(f"barrier/{name}", 0)) < self.size:
            self.draw()
            time.sleep(0.05)

    def draw(self) -> None:
        if self.bar is not None:
            self.bar.update(int(self.store.add("done", 0)) - self.bar.n)

    def close_progress(self) -> None:
        """Rank 0's bar, drawn with every rank's last count, then closed (once every rank is done)."""
        if self.bar is not None:
            self.draw()
            self.bar.close()
            self.bar = None


class SharedProgress:
    """What generate's loop calls on its progress bar, for one data-parallel rank: finished prompts are counted in
    the store for rank 0's bar, which gather (or close_progress) closes. (Rank 0's token rates are not all ranks':
    the bar's prompts/s is.)"""

    def __init__(self, dp: DataParallel):
        self.dp = dp

    def update(self, n: int) -> None:
        self.dp.store.add("done", n)
        self.dp.draw()

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def check_data_parallel(args, device: torch.device) -> None:
    """--data-parallel-size K: K engines of --tensor-parallel-size GPUs each on this host (torchrun: its processes)."""
    K, world = args.data_parallel_size, int(os.environ.get("WORLD_SIZE", args.data_parallel_size))
    if K < 1 or K not in (1, world):
        raise ValueError(f"--data-parallel-size must be at least 1, and under torchrun 1 or the number of "
                         f"processes ({world}), got {K}")
    if K > 1 and args.prompts == "-":
        raise ValueError("--data-parallel-size: every rank reads the prompts: give a file, not stdin")
    first, count = device.index or 0, torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and "WORLD_SIZE" not in os.environ and first + K * args.tensor_parallel_size > count:
        raise ValueError(f"--data-parallel-size {K} x --tensor-parallel-size {args.tensor_parallel_size} needs "
                         f"{K * args.tensor_parallel_size} GPUs from cuda:{first} on, but this machine has {count}")


# ----------------------------------------------------------------------------------------------
# 4. Threads on the CPU (the engine sets torch's count from this when it runs on the CPU)


def choose_cpu_threads(idle_cpus: Optional[float] = None, probe_s: float = 0.05) -> int:
    """The number of threads torch should use on the CPU, for torch.set_num_threads.

    A choice made by hand wins: MINILLM_NUM_THREADS, else OMP_NUM_THREADS (torch has read it: its current
    count). Otherwise torch's current count (its default, the physical cores, or what torch.set_num_threads
    made it) is lowered to the cores that are free now. Torch's threads wait for each other at every op, so
    one of them on a core another process keeps busy stalls them all: beside one busy process, 2 threads on
    2 cores ran 10x slower than 1. A core is free when it is at least 75% idle; `idle_cpus` is measured from
    Linux's /proc/stat over `probe_s` seconds when not given (elsewhere: the CPUs less the load average)."""
    if os.environ.get("MINILLM_NUM_THREADS"):
        value = os.environ["MINILLM_NUM_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MINILLM_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)

    def ticks() -> tuple[int, int]:  # clock ticks so far, summed over our CPUs: (idle + iowait, all)
        idle = total = 0
        for line in open("/proc/stat"):
            name, *t = line.split()  # cpuN user nice system idle iowait irq softirq steal ...
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                idle, total = idle + int(t[3]) + int(t[4]), total + sum(map(int, t[:8]))
        return idle, total
    if idle_cpus is None and os.path.exists("/proc/stat"):
        idle0, total0 = ticks()
        time.sleep(probe_s)
        idle1, total1 = ticks()
        idle_cpus = len(cpus) * (idle1 - idle0) / max(total1 - total0, 1)
    elif idle_cpus is None:
        idle_cpus = len(cpus) - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(idle_cpus + 0.25)))
