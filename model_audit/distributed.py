"""Running under ``torchrun``: rank and world from the environment, the probe's shards, and
the few collectives the pipeline needs (torch.distributed).

Under ``torchrun --nproc_per_node N --no-python model-audit scan ...`` every rank runs the same
command on the same inputs. :func:`session` joins the process group torchrun set up (nccl when
the ranks run on CUDA, gloo on the CPU; each rank takes the GPU of its ``LOCAL_RANK``). Then:

* the probe is split into contiguous blocks, one per rank (:func:`block`): evaluation,
  per-image losses and the baselines run on the rank's block and are gathered in probe order
  (:func:`gather_rows`), so every rank holds the same full result;
* the replay's gradient sums are all-reduced (:func:`all_reduce_sum`);
* only rank 0 writes and prints (:func:`on_main`);
* an error on one rank reaches every rank (:func:`agree`): all raise the same message, none
  waits in a collective for a rank that has stopped.

Outside torchrun (``WORLD_SIZE`` unset or 1) every function here is the single-process
identity, and nothing touches torch.distributed. A notebook that set up the process group
itself gets the same sharding: :func:`current` adopts an initialised default group.

Examples:
    >>> from model_audit import distributed
    >>> with distributed.session("auto"):  # doctest: +SKIP
    ...     result = scan("model.safetensors", "probe/")
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

from .errors import AuditError, ConfigError, DistributedError

T = TypeVar("T")

#: The variables torchrun sets for every worker.
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
#: Seconds a collective waits for a missing rank before it fails (torch's default is 30 min).
TIMEOUT_ENV = "MODEL_AUDIT_DIST_TIMEOUT"


def _dist() -> Any:
    import torch.distributed as dist
    return dist


@dataclass(frozen=True)
class Context:
    """This process's place in a distributed run (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None   # "nccl" | "gloo" once the process group is up

    @property
    def active(self) -> bool:
        """True when the work is split over more than one process."""
        return self.world_size > 1 and self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes and prints."""
        return self.rank == 0


_SINGLE = Context()
_current = _SINGLE


def from_env(environ: Optional[Mapping[str, str]] = None) -> Context:
    """The rank and world torchrun gave this process (a single process when ``WORLD_SIZE``
    is unset or 1).

    Raises:
        ConfigError: a world size above 1 without a valid ``RANK``/``LOCAL_RANK``.
    """
    env = os.environ if environ is None else environ
    values: Dict[str, int] = {}
    for name in ENV_VARS:
        text = env.get(name)
        if text is None or text.strip() == "":
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not an integer; run the command under "
                              "torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK") from None
    world = values.get("WORLD_SIZE", 1)
    if world <= 1:
        return _SINGLE
    missing = [n for n in ("RANK", "LOCAL_RANK") if n not in values]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch "
                          "with torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK), or unset "
                          "WORLD_SIZE to run in one process")
    rank = values["RANK"]
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return Context(rank, world, values["LOCAL_RANK"])


def current() -> Context:
    """The context of this process: the one :func:`session` set up, or the default process
    group a caller initialised itself, else a single process."""
    if _current.active:
        return _current
    dist = _dist()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return Context(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    return _SINGLE


def uses_cuda(device: str) -> bool:
    """Whether ranks given ``--device device`` run on CUDA (nccl) rather than the CPU (gloo)."""
    return device != "cpu" and torch.cuda.is_available()


def rank_device(device: str) -> str:
    """``cuda``/``auto`` -> this rank's GPU (``cuda:LOCAL_RANK``) in a distributed run."""
    ctx = current()
    if ctx.active and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


@contextmanager
def session(device: str = "auto", environ: Optional[Mapping[str, str]] = None
            ) -> Iterator[Context]:
    """Join the process group torchrun prepared for this process, for the block's duration.

    Nothing happens outside torchrun, or when a process group is already initialised (it is
    used as it is). nccl when ``device`` runs on CUDA (each rank on ``cuda:LOCAL_RANK``), else
    gloo. The group is destroyed on exit, also after an error.
    """
    global _current
    env = from_env(environ)
    dist = _dist()
    if env.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run in one process "
                               "(without torchrun)")
    cuda = uses_cuda(device)
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={env.local_rank} but this machine has {torch.cuda.device_count()} "
                "CUDA device(s); give torchrun --nproc_per_node at most that many, or "
                "--device cpu")
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if cuda else "gloo"
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, "1800") or 1800)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of "
                          "seconds") from None
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (ValueError, RuntimeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(
            f"cannot join the process group of WORLD_SIZE={env.world_size} ({backend}): {why}; "
            "launch with torchrun, which sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and "
            "LOCAL_RANK, or unset WORLD_SIZE to run in one process") from exc
    _current = replace(env, backend=backend)
    try:
        yield _current
    finally:
        _current = _SINGLE
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# Shards


def block_sizes(n: int, world_size: int) -> List[int]:
    """Sizes of the contiguous blocks ``n`` items split into (the first ``n % world`` ranks
    take one more), as :func:`numpy.array_split` splits."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def block(n: int, ctx: Optional[Context] = None) -> range:
    """This rank's contiguous block of ``range(n)``; all of it in a single process."""
    ctx = ctx or current()
    if not ctx.active:
        return range(n)
    sizes = block_sizes(n, ctx.world_size)
    start = sum(sizes[:ctx.rank])
    return range(start, start + sizes[ctx.rank])


def local_part(items: Sequence[T]) -> List[T]:
    """This rank's contiguous block of ``items`` (all of them in a single process)."""
    part = block(len(items))
    return list(items[part.start:part.stop])


# ------------------------------------------------------------------------------------------
# Collectives (each the identity in a single process)


def _comm_device(ctx: Context) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's block of rows (:func:`block` of ``n``) -> all ``n`` rows in order, on every
    rank (on ``local``'s device, in its dtype)."""
    ctx = current()
    if not ctx.active:
        return local
    sizes = block_sizes(n, ctx.world_size)
    if local.shape[0] != sizes[ctx.rank]:
        raise DistributedError(f"internal error: rank {ctx.rank} holds {local.shape[0]} rows "
                               f"of its block of {sizes[ctx.rank]}")
    wire = local.to(torch.uint8) if local.dtype == torch.bool else local
    wire = wire.to(_comm_device(ctx))
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=wire.dtype,
                         device=wire.device)
    padded[:len(wire)] = wire
    parts = [torch.empty_like(padded) for _ in sizes]
    _dist().all_gather(parts, padded.contiguous())
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out.to(device=local.device, dtype=local.dtype)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place, as one flat all-reduce (in their dtype when
    they share one: the replay's float32 gradients travel as float32, half the bytes)."""
    ctx = current()
    if not ctx.active or not tensors:
        return
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(ctx), dtype) for t in tensors])
    _dist().all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_values(*values: float) -> Tuple[float, ...]:
    """Each value summed over the ranks (float64)."""
    if not current().active:
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum([t])
    return tuple(t.tolist())


def max_value(value: int) -> int:
    """The largest ``value`` over the ranks."""
    ctx = current()
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(ctx))
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return int(t.item())


def _report(exc: BaseException) -> Tuple[Optional[type], str]:
    if isinstance(exc, AuditError):
        return type(exc), str(exc)
    return None, f"{type(exc).__name__}: {exc}"


def _rebuild(kind: Optional[type], message: str, rank: int) -> AuditError:
    if kind is not None:
        try:
            return kind(message)
        except Exception:  # a subclass with another constructor: the message still holds
            return DistributedError(message)
    return DistributedError(f"rank {rank} failed: {message} (its traceback is on that rank's "
                            "stderr)")


@contextmanager
def agree(enabled: bool = True) -> Iterator[None]:
    """Run a block of this rank's own work; then every rank learns whether any rank failed in
    it, and all raise the same error (that of the lowest failing rank; an
    :class:`~model_audit.errors.AuditError` keeps its class and message).

    Put the work that can fail on one rank only (reading its shard of the probe, writing on
    rank 0) in such a block: the ranks then stop together instead of waiting in the next
    collective for one that has gone. A single process (or ``enabled=False``: work that is
    the same on every rank) runs the block as it is.
    """
    ctx = current()
    if not ctx.active or not enabled:
        yield
        return
    failure: Optional[Exception] = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        failure = exc
    # one small all-reduce when every rank succeeded (each step of a repair runs this);
    # the messages travel only after a failure
    if sum_values(0.0 if failure is None else 1.0)[0] == 0:
        return
    reports: List[Optional[Tuple[Optional[type], str]]] = [None] * ctx.world_size
    _dist().all_gather_object(reports, None if failure is None else _report(failure))
    first = next(((r, rep) for r, rep in enumerate(reports) if rep is not None), None)
    if first is None:
        return
    rank, (kind, message) = first
    if failure is not None and rank == ctx.rank:
        raise failure
    raise _rebuild(kind, message, rank) from failure


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only (writing outputs); every rank gets its result,
    or raises its error."""
    ctx = current()
    if not ctx.active:
        return fn(*args, **kwargs)
    box: List[Any] = [None]
    with agree():
        if ctx.is_main:
            box[0] = fn(*args, **kwargs)
    _dist().broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------
# Training (fix): batch statistics over every rank's part of the batch


class _AllReduce(torch.autograd.Function):
    """A sum over the ranks that gradients flow through: the gradient of every rank's input
    is the sum of the ranks' output gradients (every rank's loss depends on every input)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore
        ctx.group = group
        out = tensor.clone()
        _dist().all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore
        out = grad.contiguous().clone()
        _dist().all_reduce(out, group=ctx.group)
        return out, None


class _SyncedBatchNorm(torch.nn.Module):
    """A BatchNorm layer in training mode whose batch statistics are those of the whole batch,
    summed over the ranks' parts (two differentiable all-reduces: the mean, then the centred
    squares), as one process would compute them on the whole batch.

    torch's own ``nn.SyncBatchNorm`` refuses CPU tensors (gloo), so this one serves both
    backends. In eval mode it is the wrapped layer. Its collectives use their own process group,
    so their order cannot interleave with DistributedDataParallel's gradient all-reduces.
    """

    def __init__(self, bn: torch.nn.modules.batchnorm._BatchNorm, group: Any) -> None:
        super().__init__()
        self.bn = bn
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not bn.training:
            return bn(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([float(x.numel() // max(x.shape[1], 1))])
        stats = _AllReduce.apply(torch.cat([x.sum(dims), count]), self.group)
        n = stats[-1]
        mean = stats[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduce.apply(centred.pow(2).sum(dims), self.group) / n
        out = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                momentum = (bn.momentum if bn.momentum is not None
                            else 1.0 / float(bn.num_batches_tracked))
                total = float(n)
                unbiased = var.detach() * (total / max(total - 1.0, 1.0))
                bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                bn.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out


@contextmanager
def synced_batchnorm(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, every BatchNorm layer of ``model`` in training mode normalises with
    the statistics of the whole batch over the ranks (the layers are put back, with what they
    learned, on exit). Nothing changes in a single process."""
    ctx = current()
    swapped: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []
    group = None
    if ctx.active:
        group = _dist().new_group(backend=ctx.backend)
        for name, module in list(model.named_modules()):
            if (name and isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                    and module.training):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, _SyncedBatchNorm(module, group))
                swapped.append((parent, attr, module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
        if group is not None:
            _dist().destroy_process_group(group)
