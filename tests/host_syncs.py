"""Counting the places where the host waits for the device, on any machine.

On the CPU nothing waits, so the readers themselves are counted: Tensor.item, .tolist, .cpu,
.numpy, Python's bool/float/int of a tensor, and a blocking Tensor.to onto the CPU. On a GPU
these are exactly the calls that synchronise the stream (torch.cuda.set_sync_debug_mode reports
the same ones there). Compare the counts of two runs that differ only in the number of loop
steps: a per-step read shows as a difference.
"""

import contextlib
from collections import Counter

import torch

READERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _blocking_copy_to_cpu(args, kwargs) -> bool:
    if kwargs.get("non_blocking", False) or (len(args) > 1 and isinstance(args[1], bool) and args[1]):
        return False
    for target in (*args, kwargs.get("device")):
        if isinstance(target, (str, torch.device)):
            return torch.device(target).type == "cpu"
        if isinstance(target, torch.Tensor):
            return target.device.type == "cpu"
    return False


@contextlib.contextmanager
def count_host_reads():
    """Yields a Counter of host reads made inside the block, by kind."""
    counts = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READERS + ("to",)}

    def counting(name):
        def reader(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return reader

    def to(self, *args, **kwargs):
        if _blocking_copy_to_cpu(args, kwargs):
            counts["to(cpu)"] += 1
        return originals["to"](self, *args, **kwargs)

    try:
        for name in READERS:
            setattr(torch.Tensor, name, counting(name))
        torch.Tensor.to = to
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
