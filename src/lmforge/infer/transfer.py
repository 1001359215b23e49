"""Host <-> device copies that do not make the host wait for the GPU.

A decode loop keeps the GPU busy only if the host can queue step n + 1 while step n runs. Two CUDA rules
decide whether a copy lets it:

- host -> device: a copy from pageable memory first waits for everything queued on the stream (the driver
  stages it through its own pinned buffer), and so does any copy without `non_blocking`. From pinned memory
  with `non_blocking=True` it is queued like a kernel. So every step input goes through pinned memory
  (`to_device`, `copy_to_device`); PyTorch's caching host allocator keeps a pinned block until the copies
  that read it have run, so the host may drop its tensor at once.
- device -> host: `.tolist()` waits for the whole stream, the work queued after the copy included. A
  `non_blocking` copy into pinned memory plus an event waits only for what came before it
  (`to_host_later`).

On the CPU both are plain copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on `device`, copied without waiting for the GPU."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_to_device(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """dst.copy_(src) for every (dst, host src) pair of one dtype, through one pinned buffer."""
    if not pairs:
        return
    if pairs[0][0].device.type != "cuda":
        for dst, src in pairs:
            dst.copy_(src)
        return
    flat = torch.cat([src.reshape(-1) for _, src in pairs]).pin_memory()
    offset = 0
    for dst, src in pairs:
        dst.copy_(flat[offset : offset + src.numel()].view(src.shape), non_blocking=True)
        offset += src.numel()


def to_host_later(tensors: list[Tensor | None]) -> Callable[[], list[list | None]]:
    """Start copying device tensors to the host without waiting; the returned function waits for the copies
    (not for work queued after them) and gives their `.tolist()` (None stays None)."""
    if tensors[0] is None or not tensors[0].is_cuda:
        return lambda: [t.tolist() if t is not None else None for t in tensors]
    host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]  # pinned destinations
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[list | None]:
        copied.synchronize()
        return [h.tolist() if h is not None else None for h in host]

    return wait


__all__ = ["copy_to_device", "to_device", "to_host_later"]
