"""Run-config classes of the assets, the CLI and the re-adaptation sensor.

The adaptation and alignment run configs are not declared here: they are partial updates of the
methods' own configs (``SFTMethodConfig``, ``AlignMethodConfig``), derived from those declarations
field by field, so a tunable's type, bounds and description are stated once. Dagster's config system
has no Literal, so a Literal field travels as a string and is checked when the update is applied.
"""

from __future__ import annotations

import types
import typing
from copy import copy
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from lifecycle_dagster.ml.align import AlignMethodConfig
from lifecycle_dagster.ml.sft import SFTMethodConfig
from lifecycle_dagster.ml.tunables import Tunables

_SCALARS = (int, float, bool, str)


def _dagster_type(annotation) -> type | None:
    """The Dagster-config type a field travels as, or None when it cannot (lists of choices)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation in _SCALARS:
        return annotation
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and kinds <= set(_SCALARS) else None
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _dagster_type(args[0])
    if origin is list and len(args) == 1 and args[0] in _SCALARS:
        return annotation
    return None


def run_config_for(declaration: type[Tunables], name: str, doc: str) -> type[dg.Config]:
    """A Dagster run config whose fields are an optional update of ``declaration``'s: every one
    of them, so a ladder rung can change anything the use case sets."""
    fields = {}
    for field_name, info in declaration.model_fields.items():
        kind = _dagster_type(info.annotation)
        if kind is None:
            raise TypeError(f"{declaration.__name__}.{field_name} cannot travel in a run config")
        optional = copy(info)
        optional.default, optional.default_factory = None, None
        optional.description = f"{info.description} Unset: the use case's."
        fields[field_name] = (kind | None, optional)
    return create_model(name, __base__=dg.Config, __doc__=doc, **fields)


SFTAdapterConfig = run_config_for(
    SFTMethodConfig,
    "SFTAdapterConfig",
    "A partial update of the use case's adaptation for this run (the re-adaptation sensor sets it).",
)
AlignedModelConfig = run_config_for(
    AlignMethodConfig,
    "AlignedModelConfig",
    "A partial update of the use case's alignment for this run (the re-adaptation sensor sets it).",
)


class UseCaseConfig(dg.Config):
    profile: str = Field(default="tiny", description="Named preset (lifecycle_dagster/profiles).")
    use_case: str | None = Field(
        default=None,
        description="A packaged use case (lifecycle_dagster/usecases) or a YAML file, in place "
        "of the profile's own.",
    )
    use_case_file: str | None = Field(
        default=None, description="A use-case YAML, complete or layered over the profile's."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="A partial use case applied last, e.g. {adaptation: {max_steps: 10}}.",
    )
