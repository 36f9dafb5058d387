"""``PruningPlan``: what every method emits and the surgery applies.

A plan lists, per group (named after its first producing layer), which of the group's original
channels are kept, which removed channels are *merged* into a kept one (their consumers' input
slices are added to the kept channel's slice, see :func:`prunekit.engine.surgery.apply_plan`)
and, optionally, replacement weights for the group's consumers (reconstruction). Channel indices
always refer to the model the plan is applied to. Groups are applied in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


class PlanError(ConfigError):
    """A plan that does not fit the model (unknown group, wrong size, bad indices)."""


@dataclass
class GroupPlan:
    """The decision for one group.

    Attributes
    ----------
    group : str
        Name of the group (its first producing layer).
    size : int
        Number of channels the group has before surgery.
    keep : list[int]
        Channels kept, ascending. Empty: the group vanishes (a residual branch removed whole,
        :mod:`prunekit.engine.depth`); such groups are applied after all the others.
    merge : dict[int, list[int]]
        Kept channel -> removed channels folded into it (centripetal S4).
    reconstruct : dict[str, dict[str, Tensor | None]]
        Consumer layer name -> ``{"weight": W, "bias": b}`` written after the removal; ``W`` has
        the consumer's shape after surgery (input columns = kept channels only).
    """

    group: str
    size: int
    keep: list[int]
    merge: dict[int, list[int]] = field(default_factory=dict)
    reconstruct: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = sorted(int(k) for k in self.keep)
        self.merge = {int(k): sorted(int(m) for m in v) for k, v in self.merge.items() if v}
        self.validate()

    @property
    def remove(self) -> list[int]:
        kept = set(self.keep)
        return [c for c in range(self.size) if c not in kept]

    def validate(self) -> None:
        if not self.keep:
            if self.merge:
                raise PlanError(f"group {self.group!r}: a group that keeps no channel merges none")
            return
        if len(set(self.keep)) != len(self.keep) or self.keep[0] < 0 or self.keep[-1] >= self.size:
            raise PlanError(f"group {self.group!r}: kept channels must be distinct and in [0, {self.size})")
        kept = set(self.keep)
        seen: set[int] = set()
        for k, members in self.merge.items():
            if k not in kept:
                raise PlanError(f"group {self.group!r}: merge target {k} is not a kept channel")
            for m in members:
                if m in kept or m in seen or not 0 <= m < self.size:
                    raise PlanError(f"group {self.group!r}: channel {m} cannot be merged into {k} "
                                    "(kept, merged twice or out of range)")
                seen.add(m)

    def to_dict(self, include_weights: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"group": self.group, "size": self.size, "keep": list(self.keep)}
        if self.merge:
            d["merge"] = {str(k): list(v) for k, v in self.merge.items()}
        if self.reconstruct:
            d["reconstruct"] = (
                {name: {k: (v.tolist() if v is not None else None) for k, v in w.items()}
                 for name, w in self.reconstruct.items()}
                if include_weights else sorted(self.reconstruct))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupPlan:
        try:
            rec_raw = d.get("reconstruct", {})
            rec = ({name: {k: (torch.tensor(v) if v is not None else None) for k, v in w.items()}
                    for name, w in rec_raw.items()} if isinstance(rec_raw, dict) else {})
            return cls(group=str(d["group"]), size=int(d["size"]), keep=list(d["keep"]),
                       merge={int(k): list(v) for k, v in d.get("merge", {}).items()},
                       reconstruct=rec)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed group plan: {exc}") from exc


@dataclass
class PruningPlan:
    """An ordered list of :class:`GroupPlan` plus free-form JSON metadata (method, options)."""

    groups: list[GroupPlan] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def widths(self) -> dict[str, tuple[int, int]]:
        """Group name -> (channels before, channels after)."""
        return {g.group: (g.size, len(g.keep)) for g in self.groups}

    def then(self, other: PruningPlan) -> PruningPlan:
        """This plan followed by ``other`` (whose indices refer to the model after this one)."""
        return PruningPlan(self.groups + other.groups, {**self.meta, **other.meta})

    def to_dict(self, include_weights: bool = False) -> dict[str, Any]:
        return {"version": 1, "meta": self.meta,
                "groups": [g.to_dict(include_weights) for g in self.groups]}

    def to_json(self, include_weights: bool = False) -> str:
        return json.dumps(self.to_dict(include_weights))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        if not isinstance(d, dict) or "groups" not in d:
            raise PlanError("not a pruning plan (no 'groups')")
        return cls([GroupPlan.from_dict(g) for g in d["groups"]], dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
