"""What the framework callbacks share (producers/lightning.py, transformers.py, keras.py).

Each callback is a thin adapter: the hook does the capturing and publishing, the callback only
says when a step ends, which step and mode it is, and which scalars the framework logged. This
module holds the parts that would otherwise be written three times: the hook made in the training
process itself (after the framework has spawned its ranks), messages said once, the filter that
turns a framework's logs into scalars, version and model checks, and the guard that keeps a
failing callback from raising into training (Lightning's and Hugging Face's own loggers behave
the same way: a monitoring failure is logged, the run goes on).
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from tensorpulse.errors import ConfigError

from .hook import Hook

log = logging.getLogger("tensorpulse.producers")

F = TypeVar("F", bound=Callable[..., Any])


def _leading_ints(version: str) -> tuple[int, ...]:
    """(2, 6, 1) from "2.6.1rc0" or "2.6.1+cu121": the numeric release part, for range checks."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


class CallbackCore:
    """The state one framework callback keeps besides the framework's own objects.

    `make_hook(job, bootstrap, **options)` builds the hook (TorchHook, or Hook for Keras). It is
    called once at construction with `enabled=False`, so that misconfiguration (a bad job id,
    save interval or hook option) raises ConfigError where the callback is made, and for real
    on first use in the training process (`hook_for`): frameworks spawn their ranks after the
    callback was built, and a hook's threads and Kafka clients must not be copied into them.
    """

    def __init__(
        self,
        framework: str,
        job: str,
        bootstrap: str | None,
        save_interval: int | None,
        hook_options: Mapping[str, Any],
        make_hook: Callable[..., Hook],
    ) -> None:
        self.framework = framework
        self.job = job
        self.bootstrap = bootstrap
        self.options = {"save_interval": save_interval, **hook_options}
        make_hook(job, bootstrap, **{**self.options, "enabled": False}).close()  # validates only
        self._make_hook = make_hook
        self.hook: Any = None
        self._said: set[str] = set()

    # ------------------------------------------------------------------ the hook
    def hook_for(self, rank: int | None = None, world_size: int | None = None) -> Any:
        """The hook, made now if there is none (at first, or after `close`); None if it cannot
        be made (the reason is logged once: training goes on without monitoring). `rank` and
        `world_size` come from the framework unless the hook options set them."""
        if self.hook is not None:
            return self.hook
        options = dict(self.options)
        if world_size is not None and "rank" not in options and "world_size" not in options:
            options["rank"], options["world_size"] = int(rank or 0), int(world_size)
        try:
            self.hook = self._make_hook(self.job, self.bootstrap, **options)
        except (ConfigError, OSError, ValueError) as exc:
            self.say_once(
                "hook",
                "tensorpulse: %s callback could not start its hook for job %s; training goes on "
                "without it: %s",
                self.framework,
                self.job,
                exc,
                level=logging.ERROR,
            )
            self.hook = None
        return self.hook

    def close(self) -> None:
        """Publish what is pending and the end record; a later `hook_for` makes a new hook."""
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook.close()

    # ------------------------------------------------------------------ messages
    def say_once(self, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        """Log `msg` the first time `key` comes up, at debug level afterwards."""
        if key in self._said:
            log.debug(msg, *args)
            return
        self._said.add(key)
        log.log(level, msg, *args)

    def check_version(
        self, package: str, version: str, lowest: tuple[int, ...], below: tuple[int, ...]
    ) -> None:
        """Say once that `version` of `package` is outside [lowest, below): it may still work."""
        got = _leading_ints(str(version))
        if not (lowest <= got < below):
            self.say_once(
                "version",
                "tensorpulse: %s %s is outside the range this callback is tested with (>=%s, <%s); "
                "it carries on, but steps or metrics may be missed",
                package,
                version,
                ".".join(map(str, lowest)),
                ".".join(map(str, below)),
            )

    def check_parameters(self, parameters: list[tuple[str, bool]]) -> None:
        """Say once what is not captured for a model without parameters, or with all of them
        frozen (pairs of name and requires-grad)."""
        if not parameters:
            self.say_once(
                "no-params",
                "tensorpulse: the %s model of job %s has no parameters: only the loss and logged "
                "metrics are sent",
                self.framework,
                self.job,
            )
        elif not any(trainable for _, trainable in parameters):
            self.say_once(
                "frozen",
                "tensorpulse: every parameter of the %s model of job %s is frozen: weights are sent, "
                "gradients are not",
                self.framework,
                self.job,
            )

    # ------------------------------------------------------------------ scalars
    def scalars(self, values: Mapping[str, Any] | None, *, strip: str = "") -> dict[str, Any]:
        """The numbers among a framework's logged values, ready for `Hook.record_scalars`.

        Numbers become floats; one-element tensors and arrays stay as they are (the hook copies
        torch tensors with the step's statistics, without a device sync here). Anything else
        (strings, lists, bigger tensors) is left out, with a message once per name. `strip`: a
        prefix removed from names ("eval_" for the Hugging Face Trainer's evaluation metrics).
        """
        out: dict[str, Any] = {}
        for name, value in (values or {}).items():
            key = str(name)
            if strip and key.startswith(strip):
                key = key[len(strip) :]
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, numbers.Real):
                out[key] = float(value)
                continue
            size = getattr(value, "numel", None) or getattr(value, "size", None)
            try:
                n = size() if callable(size) else size
            except Exception:  # noqa: BLE001
                n = None
            if n == 1 and hasattr(value, "dtype"):
                kind = str(value.dtype)
                if "complex" not in kind and "str" not in kind and "bool" not in kind:
                    out[key] = (
                        value if type(value).__module__.startswith("torch") else float(value.reshape(-1)[0])
                    )
                    continue
            self.say_once(
                f"scalar-{key}",
                "tensorpulse: %s metric %r is not a number (%s): not sent",
                self.framework,
                name,
                type(value).__name__,
            )
        return out

    # ------------------------------------------------------------------ stop
    def stop_requested(self) -> bool:
        """True once a stop action for the job arrived (said once, with what happens next)."""
        hook = self.hook
        if hook is None or not hook.should_stop:
            return False
        self.say_once(
            "stop",
            "tensorpulse: a stop action arrived for job %s: stopping %s training",
            self.job,
            self.framework,
        )
        return True


def never_raises(method: F) -> F:
    """Wrap a callback method: an exception is logged once per method and swallowed.

    Why: a monitoring failure must not end a training run (smdebug disabled itself; Lightning's
    and Hugging Face's loggers log and go on). The hook itself already never raises after its
    constructor; this covers the adapter code around it (a framework object shaped unexpectedly).
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never raise into training
            core: CallbackCore | None = getattr(self, "core", None)
            msg = "tensorpulse: %s.%s failed, training goes on: %r"
            if core is None:
                log.warning(msg, type(self).__name__, method.__name__, exc)
            else:
                core.say_once(f"error-{method.__name__}", msg, type(self).__name__, method.__name__, exc)
            return None

    return wrapper  # type: ignore[return-value]


__all__ = ["CallbackCore", "never_raises"]
