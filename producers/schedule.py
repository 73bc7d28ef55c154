"""Which steps a hook saves: SageMaker Debugger's SaveConfig semantics, per mode.

A hook asks `should_save(step, mode)` before doing any work for a step, so the check must
be cheap: it is a few integer comparisons and one frozenset lookup.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from tensorpulse.wire import MODES


class SaveConfigMode(BaseModel):
    """The schedule of one mode.

    A step is saved if it is in `save_steps`, or if `start_step <= step < end_step` (no upper
    bound when `end_step` is None) and `(step - start_step) % save_interval == 0`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    save_interval: int = Field(default=1, ge=1)
    start_step: int = Field(default=0, ge=0)
    end_step: int | None = Field(default=None, ge=0)
    save_steps: frozenset[int] = frozenset()

    @field_validator("save_steps", mode="before")
    @classmethod
    def _steps(cls, value: object) -> object:
        if value is None:
            return frozenset()
        if isinstance(value, int):
            value = (value,)
        steps = frozenset(value)  # type: ignore[arg-type]
        if any(isinstance(s, int) and s < 0 for s in steps):
            raise ValueError(f"save_steps must be steps >= 0, got {sorted(steps)}")
        return steps

    def matches(self, step: int) -> bool:
        """True if `step` is saved under this schedule."""
        if step in self.save_steps:
            return True
        if step < self.start_step or (self.end_step is not None and step >= self.end_step):
            return False
        return (step - self.start_step) % self.save_interval == 0


class SaveConfig(SaveConfigMode):
    """The default schedule plus optional per-mode overrides (`modes={"eval": SaveConfigMode(...)}`).

    Modes without an override use the default fields of this object; an override's own unset
    fields take SaveConfigMode's defaults (they are not inherited), as in smdebug. smdebug's
    spelling is accepted too: `mode_save_configs={"TRAIN": {...}}` (mode names in any case).
    """

    modes: Mapping[str, SaveConfigMode] = Field(
        default_factory=dict, validation_alias=AliasChoices("modes", "mode_save_configs")
    )

    @field_validator("modes", mode="before")
    @classmethod
    def _modes(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        out = {}
        for mode, cfg in value.items():
            key = str(getattr(mode, "name", mode)).lower()  # "TRAIN" or an enum member
            if key not in MODES:
                raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
            out[key] = cfg
        return out

    def for_mode(self, mode: str) -> SaveConfigMode:
        """The schedule that applies to `mode`."""
        return self.modes.get(mode, self)

    def should_save(self, step: int, mode: str = "train") -> bool:
        """True if `step` of `mode` is to be captured and published."""
        override = self.modes.get(mode)
        return (self if override is None else override).matches(step)
