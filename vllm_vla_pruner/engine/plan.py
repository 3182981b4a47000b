"""What the engine decided for a request (the plan) and what the forward did (the outcome).

Both cross process lines, so each is a frozen dataclass with an explicit wire form:

* :class:`PruningPlan` is made once per request in the engine-core process (scheduler hook)
  and travels to the worker inside ``SamplingParams.extra_args[KEY_PLAN]`` as a tuple of
  primitives (``to_wire`` / ``from_wire``), which every vLLM serialiser carries unchanged.
* :class:`PruneOutcome` is made by the worker's forward for the request's prefill. It rides
  back to the scheduler on the step's ``ModelRunnerOutput`` and from there to the client with
  the final output (``kv_transfer_params["vla_pruner"]``, merged beside a KV connector's own
  entries), as a plain dict (``to_public`` / ``from_public``).

The response's kept-token counts come from the outcome, never from the plan: a plan says what
should happen, only the forward can say that it did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any

#: Attribute of a ``ModelRunnerOutput`` that carries the step's outcomes (worker -> scheduler).
OUTCOMES_ATTR = "vla_pruner_outcomes"
#: Key of the outcome in the final output's ``kv_transfer_params`` (scheduler -> client).
PUBLIC_KEY = "vla_pruner"


@dataclass(frozen=True)
class PruningPlan:
    """The scheduler's decision for one request; ``prune`` False runs the frame unpruned."""

    method: str
    keep_ratio: float
    num_visual: int  # M
    visual_start: int  # row of the first visual token (after BOS)
    num_keep: int  # M' (== M when not pruning)
    prune: bool
    warmup: bool  # a session's first `window` frames run unpruned to fill its history
    session: str | None
    new_episode: bool
    track_actions: bool  # this frame's action attention goes into the session's history
    expects_history: bool  # the frame counter says the session's history should be warm
    seed: int  # the `random` pruner's seed

    @property
    def pruned_slots(self) -> int:
        """P: KV slots that layers >= K do not need for this request."""
        return self.num_visual - self.num_keep if self.prune else 0

    def to_wire(self) -> tuple[Any, ...]:
        return astuple(self)

    @classmethod
    def from_wire(cls, wire: Any) -> PruningPlan:
        if isinstance(wire, cls):
            return wire
        if not isinstance(wire, (tuple, list)) or len(wire) != len(fields(cls)):
            raise TypeError(f"not a wire-form PruningPlan: {wire!r}")
        return cls(*wire)


@dataclass(frozen=True)
class PruneOutcome:
    """What the forward actually did for one request (worker-reported).

    ``pruned``: layers >= K ran on ``visual_tokens_kept`` of ``visual_tokens_total`` visual
    tokens. ``used_history``: the selection used the session's smoothed action scores.
    ``history_missing``: the plan expected a warm history but the worker had none (evicted by
    the session limit or idle timeout, or the worker restarted); the frame was pruned by the
    method's semantic half alone. ``recomputed``: the request was preempted and re-prefilled;
    its action attention was not recorded.
    """

    pruned: bool
    visual_tokens_total: int
    visual_tokens_kept: int
    used_history: bool = False
    history_missing: bool = False
    recomputed: bool = False


@dataclass(frozen=True)
class PruningResult:
    """A finished request's plan and outcome, as the client receives them."""

    method: str
    keep_ratio: float
    warmup: bool
    planned_keep: int
    outcome: PruneOutcome | None  # None: the request never reached its prefill forward

    def to_public(self) -> dict[str, Any]:
        return asdict(self)  # the outcome nested as a dict, or None

    @classmethod
    def from_public(cls, raw: Any) -> PruningResult | None:
        """The result in a final output's ``kv_transfer_params``, or None if it has none."""
        if not isinstance(raw, Mapping):
            return None
        item = raw.get(PUBLIC_KEY)
        if not isinstance(item, Mapping):
            return None
        outcome = item.get("outcome")
        return cls(
            method=str(item["method"]),
            keep_ratio=float(item["keep_ratio"]),
            warmup=bool(item["warmup"]),
            planned_keep=int(item["planned_keep"]),
            outcome=None if outcome is None else PruneOutcome(**outcome),
        )


# ----------------------------------------------------------------------------- action chunks

#: Attribute of a ``ModelRunnerOutput`` that carries the step's action chunks.
CHUNKS_ATTR = "vla_pruner_chunks"
#: Key of the chunk in the final output's ``kv_transfer_params`` (scheduler -> client).
ACTIONS_KEY = "vla_actions"
#: Per-request robot state (proprio) in ``SamplingParams.extra_args``, raw (un-normalised).
KEY_STATE = "vla_state"


@dataclass(frozen=True)
class ActionChunk:
    """A parallel-decoding model's continuous action chunk, computed by the request's
    forward (worker-reported, un-normalised), row-major ``chunk`` x ``action_dim``.

    ``error`` is set (and ``values`` empty) when the forward could not compute it, e.g. a
    missing or wrong-length state that skipped the API's validation."""

    chunk: int
    action_dim: int
    values: tuple[float, ...]
    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is None and len(self.values) != self.chunk * self.action_dim:
            raise ValueError(
                f"{len(self.values)} values for a {self.chunk} x {self.action_dim} chunk"
            )

    def rows(self) -> list[list[float]]:
        d = self.action_dim
        return [list(self.values[i * d : (i + 1) * d]) for i in range(self.chunk)]

    def to_public(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "action_dim": self.action_dim,
            "actions": self.rows(),
            "error": self.error,
        }

    @classmethod
    def from_public(cls, raw: Any) -> ActionChunk | None:
        """The chunk in a final output's ``kv_transfer_params``, or None if it has none."""
        if not isinstance(raw, Mapping):
            return None
        item = raw.get(ACTIONS_KEY)
        if not isinstance(item, Mapping):
            return None
        values = tuple(float(x) for row in item["actions"] for x in row)
        return cls(int(item["chunk"]), int(item["action_dim"]), values, item.get("error"))
