"""Finished configurations of a closed-loop benchmark on disk, so a long run resumes.

A full registry table (every pruner at three keep ratios, 20 episodes per task) takes hours
on 2 cores; a run stopped by the clock must not lose the configurations it finished. Each
finished configuration is one JSON file under ``<out>/runs/<policy>/``: its per-episode
outcomes (what the paired CIs need), its engine counters, and the settings it ran under.
``--resume`` reuses a file only when those settings equal the new run's; anything else is
an error naming the setting, never a silently mixed table.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import EvalResult, TaskResult

__all__ = ["RunSettings", "RunStore", "model_identity"]


def model_identity(model_dir: Path) -> str:
    """``<dir name>@<sha256 prefix>`` of the checkpoint's config and weight files: a stored
    configuration belongs to the same weights wherever the checkout lives (an absolute path
    tied a store to one clone and broke when an asset was renamed)."""
    digest = hashlib.sha256()
    files = [model_dir / "config.json"] + sorted(
        f for f in model_dir.iterdir() if f.suffix in (".safetensors", ".pt", ".bin")
    )
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{model_dir.name}@{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class RunSettings:
    """What must match for a saved configuration to join a new run's table."""

    model: str
    goals: str
    tasks: tuple[str, ...]
    episodes_per_task: int
    execute_steps: int
    max_steps: int | None
    pruning: tuple[tuple[str, Any], ...]  # the engine's resolved settings, sorted

    @classmethod
    def of(cls, **kw: Any) -> RunSettings:
        kw["tasks"] = tuple(kw["tasks"])
        kw["pruning"] = tuple(sorted(dict(kw["pruning"]).items()))
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"], d["pruning"] = list(self.tasks), dict(self.pruning)
        return d


def _result_from_json(d: dict[str, Any]) -> EvalResult:
    tasks = {name: TaskResult(**{**t, "ci95": tuple(t["ci95"])}) for name, t in d["tasks"].items()}
    return EvalResult(**{**d, "tasks": tasks, "ci95": tuple(d["ci95"])})


class RunStore:
    """One policy's finished configurations under ``root`` (``<out>/runs/<policy>``)."""

    def __init__(self, root: Path, settings: RunSettings, resume: bool) -> None:
        self.root, self.settings = root, settings
        self.invocation = uuid.uuid4().hex[:12]  # this process's runs, side by side in time
        root.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run never mixes with an older one's files
            for f in root.glob("*.json"):
                f.unlink()

    def _path(self, method: str, keep: float) -> Path:
        return self.root / f"{method}@{keep:g}.json"

    def save(self, record: Any) -> None:
        """Write a finished ``ChunkRunRecord`` (everything but episode 0's frames)."""
        body = {
            "settings": self.settings.to_json(),
            "method": record.method,
            "keep_ratio": record.keep_ratio,
            "invocation": record.invocation or self.invocation,
            "result": record.result.to_dict(),
            "engine_seconds": record.engine_seconds,
            "engine_calls": record.engine_calls,
            "requests": record.requests,
            "pruned_requests": record.pruned_requests,
            "visual_kept": record.visual_kept,
            "visual_total": record.visual_total,
            "chunk_shapes": sorted(list(s) for s in record.chunk_shapes),
            "action_min": None if record.action_min is None else record.action_min.tolist(),
            "action_max": None if record.action_max is None else record.action_max.tolist(),
        }
        tmp = self._path(record.method, record.keep_ratio).with_suffix(".tmp")
        tmp.write_text(json.dumps(body) + "\n")
        tmp.replace(self._path(record.method, record.keep_ratio))  # never a half-written file

    def load(self, method: str, keep: float, record_cls: type) -> Any | None:
        """The saved record of ``(method, keep)``, or None; a file saved under other settings
        is refused with the first setting that differs."""
        path = self._path(method, keep)
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        saved, now = body["settings"], self.settings.to_json()
        for key, value in now.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"--resume: {path} was run with {key}={saved.get(key)!r}, this run has "
                    f"{key}={value!r}; use another --out or run without --resume"
                )
        arr = lambda v: None if v is None else np.asarray(v, np.float32)  # noqa: E731
        return record_cls(
            method=body["method"],
            keep_ratio=body["keep_ratio"],
            result=_result_from_json(body["result"]),
            engine_seconds=body["engine_seconds"],
            engine_calls=body["engine_calls"],
            requests=body["requests"],
            pruned_requests=body["pruned_requests"],
            visual_kept=body["visual_kept"],
            visual_total=body["visual_total"],
            chunk_shapes={tuple(s) for s in body["chunk_shapes"]},
            action_min=arr(body["action_min"]),
            action_max=arr(body["action_max"]),
            invocation=body.get("invocation", ""),
        )
