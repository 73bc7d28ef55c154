"""Small pure functions behind the rules: window arithmetic, tolerance tests, stat selections.

Nothing here keeps state or does I/O; every function maps its arguments to a result, so each
can be tested on its own and the rule classes stay thin. Losses are plain Python floats; tensor
statistics arrive as `TensorStats`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from tensorpulse.wire import ACTIVITY_EDGES, FLOAT_COLUMNS, Tensors, TensorStats

if TYPE_CHECKING:
    from .base import Regex

#: The fingerprint of a tensor that UnchangedTensor compares between saved steps: every float
#: statistic the wire sends (declared in tensorpulse/statistics.py).
FINGERPRINT_FIELDS = FLOAT_COLUMNS


# --- windows and means ----------------------------------------------------------------------


def push_window(window: Sequence[float], value: float, size: int) -> list[float]:
    """A new list: `window` with `value` appended, keeping only the newest `size` values."""
    out = [*window, float(value)]
    return out[-size:] if size > 0 else []


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    return math.fsum(values) / len(values) if values else math.nan


def improved(new: float, best: float, percent: float) -> bool:
    """True if `new` is lower than `best` by at least `percent` % of |best|."""
    return new <= best - abs(best) * percent / 100.0


def rose(new: float, previous: float, percent: float) -> bool:
    """True if `new` exceeds `previous` by more than `percent` % of |previous|."""
    return new > previous + abs(previous) * percent / 100.0


def relative_gap(eval_loss: float, train_loss: float) -> float:
    """(eval − train) / |train|; ±inf (or 0) when the train loss is exactly 0."""
    diff = eval_loss - train_loss
    if train_loss == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / abs(train_loss)


def consecutive(count: int, condition: bool) -> int:
    """A run length: `count + 1` while the condition holds, 0 once it does not."""
    return count + 1 if condition else 0


def hysteresis(firing: bool, good: int, condition: bool, resolve_after: int) -> tuple[bool, int]:
    """One check of a rule with hysteresis: (firing, healthy checks in a row while firing) after it.

    The condition holding fires (or keeps firing) and resets the count; a healthy check while
    firing adds one, and only the `resolve_after`-th healthy check in a row resolves.
    """
    if condition:
        return True, 0
    if not firing or good + 1 >= resolve_after:
        return False, 0
    return True, good + 1


def is_new_step(last_step: int | None, step: int) -> bool:
    """True if `step` comes after the last step a rule took into account (or none was)."""
    return last_step is None or step > last_step


# --- tolerance comparisons ------------------------------------------------------------------


def close(a: float, b: float, rtol: float, atol: float, equal_nan: bool = False) -> bool:
    """numpy.isclose for two floats: |a − b| <= atol + rtol·|b|; NaN equals NaN only if equal_nan."""
    if math.isnan(a) or math.isnan(b):
        return equal_nan and math.isnan(a) and math.isnan(b)
    if a == b:  # also covers inf == inf
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= atol + rtol * abs(b)


_FINGERPRINT = operator.attrgetter(*FINGERPRINT_FIELDS)


def fingerprint(t: TensorStats) -> list[float]:
    """(mean, std, min, max, abs_mean) of a tensor as a JSON-friendly list."""
    return list(map(float, _FINGERPRINT(t)))


def fingerprints_close(
    a: Sequence[float], b: Sequence[float], rtol: float, atol: float, equal_nan: bool = False
) -> bool:
    """True if every fingerprint component of `a` is close to that of `b` (see `close`).

    A loop rather than all(close(...)): UnchangedTensor compares every weight and bias of every
    record, and the generator and a call per component were a tenth of the worker's time per
    record; equal components (the frozen case) skip `close`, a differing one ends the loop."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):  # noqa: SIM110 - a generator in all() cost 2.5x here
        if x == y:
            continue
        d = abs(x - y)
        # `close` itself where both are finite (a finite difference says so: inf and NaN make it
        # inf or NaN); the rest, rare, through `close`.
        if d < math.inf and d <= atol + rtol * abs(y):
            continue
        if d < math.inf or not close(x, y, rtol, atol, equal_nan):
            return False
    return True


# --- tensor and scalar predicates -----------------------------------------------------------


def nonfinite_count(t: TensorStats, only_nan: bool = False) -> int:
    """Non-finite elements of a tensor from its exact NaN/inf counts (never from sum, mean or l2).

    As a cross-check, a NaN min or max with a zero NaN count counts as one NaN: torch's min/max
    propagate NaN, and a finite tensor can never produce one.
    """
    nan = t.nan
    if nan == 0 and (math.isnan(t.min) or math.isnan(t.max)):
        nan = 1
    return nan if only_nan else nan + t.inf


def scalar_nonfinite(value: float, only_nan: bool = False) -> bool:
    """True if a scalar is NaN (or ±inf unless only_nan)."""
    return math.isnan(value) or (not only_nan and math.isinf(value))


def select_scalars(scalars: Mapping[str, float], regex: Regex | None = None) -> dict[str, float]:
    """Scalars whose name matches `regex` (searched), all of them when regex is None."""
    return {k: float(v) for k, v in scalars.items() if regex is None or regex.search(k)}


def loss_value(scalars: Mapping[str, float], regex: Regex | None = None) -> float | None:
    """The loss of one record: scalar "loss", or the sum of scalars matching `regex`; None if absent."""
    if regex is None:
        value = scalars.get("loss")
        return None if value is None else float(value)
    matched = select_scalars(scalars, regex)
    return math.fsum(matched.values()) if matched else None


def frozen(tensors: Iterable[TensorStats], prefix: str = "gradient/") -> frozenset[str]:
    """Names of the parameters of a record that get no gradient while others do: frozen on purpose.

    A hook publishes the gradient of parameter `p` as `prefix + p` (collection "gradients"), and
    none for a parameter with requires_grad off. A record without any gradient says nothing
    (gradients not captured), so then no name is returned. The answer depends on names and
    collections alone: a decoded record's is remembered with its schema (wire.Schema).
    """
    if type(tensors) is Tensors:
        schema = tensors.schema
        key = ("frozen", prefix)
        found = schema.memo.get(key)
        if found is None:
            found = schema.remember(key, _frozen(tensors, prefix))
        return found  # type: ignore[return-value]
    return _frozen(tensors, prefix)


def _frozen(tensors: Iterable[TensorStats], prefix: str) -> frozenset[str]:
    tensors = list(tensors)
    grads = {
        t.name[len(prefix) :] for t in tensors if t.collection == "gradients" and t.name.startswith(prefix)
    }
    if not grads:
        return frozenset()
    return frozenset(t.name for t in tensors if t.collection in ("weights", "biases") and t.name not in grads)


def below(tensors: Iterable[TensorStats], threshold: float) -> list[TensorStats]:
    """Non-empty tensors whose abs_mean is below `threshold`, smallest first (NaN never counts)."""
    hits = [t for t in tensors if t.n > 0 and not math.isnan(t.abs_mean) and t.abs_mean < threshold]
    return sorted(hits, key=lambda t: (t.abs_mean, t.name))


def activity_edge(percent: float) -> float | None:
    """The ACTIVITY_EDGES entry equal to `percent` / 100, or None if there is none."""
    for edge in ACTIVITY_EDGES:
        if math.isclose(edge * 100.0, percent, rel_tol=1e-9):
            return edge
    return None


def variance_ratio(variances: Sequence[float]) -> float | None:
    """max / min of the finite variances; None with fewer than two; inf if only the minimum is 0."""
    finite = [v for v in variances if math.isfinite(v)]
    if len(finite) < 2:
        return None
    lo, hi = min(finite), max(finite)
    if lo <= 0.0:
        return math.inf if hi > 0.0 else 1.0
    return hi / lo


def adjacent_variance_ratio(variances: Sequence[float]) -> tuple[float, int] | None:
    """Largest ratio between the variances of neighbouring layers, and the index of the first of the pair.

    None with fewer than two finite values; inf when one of a pair is 0 and the other is not.
    """
    best: tuple[float, int] | None = None
    for i in range(len(variances) - 1):
        a, b = variances[i], variances[i + 1]
        if not (math.isfinite(a) and math.isfinite(b)):
            continue
        lo, hi = min(a, b), max(a, b)
        r = (math.inf if hi > 0 else 1.0) if lo <= 0 else hi / lo
        if best is None or r > best[0]:
            best = (r, i)
    return best


def quantile_spread(quantiles: tuple[float, float]) -> float:
    """p95 − p5."""
    return float(quantiles[1]) - float(quantiles[0])


def relative_spread(quantiles: tuple[float, float]) -> float:
    """(p95 − p5) / max(|p5|, |p95|): 0 when the values are (nearly) all the same; 0 for all zeros."""
    lo, hi = float(quantiles[0]), float(quantiles[1])
    scale = max(abs(lo), abs(hi))
    return (hi - lo) / scale if scale > 0 else 0.0


def is_constant(t: TensorStats) -> bool:
    """True if a tensor of more than one element holds a single value (min == max, or std == 0)."""
    return t.n > 1 and (t.min == t.max or t.std == 0.0)


# --- per-step range checks and early-stopping counters -------------------------------------


def inactive_layers(
    tensors: Iterable[TensorStats], edge: float, limit_percent: float
) -> tuple[float, list[tuple[str, float, int]]] | None:
    """Worst inactive-unit percentage over the tensors that carry activity, and those above the limit.

    A unit is inactive when it was active in fewer than `edge` (an ACTIVITY_EDGES entry) of the
    samples; the list holds (name, inactive %, units) of each tensor with more than `limit_percent`
    % inactive units, in input order. None when no tensor carries activity.
    """
    worst: float | None = None
    over: list[tuple[str, float, int]] = []
    for t in tensors:
        frac = t.inactive_unit_fraction(edge)
        if frac is None:
            continue
        percent = 100.0 * frac
        worst = percent if worst is None else max(worst, percent)
        if percent > limit_percent:
            over.append((t.name, percent, t.activity[0]))  # type: ignore[index]
    return None if worst is None else (worst, over)


def update_ratio(update_l2: float, prev_l2: float, epsilon: float) -> float:
    """‖Δw‖ / (‖w_prev‖ + epsilon); inf for a non-zero update of a zero tensor (epsilon 0), NaN for 0/0."""
    denom = prev_l2 + epsilon
    if denom == 0.0:
        return math.nan if update_l2 == 0.0 else math.inf
    return update_l2 / denom


def out_of_range(
    values: Iterable[tuple[str, float]], low: float | None, high: float | None
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(values > high, largest first; values < low, smallest first); NaN is never out; None: no bound.

    Ties keep input order.
    """
    above: list[tuple[str, float]] = []
    under: list[tuple[str, float]] = []
    for name, v in values:
        if high is not None and v > high:
            above.append((name, v))
        elif low is not None and v < low:
            under.append((name, v))
    above.sort(key=lambda nv: -nv[1])
    under.sort(key=lambda nv: nv[1])
    return above, under


def patience_count(best: float | None, since: int, value: float, min_delta: float) -> tuple[float, int]:
    """Early-stopping bookkeeping for a loss: (new best, steps since the last improvement).

    The first value sets best; a value counts as an improvement when it is below best by at least
    `min_delta` (absolute; with min_delta 0, any decrease), and then becomes best; anything else
    (a smaller decrease, no change, a rise) adds one step.
    """
    if best is None or (value < best and best - value >= min_delta):
        return value, 0
    return best, since + 1


# --- counts, shares and early stopping (ClassImbalance, Confusion, NLPSequenceRatio, ...) ---------


def add_counts(total: Sequence[float], counts: Sequence[float]) -> list[float]:
    """Element-wise sum of two count vectors; the shorter one is padded with zeros."""
    size = max(len(total), len(counts))
    return [(total[i] if i < len(total) else 0) + (counts[i] if i < len(counts) else 0) for i in range(size)]


def grow_square(flat: Sequence[int], k: int, size: int) -> list[int]:
    """A flat row-major k×k matrix placed in the top-left corner of a size×size one (size >= k)."""
    out = [0] * (size * size)
    for i in range(k):
        out[i * size : i * size + k] = flat[i * k : (i + 1) * k]
    return out


def add_square(total: Sequence[int], k_total: int, flat: Sequence[int], k: int) -> tuple[list[int], int]:
    """Sum of two flat row-major square matrices of sizes k_total and k: (flat sum, its size)."""
    size = max(k_total, k)
    a = grow_square(total, k_total, size) if k_total != size else list(total)
    b = grow_square(flat, k, size) if k != size else flat
    return [x + y for x, y in zip(a, b, strict=True)], size


def imbalance_ratio(counts: Sequence[int]) -> tuple[float, int, int] | None:
    """(largest count / smallest count, its class, the smallest's class); None without classes.

    A class with no samples counts as one sample, so the ratio stays finite: it is then the
    largest count itself. Ties go to the lowest class id.
    """
    if not counts:
        return None
    hi = max(range(len(counts)), key=lambda c: (counts[c], -c))
    lo = min(range(len(counts)), key=lambda c: (counts[c], c))
    return counts[hi] / max(counts[lo], 1), hi, lo


def mispredicted(
    correct: Sequence[int], counts: Sequence[int], limit: float, min_samples: int
) -> list[tuple[int, float]]:
    """(class, 1 − correct/count) of the classes with >= min_samples samples whose fraction > limit.

    Worst first (ties by class id); classes with fewer samples are not judged.
    """
    out = [
        (c, 1.0 - correct[c] / n)
        for c, n in enumerate(counts)
        if n >= max(min_samples, 1) and 1.0 - correct[c] / n > limit
    ]
    return sorted(out, key=lambda cf: (-cf[1], cf[0]))


def confusion_violations(
    flat: Sequence[int], k: int, min_diag: float, max_off_diag: float, min_samples: int
) -> tuple[float | None, list[tuple[int, float]], list[tuple[int, int, float]]]:
    """Row-normalised (recall) checks of a flat row-major k×k confusion matrix.

    Only rows with >= min_samples samples are judged. Returns (smallest judged diagonal share or
    None, [(row, share)] with share < min_diag, lowest first, [(row, column, share)] with an
    off-diagonal share > max_off_diag, highest first); ties by position.
    """
    worst: float | None = None
    low: list[tuple[int, float]] = []
    high: list[tuple[int, int, float]] = []
    for i in range(k):
        row = flat[i * k : (i + 1) * k]
        n = sum(row)
        if n < max(min_samples, 1):
            continue
        diag = row[i] / n
        worst = diag if worst is None else min(worst, diag)
        if diag < min_diag:
            low.append((i, diag))
        high.extend((i, j, v / n) for j, v in enumerate(row) if j != i and v / n > max_off_diag)
    low.sort(key=lambda x: (x[1], x[0]))
    high.sort(key=lambda x: (-x[2], x[0], x[1]))
    return worst, low, high


def top_share(values: Sequence[float], n: int) -> tuple[float, list[int]] | None:
    """(sum of the n largest values / sum of all, their indices, largest first).

    Values that are not finite or are negative are left out; None when the rest sum to 0 or
    there are no more than n of them (the share would be 1 by construction). Ties by index.
    """
    usable = [(i, float(v)) for i, v in enumerate(values) if math.isfinite(v) and v >= 0.0]
    total = math.fsum(v for _, v in usable)
    if len(usable) <= n or total <= 0.0:
        return None
    top = sorted(usable, key=lambda iv: (-iv[1], iv[0]))[:n]
    return math.fsum(v for _, v in top) / total, [i for i, _ in top]


def depth_from_node_id(max_node_id: int) -> int:
    """⌊log2(max_node_id + 1)⌋: the depth of node `max_node_id` in heap order (root 0, children 2i+1, 2i+2).

    For XGBoost, whose node ids run 0..n−1 over a tree's n nodes, it is a lower bound on the depth
    of the tree: a tree of depth d has at most 2^(d+1) − 1 nodes.
    """
    return (max(int(max_node_id), 0) + 1).bit_length() - 1


def keras_improvement(value: float, reference: float | None, min_delta: float, maximize: bool) -> bool:
    """Keras' EarlyStopping test: better than `reference` by more than `min_delta` (None: always).

    NaN never improves.
    """
    if math.isnan(value):
        return False
    if reference is None:
        return True
    return value - min_delta > reference if maximize else value + min_delta < reference
