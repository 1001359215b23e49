"""Choosing the device a verb runs on, from a user's `--device` string.

    resolve_device(None)      cuda (the current CUDA device) when CUDA is available, else cpu
    resolve_device("cpu")     cpu
    resolve_device("cuda:1")  cuda:1, if this machine has at least two CUDA devices
    resolve_device("cuda")    DeviceError on a machine without CUDA, in one line that says so
    resolve_device("mps")     DeviceError: lmforge runs on cpu and cuda only

torch itself accepts "cuda" on any machine and fails later, deep inside the first tensor move, with
"AssertionError: Torch not compiled with CUDA enabled"; checking here turns that into bad input, reported
before a model is loaded.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that does not exist on this machine, or a string that names no device."""


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch.device for `spec` (see the module docstring); DeviceError if this machine does not have it."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {spec!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"device {spec!r} asked for, but {why}: pass --device cpu (or leave --device out)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {spec!r} asked for, but this machine has {count} CUDA device(s): "
                              f"cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise DeviceError(f"device {spec!r} is not supported by lmforge (use cpu or cuda)")
    return device
