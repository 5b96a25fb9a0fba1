"""How a tunable travels: declared once, updated in part.

Every method states its tunables once, in one pydantic model (``SFTMethodConfig``,
``AlignMethodConfig``, ...), with type, default, bounds and description, as trl's config dataclasses
do. The use-case schema is made of those models; a profile, a file layered over it, a CLI
``--override``, a ladder rung and a Dagster run config are all *partial updates* of them: a mapping
of some field names to new values, applied with :meth:`Tunables.updated`, which validates the result
(so an update can never produce a config the declaration forbids). There is no second schema and no
sentinel "unset" value: a field not given is simply not in the update.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import copy
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, create_model


class Tunables(BaseModel):
    """A frozen, strict group of tunables (unknown names are errors, never ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updated(self, changes: Mapping[str, Any] | BaseModel | None = None) -> Self:
        """This config with ``changes`` (a partial update) applied and validated again."""
        changes = given(changes) if isinstance(changes, BaseModel) else dict(changes or {})
        if not changes:
            return self
        return type(self).model_validate({**self.model_dump(), **changes})

    @classmethod
    def partial(cls, name: str | None = None):
        """A model of the same fields, each optional (None: not part of the update), with the
        declaration's bounds and descriptions."""
        fields = {}
        for field_name, info in cls.model_fields.items():
            optional = copy(info)
            optional.default = None
            optional.default_factory = None
            fields[field_name] = (info.annotation | None, optional)
        return create_model(
            name or f"{cls.__name__}Update",
            __base__=_Partial,
            __doc__=f"A partial update of {cls.__name__}: the fields given replace its values.",
            **fields,
        )


class _Partial(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def given(update: BaseModel | Mapping | None) -> dict:
    """The fields an update sets (``None`` fields are not part of it)."""
    if update is None:
        return {}
    if isinstance(update, BaseModel):
        return update.model_dump(exclude_none=True)
    return {k: v for k, v in update.items() if v is not None}
