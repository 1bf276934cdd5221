"""One process of a ``torchrun`` job: the process group, which rank does what, and the few
collectives training needs.

``torchrun`` starts one process per device and tells each its ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` through the environment. SLURM's ``srun`` (and the submitit launcher, which uses
it) tells each task ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS`` and the node list
instead: :func:`adopt_slurm_environment` translates those into torchrun's variables, so both
take the same path from there on. Every function here also works in a plain single process
(no process group), where it is the identity: the training loop has one version, not two.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fcn.errors import UserError

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def slurm_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """torchrun's variables for one task of a SLURM job step of several tasks; None otherwise.

    ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` = ``SLURM_NTASKS``, ``LOCAL_RANK`` =
    ``SLURM_LOCALID``; ``MASTER_ADDR`` is the first host of the step's node list
    (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``; parsed by submitit) and
    ``MASTER_PORT`` is derived from the job id (20000-39999), so every task of the job agrees on
    both without talking first. ``MASTER_ADDR`` / ``MASTER_PORT`` already in ``env`` are kept.

    Only a task of an ``srun`` step that runs all the job's tasks qualifies
    (``SLURM_STEP_NUM_TASKS`` = ``SLURM_NTASKS`` > 1): a single ``python`` in an ``sbatch``
    script of several tasks is one process, not rank 0 of a group that will never form.
    """
    tasks = env.get("SLURM_NTASKS")
    if not tasks or int(tasks) < 2 or env.get("SLURM_STEP_NUM_TASKS") != tasks or "SLURM_PROCID" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("SLURM job of several tasks without SLURM_JOB_NODELIST: cannot tell where rank 0 runs")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``"gpu[12-15],cpu1"`` -> ``"gpu12"``), as submitit parses it."""
    try:  # the cluster extra; a plain install trains under torchrun, which never comes here
        from submitit.slurm.slurm import _parse_node_list  # what submitit's SlurmJobEnvironment.hostnames uses
    except ImportError:
        raise UserError(
            f"srun with several tasks needs submitit to read the node list {nodelist!r}: "
            'pip install -e ".[cluster]", or start the tasks with torchrun'
        ) from None
    return _parse_node_list(nodelist)[0]


def adopt_slurm_environment() -> bool:
    """Inside a SLURM step of several tasks (and not already under torchrun), set torchrun's
    variables from SLURM's (see :func:`slurm_environment`); True when it did.

    From then on :func:`launched_by_torchrun` is true and :func:`process_group` joins the job's
    group exactly as it does under torchrun.
    """
    if "WORLD_SIZE" in os.environ:
        return False
    variables = slurm_environment(os.environ)
    if variables is None:
        return False
    os.environ.update(variables)
    return True


@contextmanager
def process_group() -> Iterator[None]:
    """Join the job's process group for the duration of the block; nothing outside torchrun.

    Both backends are created where CUDA exists: collectives on CUDA tensors go through NCCL and
    those on CPU tensors through gloo, so the backend follows the training device (and small
    CPU-side agreements, such as the stop flag, never wait on the GPU stream).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and dist.get_rank() == 0:
        # With the c10d rendezvous, restarted workers can read the dead workers' addresses from the
        # store they share with torchrun and fail to connect (pytorch/pytorch#135712; seen with torch 2.14).
        log.warning(
            "torchrun --max-restarts=%d: with --standalone or --rdzv-backend c10d, set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, or a restart may fail to connect",
            restarts,
        )
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:
            barrier()  # no rank leaves while another still waits in a collective
        dist.destroy_process_group()


# The last collectives' Work objects and tensors, kept alive on purpose. gloo's worker thread
# drops its reference to a finished Work; when that is the last one, it frees the Work's tensors,
# which takes the GIL (the tensors are Python objects). A thread asking for the GIL after
# interpreter shutdown has begun is ended by CPython, and ending it inside that destructor kills
# the process: "terminate called without an active exception", SIGABRT, exit -6, after training
# had finished well (torch 2.14; 5 of 25 two-rank CPU jobs on a loaded 2-core machine).
# destroy_process_group does not stop those threads while DistributedDataParallel has been used (it
# keeps the group alive in C++), so a Work referenced here is freed by this thread instead: when a
# newer one pushes it out, or at shutdown.
_recent_work: deque[tuple[Any, ...]] = deque(maxlen=64)


def _finish(*works: Any) -> None:
    """Wait for asynchronous collectives and keep them referenced (each holds its tensors); see
    ``_recent_work``.

    Kept before the wait, so that a collective that fails (a rank gone, a timeout) is kept too.
    """
    _recent_work.append(works)
    for work in works:
        work.wait()


def is_initialized() -> bool:
    """True once this process has joined its job's process group."""
    return dist.is_initialized()


def rank() -> int:
    """This process's rank in the job (0 outside one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 outside one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs to TensorBoard and shows progress bars."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own machine (torchrun's ``LOCAL_RANK``): which GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def device_for_rank(device: torch.device) -> torch.device:
    """In a job, each process trains on its own GPU, ``cuda:LOCAL_RANK``; a CPU stays a CPU."""
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)  # NCCL and every bare .cuda() use this device from now on
    return device


def barrier() -> None:
    """Wait until every rank gets here.

    A summed CPU tensor rather than ``dist.barrier()``: it always goes through gloo, so it needs
    no GPU and behaves the same whatever the training device.
    """
    if dist.is_initialized():
        _finish(dist.all_reduce(torch.zeros(1), async_op=True))


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first and the others after it (a one-time download, generation or
    cache fill done once, then reused), e.g. ``with rank_zero_first(): prepare_data()``.

    When the block fails on rank 0 (bad data, most often) the others do not run it: they stop
    with rank 0's message as a :class:`UserError`, rather than die in a collective rank 0 left.
    """
    if not dist.is_initialized():
        yield
        return
    if not is_main():
        error = broadcast_object(None)
        if error is not None:
            raise UserError(f"rank 0 stopped: {error}")
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:
        error = str(exc) if isinstance(exc, UserError) else f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        broadcast_object(error)  # releases the other ranks, with the error if there was one


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a path, a small dict: anything picklable).

    Pickled into a CPU byte tensor and broadcast through gloo, like ``dist.broadcast_object_list``
    but with the Works kept (see ``_recent_work``): a rank may exit right after this.
    """
    if not dist.is_initialized():
        return obj
    data = _to_bytes(obj) if is_main() else None
    size = torch.tensor([0 if data is None else data.numel()])
    _finish(dist.broadcast(size, src=0, async_op=True))
    if data is None:
        data = torch.empty(int(size), dtype=torch.uint8)
    _finish(dist.broadcast(data, src=0, async_op=True))
    return obj if is_main() else _from_bytes(data)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled, as :func:`broadcast_object`)."""
    if not dist.is_initialized():
        return [obj]
    data = _to_bytes(obj)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    own = torch.tensor([data.numel()])
    _finish(dist.all_gather(sizes, own, async_op=True))
    longest = max(int(size) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    _finish(dist.all_gather(gathered, padded, async_op=True))
    return [_from_bytes(chunk[: int(size)]) for chunk, size in zip(gathered, sizes, strict=True)]


def _to_bytes(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    return pickle.loads(data.numpy().tobytes())


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks (in place, and returned)."""
    if dist.is_initialized():
        _finish(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
    return tensor


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks of a tensor (float32, on its device): a value every rank agrees on.

    Used for a step's training loss and gradient norm: every rank then sees the same values (a NaN
    on any rank is a NaN on all, so all skip the same step), and the logged loss is that of the
    whole global batch. Outside a job it returns ``value`` (detached).
    """
    value = value.detach().float()
    if dist.is_initialized():
        value = value.clone()
        _finish(dist.all_reduce(value, op=dist.ReduceOp.SUM, async_op=True))
        value /= dist.get_world_size()
    return value


def shard(num_samples: int) -> range:
    """This rank's share of an evaluation split: indices ``rank, rank + W, ...``.

    No index is repeated to even out the shares (unlike ``DistributedSampler``), so confusion
    matrices summed over ranks count every image exactly once, as a single process would.
    """
    return range(rank(), num_samples, world_size())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` inside a job (gradients averaged over ranks at
    each backward, rank 0's weights and buffers copied to all at construction); else unchanged."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norms that compute their statistics over the global batch (``SyncBatchNorm``).

    Only NCCL implements it, so on a CPU (gloo) the model is left as it is, with a warning.
    Outside a job there is nothing to synchronise with.
    """
    if not dist.is_initialized():
        return model
    if device.type != "cuda":
        log.warning("trainer.sync_bn=true needs CUDA (NCCL); on %s batch norms stay per process", device)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics).

    DDP copies them before each training forward, so after the last training step they differ
    by one batch's update; evaluating with rank 0's buffers everywhere makes the ranks score
    exactly the model that rank 0 checkpoints.
    """
    if dist.is_initialized():
        works: list[Any] = []
        _recent_work.append((works,))  # each Work kept as soon as it exists (see _finish)
        for buffer in model.buffers():
            works.append(dist.broadcast(buffer, src=0, async_op=True))
        for work in works:
            work.wait()


class SharedStop:
    """A stop request seen by any rank stops every rank after the same step.

    A signal may reach one process of a job and not another; a rank that left the loop alone
    would leave the others waiting forever in their next collective. ``poll`` is itself a
    collective (the largest signal number over ranks), so every rank must call it at the same
    points. ``local`` is the process's own :class:`fcn.signals.GracefulStop` (or anything with
    ``should_stop(step)`` and ``requested``).
    """

    def __init__(self, local) -> None:
        self.local = local
        self.requested: int | None = None

    def poll(self, step: int) -> bool:
        """Whether every rank stops now; ``requested`` is then the signal that asked."""
        wanted = self.local.should_stop(step)
        signum = int(self.local.requested or signal.SIGTERM) if wanted else 0
        if dist.is_initialized():
            flag = torch.tensor([signum])
            _finish(dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
            signum = int(flag)
        if signum:
            self.requested = signum
        return bool(signum)
