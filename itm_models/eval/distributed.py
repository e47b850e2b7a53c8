"""torch.distributed setup for sharded evaluation (launched by ``torchrun``; multi-node through its rendezvous).

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), checks it,
and joins the process group: gloo on CPUs, NCCL when the evaluation runs on CUDA. Every collective has a timeout,
so a rank that dies mid-run makes the others fail with an error instead of hanging (torchrun's agent also tears
the group down when a worker exits non-zero).
"""
from __future__ import annotations

import datetime
import os

import torch

__all__ = ["init_distributed", "read_world", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0


def _env_int(name: str, env) -> int:
    raw = env.get(name)
    if raw is None:
        raise ValueError(f"--distributed needs the environment variable {name} (launch with torchrun "
                         f"--nproc_per_node N ...)")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def read_world(env=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, validated."""
    env = os.environ if env is None else env
    rank, size = _env_int("RANK", env), _env_int("WORLD_SIZE", env)
    local = int(env.get("LOCAL_RANK", rank)) if str(env.get("LOCAL_RANK", rank)).lstrip("-").isdigit() else -1
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be a positive int, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"RANK must lie in 0..{size - 1} (WORLD_SIZE={size}), got {rank}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be a non-negative int, got {env.get('LOCAL_RANK')!r}")
    return rank, size, local


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the default process group (once); returns ``(rank, world_size, device)``.

    ``device``: "cpu" -> gloo; "cuda" -> NCCL on ``cuda:LOCAL_RANK``. ``timeout_s`` bounds every collective.
    """
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
    rank, size, local = read_world()
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, size, device
