"""Host-to-GPU copies that never make the host wait for the GPU.

A plain `cpu_tensor.to("cuda")` from pageable memory synchronises the stream: the Python side stops until every
queued kernel (the previous step's backward and optimizer) has finished, so the GPU then idles while the next
step is tokenised and launched. Copying from pinned memory with `non_blocking=True` keeps the queue full."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor bound for CUDA goes through pinned memory without a sync."""
    device = torch.device(device)
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # pin_memory() uses torch's caching host allocator, which keeps the block until the copy has finished
    return tensor.pin_memory().to(device, non_blocking=True)
