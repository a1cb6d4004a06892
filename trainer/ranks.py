"""Data-parallel trainer ranks: one process per GPU, started by `torchrun` (trainer/launch.py), the frozen base
sharded by FSDP2, each rank running its own micro-steps.

Everything that talks to the vLLM server stays on one rank, as in TRL's server mode: rank 0 samples, registers
adapters and writes the run's files; the other ranks wait for the outcome of each such call (`Ranks.on_main`),
which is broadcast whether it is a result or an error, so a server that fails on rank 0 ends every rank with the
same error instead of leaving them in a collective until the process-group timeout.

The LoRA parameters and their optimizer state are replicated, not sharded: a few MiB that every rank holds whole, so
publishing an adapter or saving a checkpoint needs no gather and the checkpoint holds the single process's files.
Their gradients are averaged across ranks by DDP (grpo.py wraps the model in it) over those parameters only;
FSDP2 owns the rest.
"""

from __future__ import annotations

import logging
import os
import pickle
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


class Ranks:
    """This process's place among the trainer's processes; one process is a world of one and every call is local."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, host_group=None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        # Results, flags and barriers go through a gloo group on the CPU: a rank waiting there for rank 0 (while it
        # samples from the server, for minutes) waits in a thread, where an NCCL collective would keep a kernel
        # spinning on its GPU, taking turns with the vLLM server's kernels on that GPU.
        self.host_group = host_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def on_main(self, call: Callable[[], T]) -> T:
        """`call()` on rank 0; every rank returns its result, or raises the error it raised."""
        if not self.distributed:
            return call()
        outcome: list = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", call())
            except BaseException as exc:  # StopRequested and SystemExit too: no rank may stay behind
                outcome[0] = ("error", portable(exc))
        dist.broadcast_object_list(outcome, src=0, group=self.host_group)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag else 0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.host_group)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.host_group)


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (the broadcast pickles it), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def start_ranks(timeout_seconds: float) -> Ranks:
    """Join the other processes torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or return
    a world of one when started alone.

    `timeout_seconds` bounds every collective: it must cover the longest time rank 0 may spend on the server while
    the others wait (a restart waited out, then the request's retries)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_seconds)
    if not dist.is_initialized():  # accelerate joins this group rather than starting its own
        dist.init_process_group(backend, timeout=timeout)
    host_group = dist.new_group(backend="gloo", timeout=timeout)  # also on the CPU: the same path as on GPUs
    return Ranks(rank, world_size, local_rank, host_group)


def collective_timeout_seconds(wait_timeout: float, request_timeout: float, max_retries: int,
                               retry_max_wait: float) -> float:
    """The longest rank 0 may spend on one server call while the other ranks wait in a collective: the client's
    retries, the wait for /health (VLLM_WAIT_TIMEOUT), and the retries once more (ServerRecovery), with an
    allowance for saving a checkpoint."""
    one_try = max_retries * (request_timeout + retry_max_wait)
    return wait_timeout + 2 * one_try + 600.0


def shard_frozen_base(model, device: torch.device) -> None:
    """FSDP2 over the frozen base (a model whose experts are kept in MXFP4 is kept whole instead:
    keep_frozen_base_whole): each decoder layer one unit (its weights gathered for its forward and backward
    only), the rest of the model the root unit; the trainable LoRA parameters are left out, whole on every rank.
    DDP, which the trainer wraps around the model, is told to leave everything but them alone.

    The model may arrive in host memory (load_model's `for_ranks`): FSDP2 moves each unit to `device` as it
    shards it, so the GPU holds one whole layer at most besides its shards; the LoRA parameters follow."""
    from torch.distributed.fsdp import fully_shard

    from .experts import has_mxfp4_experts

    trainable = {p for p in model.parameters() if p.requires_grad}
    if has_mxfp4_experts(model):
        keep_frozen_base_whole(model, device, trainable)
        return
    layer_types = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise RuntimeError(f"no decoder layers of types {sorted(layer_types)} found to shard")
    for layer in layers:
        fully_shard(layer, ignored_params=trainable)
    fully_shard(model, ignored_params=trainable)
    for p in trainable:  # FSDP2 moves only what it manages
        p.data = p.data.to(device)
    trainable_ids = {id(p) for p in trainable}
    model._ddp_params_and_buffers_to_ignore = [
        name for name, p in model.named_parameters() if id(p) not in trainable_ids] + [
        name for name, _ in model.named_buffers()]
    log.info("FSDP2: %d decoder layers sharded over %d ranks; %d LoRA tensors replicated", len(layers),
             dist.get_world_size(), len(trainable))


def keep_frozen_base_whole(model, device: torch.device, trainable: set) -> None:
    """The whole model on every rank's GPU, as for an MXFP4-kept base (a third of its bf16 size): no gathers per
    micro-step, only the LoRA gradients averaged (DDP, told to leave the frozen parameters and the buffers alone:
    it would otherwise broadcast the MXFP4 buffers from rank 0 at every forward)."""
    from .experts import check_kernel_against_reference

    model.to(device)
    check_kernel_against_reference(model)
    trainable_ids = {id(p) for p in trainable}
    model._ddp_params_and_buffers_to_ignore = [
        name for name, p in model.named_parameters() if id(p) not in trainable_ids] + [
        name for name, _ in model.named_buffers()]
    log.info("frozen base kept whole on each of %d ranks (MXFP4 experts); %d LoRA tensors replicated",
             dist.get_world_size(), len(trainable))
