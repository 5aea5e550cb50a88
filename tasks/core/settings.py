"""The base of every task config: frozen once parsed, changed only through `with_changes`.

A config that could be changed after validation would let a derived value (a setting one part of the
workflow puts on another) skip the rules a written value must meet. So every config is frozen, and a
change is a new config validated from what was written plus the change. Values a config derives from
others (a strategy `auto`, a default window) are derived again from the changed values, never kept
from the old ones."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The fields the input set (before anything was derived), so `with_changes` can derive again.
    _written: frozenset = PrivateAttr(default=frozenset())

    def derived_fields(self) -> dict:
        """Values this config derives from its other fields, computed on the validated config. They
        are stored as if written (so they are part of a node's key and the workers see them as they
        are) and validated with the rest; subclasses override this."""
        return {}

    @model_validator(mode="wrap")
    @classmethod
    def _derive_then_validate(cls, data: Any, handler):
        if isinstance(data, cls):
            return data
        written = frozenset(data) if isinstance(data, dict) else frozenset()
        model = handler(data)
        derived = model.derived_fields()
        if derived:  # validated again as a whole, so a derived value meets every rule a written one does
            model = handler({**data, **derived})
        model._written = written
        return model

    def written(self) -> dict:
        """The fields as written (with the workflow's values filled in), without the derived ones."""
        names = {name for name, info in type(self).model_fields.items()
                 if name in self._written or (info.alias and info.alias in self._written)}
        return self.model_dump(include=names, by_alias=True)

    def with_changes(self, **changes):
        """This config with `changes`, validated again by every rule (a `pydantic.ValidationError` names
        the rule a change breaks), derived values derived again from the changed fields."""
        return type(self).model_validate({**self.written(), **changes})


class OnOneDevice:
    """A config with a `device` field (auto | cpu | cuda | cuda:N) for a node that runs in one process."""

    device: str

    def run_device(self, gpu_available: bool) -> str:
        """The device name the node runs on: `auto` is the GPU when there is one. The plan passes the
        workflow's resources.use_gpu, the node whether this process sees a GPU."""
        if self.device == "auto":
            return "cuda" if gpu_available else "cpu"
        return self.device
