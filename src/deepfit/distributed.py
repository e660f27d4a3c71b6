"""Data-parallel training on PyTorch's own engine: the process group from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK; NCCL on CUDA, gloo on the CPU), the DistributedDataParallel
wrapper, rank-0 writes with barriers, and the all-reduces that make N ranks compute what one
process computes (gradients weighted by each rank's share of the global batch, epoch metrics,
sharded evaluation, stop decisions). In a single process every function here is a no-op.
(No `from __future__ import annotations`: DDP checks the comm hook's annotation as a real type.)"""

import atexit
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepfit.data import BatchLoader, ImageSet, StreamLoader
from deepfit.data.loader import share_rows
from deepfit.errors import ConfigError

T = TypeVar("T")
CONTROL_TIMEOUT = timedelta(minutes=30)  # a rank that waits longer at a barrier gives up (torch's default)
_control: Any = None  # a gloo group for stop flags, barriers and small objects: no GPU sync per step


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size, and its GPU index on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world() -> World:
    """The job as torchrun (or SLURM's srun + torchrun) describes it; one process without it."""
    try:
        return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None


def world() -> World:
    """The running process group's view, or a single process when there is none."""
    if not active():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), env_world().local_rank)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return world().main


def start(device: torch.device) -> None:
    """Join the process group torchrun set up the environment for (once per process)."""
    if env_world().size <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    global _control
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    atexit.register(stop)


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under torchrun on CUDA, the given device elsewhere."""
    env = env_world()
    if device.type != "cuda" or env.size <= 1:
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def stop() -> None:
    """Leave the process group (at exit, or when a test is done with it)."""
    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def barrier() -> None:
    """Wait for every rank (around rank 0's saves, so no rank runs ahead of a checkpoint)."""
    if active():
        dist.barrier(group=_control)


def agree(value: T) -> T:
    """Rank 0's `value` on every rank (the run folder name, which holds a timestamp)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def sync_stop(signum: int | None, late: bool) -> tuple[int | None, bool]:
    """(the signal any rank has seen, whether any rank is past the time limit): the same answer
    on every rank, so all of them stop at the same point and rank 0 saves a consistent state.
    Blocking: for epoch boundaries; after each step the ranks vote through StopVotes."""
    if not active():
        return signum, late
    flags = torch.tensor([signum or 0, int(late)], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_control)
    return (int(flags[0]) or None), bool(flags[1])


class StopVotes:
    """The ranks' per-step stop decision without a wait each step. A step's flags (a signal seen,
    past the time limit) go into an all-reduce that runs while the next step trains; its answer is
    read after that step. Every rank reads the same answer after the same step, so all of them
    stop together, one step after the flags were sent. A blocking all-reduce each step (as
    sync_stop is) took 160-185 us between two CPU ranks on one machine, and a network round trip
    between machines. Epoch boundaries agree at once (at_once)."""

    def __init__(self) -> None:
        self.pending: tuple[Any, torch.Tensor] | None = None  # the all-reduce in flight and its buffer

    def after_step(self, signum: int | None, late: bool) -> tuple[int | None, bool]:
        """The answer to the previous step's flags; this step's are sent. One process: its own flags."""
        if not active():
            return signum, late
        agreed, past = self.collect()
        if agreed is not None or past:  # every rank stops here: nothing more is sent
            return agreed, past
        flags = torch.tensor([signum or 0, int(late)], dtype=torch.int64)
        self.pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_control, async_op=True), flags)
        return None, False

    def at_once(self, signum: int | None, late: bool) -> tuple[int | None, bool]:
        """The vote in flight and these flags, agreed now (a blocking all-reduce)."""
        earlier, was_late = self.collect()
        agreed, past = sync_stop(signum, late)
        return agreed or earlier, past or was_late

    def collect(self) -> tuple[int | None, bool]:
        """Wait for the vote in flight, if any: (the signal a rank saw, whether a rank was late)."""
        if self.pending is None:
            return None, False
        work, flags = self.pending
        self.pending = None
        work.wait()
        return (int(flags[0]) or None), bool(flags[1])


def earliest(item: T | None) -> tuple[T, int] | None:
    """The least of the ranks' `item`s and the rank that holds it, the same on every rank; None
    where no rank has one. One all-reduce of a flag; the items are gathered only when one exists."""
    if not active():
        return None if item is None else (item, 0)
    flag = torch.tensor([item is not None], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control)
    if not flag.item():
        return None
    items: list[T | None] = [None] * world().size
    dist.all_gather_object(items, item, group=_control)
    return min((held, rank) for rank, held in enumerate(items) if held is not None)


# -- the model --


def wrap_model(model: nn.Module, device: torch.device, loader: BatchLoader | StreamLoader, *, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel over `model` (SyncBatchNorm first when asked); the model itself
    in a single process. Gradients are averaged weighted by each rank's rows of the global batch,
    so a last batch that does not split evenly still gives the single-process gradient."""
    if not active():
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, device, share=lambda: loader.batch_weight)
    ids = [device.index] if device.type == "cuda" else None
    # a model's per-epoch hook may stop some parameters learning (airbench_whiten's stem bias): DDP
    # must then find them unused rather than wait for their gradients
    hooked = hasattr(model, "on_train_epoch_start")
    if hooked:  # until the hook stops a parameter, DDP notes once that none is unused: expected here
        warnings.filterwarnings("ignore", message="find_unused_parameters=True was specified in DDP constructor, but did not find")
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=hooked)
    ddp.register_comm_hook(loader, weighted_mean_hook)
    return ddp


def weighted_mean_hook(loader: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Sum over ranks of (rows_r / rows) * grad_r. Each grad_r is the mean over the rank's rows, so
    the sum is the mean over the global batch; DDP's default (sum / N) equals it only when
    every rank holds the same number of rows."""
    tensor = bucket.buffer().mul_(loader.batch_weight)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def convert_sync_batchnorm(model: nn.Module, device: torch.device, share: Callable[[], float] = lambda: 1.0) -> nn.Module:
    """torch's SyncBatchNorm on GPUs; on the CPU (where torch's refuses to run) GlooSyncBatchNorm,
    the same statistics over every rank's rows, all-reduced with autograd."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for module in model.modules():
            if isinstance(module, nn.SyncBatchNorm):
                module.__class__ = GlooSyncBatchNorm  # type: ignore[assignment]  # same state, CPU forward
                module.share = share  # type: ignore[assignment]
    return model


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch for CPU ranks: count, sum and sum of squares per channel are
    all-reduced (differentiably, so gradients flow through the shared statistics as in torch's
    CUDA kernel); running statistics use the unbiased variance of the global batch. Not a
    SyncBatchNorm subclass: DDP refuses those on CPU modules."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]  # all but the channel axis of (B, C, ...)
        count = torch.tensor(float(input.numel() // input.shape[1]), dtype=input.dtype)
        stats = torch.cat([count.expand(1), input.sum(dims), (input * input).sum(dims)])  # (1 + 2C,)
        # Gradients through the shared statistics: rank s's loss is a mean over its rows, weighted
        # w_s in the gradient average; rank r must receive sum_s w_s dL_s / w_r.
        stats = SharedSum.apply(stats, self.share() or 1.0)
        total, mean = stats[0], stats[1 : 1 + input.shape[1]] / stats[0]
        var = stats[1 + input.shape[1] :] / total - mean * mean  # biased, as batch norm normalises
        self.track(mean, var, total)
        shape = [1, -1] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    share: Callable[[], float] = staticmethod(lambda: 1.0)  # this rank's rows / global rows of the batch

    @torch.no_grad()
    def track(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
        unbiased = var * total / (total - 1).clamp(min=1)
        self.running_mean.lerp_(mean.detach(), momentum)
        self.running_var.lerp_(unbiased.detach(), momentum)


class SharedSum(torch.autograd.Function):
    """Forward: the sum of `x` over ranks. Backward: sum_s w_s grad_s / w_r, where w is each rank's
    share of the global batch (the weights of the gradient average in weighted_mean_hook)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, share: float) -> torch.Tensor:
        ctx.share = share
        total = x.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad * ctx.share
        dist.all_reduce(total)
        return total / ctx.share, None


def without_ddp(model: nn.Module) -> nn.Module:
    """The module DDP wraps (evaluation runs it per rank, with no collective per forward)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- data and metrics --


def shard_loader(loader: T) -> T:
    """Give the loader this rank's share of every global batch (all of it in a single process)."""
    w = world()
    loader.shard = (w.rank, w.size)  # type: ignore[attr-defined]
    return loader


def shard_split(split: ImageSet) -> ImageSet:
    """This rank's contiguous part of an evaluation split (the whole split in a single process)."""
    if not active():
        return split
    rows = share_rows(len(split), dist.get_rank(), dist.get_world_size())
    return split.subset(torch.arange(rows.start, rows.stop))


def gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order: with shard_split that is the
    split's own order, every row once. CPU tensors in, CPU tensors out."""
    if not active():
        return list(tensors)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [t.cpu() for t in tensors], group=_control)
    gathered = []
    for i, mine in enumerate(tensors):
        pieces = [part[i] for part in parts if part[i].numel()]  # an empty shard's (0, 0) logits are left out
        gathered.append(torch.cat(pieces) if pieces else mine)
    return gathered


def mean_over_ranks(means: dict[str, float], rows: int) -> dict[str, float]:
    """Per-rank means of an epoch (loss, acc over `rows` images) -> means over every rank's images."""
    if not active():
        return means
    keys = sorted(means)
    sums = torch.tensor([means[k] * rows for k in keys] + [float(rows)], dtype=torch.float64)
    dist.all_reduce(sums, group=_control)
    return {k: float(sums[i] / sums[-1].clamp(min=1)) for i, k in enumerate(keys)}


def main_only(write: Callable[[], None]) -> None:
    """Run `write` on rank 0 alone (every rank has the same state); the others go on at once."""
    if is_main():
        write()
