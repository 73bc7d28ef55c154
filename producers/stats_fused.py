"""A whole job of CPU float32 tensors reduced to host statistics by one numba kernel call.

Why a module of its own: it is a speed path beside `stats_torch.reduce_many` + `stats_host.transfer`
(the same statistics, the same HostStats), for the offloaded hook's background work, which shares
the GIL with training. The kernels themselves are in `stats_numba`; this module lays out their
arguments once per layout of tensors (`_FusedPlan`) and arranges their results.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import stats_numba, stats_torch
from .stats_host import HostStats
from .stats_numpy import Columns
from .stats_torch import _NA, MAX_PLAIN_RATIO, _kernel_takes, _thresholds


def reduce_host_fused(
    tensors: Sequence[torch.Tensor], active: Sequence[tuple[float, float] | None] | None = None
) -> HostStats | None:
    """HostStats of CPU float32 tensors from one numba kernel call, or None: use reduce_many /
    transfer then.

    Why: the offloaded hook's background work shares the GIL with training, and `reduce_many` +
    `transfer` cost a few hundred microseconds of Python per step; this is one kernel call (one
    GIL release) that also checks and arranges its results, with arguments allocated once per
    layout of tensors (`_FusedPlan`). The kernel reads the tensors by address: a few attribute
    reads per tensor, no numpy view (Python on a training thread runs on cold caches, where each
    call costs two to three times its cost in a micro-benchmark).

    `active[i]`: (lo, hi) of the per-unit activity of tensor i (unit = dim 1), or None. None is
    returned when the kernel is off, a tensor is empty, not a dense contiguous float32 CPU tensor,
    or a result needs the torch path: a non-finite value (exact nan/inf counts) or plain sums that
    lose the variance to cancellation (MAX_PLAIN_RATIO). The tensors must not change until it
    returns.
    """
    for t in tensors:
        if not _kernel_takes(t):
            return None
    if not stats_numba.enabled():  # after the check above: numba loads only for CPU float32 tensors
        return None
    layout: list[Any] = [t.numel() for t in tensors]
    if 0 in layout:
        return None
    if active is not None:
        for i, rng in enumerate(active):
            t = tensors[i]
            if rng is not None and t.dim() >= 2 and t.shape[1]:
                n, samples, units = layout[i], t.shape[0], t.shape[1]
                if n // units > stats_torch._EXACT_F32:
                    return None
                layout[i] = (n, samples, units, rng[0], rng[1])
    addrs = [t.data_ptr() for t in tensors]
    key = tuple(layout)
    plans = _plans.__dict__  # per thread: a plan's scratch arrays are reused by every call
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= 64:
            plans.clear()
        plan = plans[key] = _FusedPlan(layout)
    return plan.run(addrs)


_plans = threading.local()


class _FusedPlan:
    """The fused kernel's arguments for one layout of tensors (element counts; shape and range
    of the activations), allocated once: a call then sets the addresses and allocates only its
    results. Used by one thread (see `_plans`)."""

    __slots__ = ("args", "acts", "below_shape", "k", "n", "none", "thr")

    def __init__(self, layout: list[Any]) -> None:
        sizes = [x if isinstance(x, int) else x[0] for x in layout]
        acts = [(i, x) for i, x in enumerate(layout) if not isinstance(x, int)]
        dims = [(samples, units, n // (samples * units), lo, hi) for _, (n, samples, units, lo, hi) in acts]
        self.args = stats_numba.args_at([0] * len(sizes), sizes, dims)
        self.args[4][:] = [i for i, _ in acts]  # act j reads tensor i: no second address
        self.acts = [(i, x[2]) for i, x in acts]  # (tensor, units)
        self.k = len(sizes)
        self.n = np.array(sizes, dtype=np.int64)
        self.n.flags.writeable = False  # shared by every HostStats of this plan
        self.none = np.zeros(self.k, np.int64)  # nan and inf counts: the kernel takes finite sums only
        self.none.flags.writeable = False
        self.thr = np.array([_thresholds(n // units) for _, (n, _, units, _, _) in acts], dtype=np.float64)
        self.thr = self.thr.reshape(len(acts), _NA)
        self.below_shape = (len(acts), _NA)

    def run(self, addrs: list[int]) -> HostStats | None:
        a = self.args
        a[0][:] = addrs
        k = self.k
        raw, nonzero, below = np.empty((k, 6)), np.empty(k, np.int64), np.empty(self.below_shape, np.int64)
        floats, zeros = np.empty((k, 5)), np.empty(k, np.int64)
        if not stats_numba.host_kernel()(*a, self.thr, MAX_PLAIN_RATIO, raw, nonzero, below, floats, zeros):
            return None
        activity = {i: (units, *row) for (i, units), row in zip(self.acts, below.tolist(), strict=True)}
        none = self.none
        cols = Columns(self.n, floats, zeros, none, none, activity, finite=True)
        return HostStats(self.n, raw, nonzero, none, none, {}, activity, finished=cols)
