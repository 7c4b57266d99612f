"""Training on several processes with PyTorch's own launcher (torchrun) and DistributedDataParallel.

A process is part of a distributed job when torchrun (or :func:`launch_local`, which calls the same
elastic launcher) set ``WORLD_SIZE`` in its environment. Everything here is a no-op for a plain
one-process run, so the trainer calls it unconditionally:

- :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU) and picks this rank's device;
- :func:`share_splits` makes rank 0 decide the split (and the label fraction) and every rank check
  it holds the same one, by hash;
- :func:`train_sampler` / :func:`shard` give each rank its share of the data (for training, its
  share of the very permutation a one-process run draws; for evaluation, an unpadded shard,
  gathered back);
- :func:`all_sum` and :func:`gather_lists` all-reduce the metrics, so a 2-process run reports the
  same kind of numbers a 1-process run does;
- :func:`check_same` compares a hash across ranks (the split, CoLoRA's merged weights).

``--batch-size`` stays the global batch: each of W processes takes ``batch_size / W`` images per
step and DDP averages the gradients, which is the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, RandomSampler, Sampler, Subset

from gi_deploy.errors import ConfigError, DistributedError

# a rank waiting on a dead peer gives up after this long (the launcher usually ends it sooner)
COLLECTIVE_TIMEOUT_S = 600
# torch's launcher logs a failed rank as a traceback of its own (and a line per process it stops);
# launch_local says the same in one line, so these loggers are shown only at gi-deploy's --verbose
TORCH_LAUNCH_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job: rank, number of processes, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is up (torchrun started this process)

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes the run folder and prints."""
        return self.rank == 0


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); usable before :func:`setup`."""
    return int(os.environ.get("RANK", "0"))


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when torchrun started this process; returns the rank info and the
    device this rank trains on (``cuda:LOCAL_RANK`` on GPUs). Outside torchrun: (Dist(), device)."""
    if not under_torchrun():
        return Dist(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank} has local rank {local} but this node has {torch.cuda.device_count()} "
                "GPU(s); use --nproc-per-node <= the number of GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
    return Dist(rank, world, local, True), device


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def per_rank_batch(global_batch: int, d: Dist) -> int:
    """Images per step on each rank; the global batch must split evenly, or the gradient DDP
    averages would weigh the ranks' images unequally."""
    if global_batch % d.world:
        raise ConfigError(
            f"--batch-size {global_batch} is the global batch and must divide evenly over {d.world} "
            f"processes; use a multiple of {d.world}"
        )
    return global_batch // d.world


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not d.active:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able object (a split's file lists), or of tensors' bytes (a dict of them)."""
    h = hashlib.sha256()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in sorted(obj):
            h.update(k.encode())
            h.update(obj[k].detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True).encode())
    return h.hexdigest()


def check_same(value: str, what: str, d: Dist, error: type[Exception] = DistributedError) -> None:
    """Raise ``error`` on every rank unless all ranks hold the same ``value`` (a hash)."""
    if not d.active:
        return
    values: list = [None] * d.world
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise error(
            f"{what} differs between ranks: rank 0 has {values[0][:12]}, rank(s) {differ} have "
            f"{[values[r][:12] for r in differ]}; every process must see the same data and code"
        )


def share_splits(load: Callable[[], Any], d: Dist) -> tuple[Any, str]:
    """Rank 0 runs ``load()`` (discovery, the seeded split, the label fraction); every rank gets
    that result and checks its hash matches rank 0's. Returns (splits, split hash)."""
    ds = load() if d.main else None
    ds = broadcast(ds, d)
    digest = fingerprint(ds.to_dict()["files"])
    check_same(digest, "the training split (hash of every split's files)", d)
    return ds, digest


class RankShare(Sampler[int]):
    """Rank r's share of the permutation a one-process run draws: each epoch the loader's seeded
    generator draws it exactly as ``DataLoader(shuffle=True, generator=g)`` does (the same
    ``RandomSampler``, the same draws, in the same order), padded from its start to a multiple of
    W like ``DistributedSampler``, and rank r takes positions r, r + W, ... of it. Every rank's
    generator starts from the same seed and draws the same numbers, so the ranks agree on the
    permutation without talking, and a resumed run continues it from the checkpointed generator."""

    def __init__(self, dataset: Dataset, d: Dist, generator: torch.Generator):
        self.order = RandomSampler(dataset, generator=generator)
        self.rank, self.world = d.rank, d.world
        self.num_samples = -(-len(dataset) // d.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        order += order[: self.num_samples * self.world - len(order)]
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(dataset: Dataset, d: Dist, generator: torch.Generator) -> RankShare | None:
    """This rank's share of the training set, epoch by epoch (None outside torchrun, where the
    loader shuffles with ``generator`` itself). With W processes and per-rank batch B/W, the union
    of step k's batches over the ranks is exactly batch k of a one-process run with the same seed
    and batch B, when W divides the training set (else the last images are padded from the first)."""
    if not d.active:
        return None
    return RankShare(dataset, d, generator)


def shard(dataset: Dataset, d: Dist) -> Dataset:
    """Rank r's evaluation share: items r, r + W, ... with no padding (no image counted twice);
    the predictions are gathered back with :func:`gather_lists`."""
    if not d.active:
        return dataset
    return Subset(dataset, range(d.rank, len(dataset), d.world))


def gather_lists(d: Dist, *lists: list) -> tuple[list, ...]:
    """Concatenate each list over the ranks (rank 0's items first), on every rank."""
    if not d.active:
        return lists
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, lists)
    return tuple([x for part in gathered for x in part[i]] for i in range(len(lists)))


def all_sum(d: Dist, *values: float) -> list[float]:
    """Each value summed over the ranks (float64 on the CPU, so gloo and NCCL agree)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model (itself outside torchrun).

    Every trainable tensor of every method takes part in every forward (LoRA's A/B and the head,
    CoLoRA's K_p/K_d/db), so ``find_unused_parameters`` stays off: peft's DDP reports (#899, #951)
    come from layers that skip their adapter in some steps (gradient checkpointing, disabled
    adapters), which this trainer never does. Frozen base weights do not require grad, so DDP
    neither buckets nor all-reduces them."""
    if not d.active:
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    # peft's 1x1-Conv2d LoRA (ConvNeXt atto..nano) yields channels-last-strided grads for its A/B
    # kernels; DDP copies them into its buckets correctly and only warns that the copy costs a little
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def same_draws(d: Dist, device: torch.device, seed: int):
    """Under torchrun, the global torch RNG seeded by ``seed`` inside the block and restored after
    it, so every rank draws the same values (CoLoRA's fresh factors after a merge); nothing outside
    torchrun."""
    if not d.active:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def rank_rng_states(state: dict, d: Dist) -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (None elsewhere): each rank draws its own augmentation,
    so a resumed run must give each rank back its own stream."""
    if not d.active:
        return None
    states: list = [None] * d.world if d.main else None
    dist.gather_object(state, states, dst=0)
    return states


def own_rng_state(checkpoint: dict, d: Dist) -> dict:
    """This rank's RNG state from a checkpoint (rank 0's = ``rng``); refuses another world size."""
    ranks = checkpoint.get("rng_ranks")
    saved_world = len(ranks) if ranks else 1
    if saved_world != d.world:
        raise ConfigError(
            f"the checkpoint was written by a {saved_world}-process run and this is a {d.world}-process "
            f"one; resume with --nproc-per-node {saved_world} (each process resumes its own "
            "augmentation stream)"
        )
    return ranks[d.rank] if ranks else checkpoint["rng"]


# ---------------------------------------------------------------- launching N processes on this machine


def launch_local(entrypoint: Callable, args: tuple, nproc: int) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc`` processes on this machine through torch's elastic
    launcher (what ``torchrun --standalone --nproc-per-node N`` does), with RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT set; returns {rank: return value}. ``entrypoint`` must be a
    module-level function (spawn pickles it). No restarts: a rank that dies stops the others (the
    launcher ends them) and raises DistributedError naming the first failed rank, its exit code and
    its error."""
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(),
    )
    try:
        with _torch_launch_log(shown=log.isEnabledFor(logging.INFO)):
            return elastic_launch(config, _recorded_call)(entrypoint, *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise DistributedError(
            f"rank {rank} of {nproc} died (exit code {failure.exitcode}): "
            f"{_one_line(failure.message)}; the other ranks were stopped and the last complete "
            "epoch is checkpointed: fix the cause and run the same command with --resume"
        ) from None


def _one_line(message: str | dict) -> str:
    """A failed rank's message as one line: the ``"Type: text"`` that ``record`` wrote (its traceback
    stays in torch's log, shown with --verbose), or the launcher's own text (a signal)."""
    if isinstance(message, dict):
        message = message.get("message", json.dumps(message))
    return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


@contextmanager
def _torch_launch_log(shown: bool):
    """Keep torch's launcher loggers quiet inside the block unless ``shown``: they stop propagating
    to torch's handler, into a NullHandler (with no handler at all, Python's last-resort handler
    would print their warnings anyway); restored afterwards."""
    if shown:
        yield
        return
    loggers = [logging.getLogger(name) for name in TORCH_LAUNCH_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    quiet = logging.NullHandler()
    for lg in loggers:
        lg.propagate = False
        lg.addHandler(quiet)
    try:
        yield
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(quiet)
            lg.propagate = propagate


def _recorded_call(fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a launched rank with torch's ``record``, which writes the exception to
    the error file the launcher reads back (a module-level function, so spawn can pickle it)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)(*args)
