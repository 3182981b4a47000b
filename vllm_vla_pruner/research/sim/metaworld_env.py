"""Meta-World environments as the embedded VLA sees them: one fixed camera, one instruction.

The camera is a free MuJoCo camera framed tightly on the workspace from the robot's right side
(+x), looking down at 62 degrees (from -x, the arm's elbow hides the gripper), so
at 64 px the gripper, drawer/window handles, button and goal ball span several 8-px patches
(Meta-World's own corner cameras show them as 1-3 px dots). Frames are rendered at twice the
model resolution with shadows and reflections off, then area-averaged down (anti-aliasing).

Goals are sampled from each task's own random-reset space with a seeded generator: training
uses seeds ``[0, EVAL_SEED_OFFSET)``, evaluation seeds from ``EVAL_SEED_OFFSET`` up, so
evaluation goals are held out.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# MuJoCo picks its GL backend when first imported: import this module before mujoco/metaworld
# (or export MUJOCO_GL=egl) on headless machines.
os.environ.setdefault("MUJOCO_GL", "egl")

# Task name -> natural-language instruction (Meta-World ships none).
TASK_INSTRUCTIONS: dict[str, str] = {
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "button-press-topdown-v3": "press the button down",
    "handle-press-v3": "press the handle down",
    "handle-pull-v3": "pull the handle up",
    "reach-v3": "reach the red ball",
}
# The embedded model's tasks. reach-v3 is available but left out: its goal ball is ~2 px and
# its height is ambiguous from one camera.
DEFAULT_TASKS: tuple[str, ...] = (
    "drawer-open-v3",
    "drawer-close-v3",
    "window-open-v3",
    "window-close-v3",
    "button-press-topdown-v3",
    "handle-press-v3",
    "handle-pull-v3",
)
# Pairs that share a scene and differ in the instruction.
INSTRUCTION_PAIRS: tuple[tuple[str, str], ...] = (
    ("drawer-open-v3", "drawer-close-v3"),
    ("window-open-v3", "window-close-v3"),
    ("handle-press-v3", "handle-pull-v3"),
)
EVAL_SEED_OFFSET = 100_000
# Validation goals: for choosing checkpoints and settings; never trained on, never reported.
VAL_SEED_OFFSET = 50_000
DEFAULT_MAX_STEPS = 200
ACTION_DIM = 4  # xyz hand delta + gripper effort, each in [-1, 1]


@dataclass(frozen=True)
class CameraSpec:
    """A free MuJoCo camera: looks at ``lookat`` from ``distance`` along azimuth/elevation."""

    lookat: tuple[float, float, float] = (-0.08, 0.66, 0.2)
    distance: float = 0.75
    azimuth: float = 178.0
    elevation: float = -62.0


DEFAULT_CAMERA = CameraSpec()
# The wrist view of the OFT-style policy: Meta-World's camera fixed to the gripper, looking
# ahead and down past the fingers (the target object fills the view as the hand approaches).
WRIST_CAMERA = "gripperPOV"
PROPRIO_DIM = 4  # hand xyz + gripper opening (the first four entries of Meta-World's obs)


def _preload_llvm_users() -> None:
    """Import triton before Mesa's EGL driver is loaded: both bundle LLVM, and loading
    triton's native library *after* the first render segfaults (seen with torch 2.13)."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - only an ordering precaution
            pass


def _import_metaworld() -> tuple[Any, Any]:
    from metaworld.env_dict import ENV_CLS_MAP
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_CLS_MAP, ENV_POLICY_MAP


_RENDERERS: dict[tuple[str, int], Any] = {}
_atexit_registered = False


def _close_renderers() -> None:
    # Close while EGL is still alive; a renderer collected at interpreter shutdown raises.
    while _RENDERERS:
        try:
            _RENDERERS.popitem()[1].close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _shared_renderer(task: str, side: int, model: Any) -> Any:
    """One MuJoCo renderer per (task, frame size), shared by every env of that task.

    A renderer is an EGL context of ~150 MB against ~45 MB for the env itself, and lockstep
    evaluations keep one env per episode alive. Sharing is exact: a task's envs differ only
    in body positions, which reach the scene through each env's own ``data`` (frames are
    byte-identical to an env's own renderer; ``test_shared_renderer_frames_are_exact``)."""
    import mujoco

    global _atexit_registered
    key = (task, side)
    if key not in _RENDERERS:
        _RENDERERS[key] = mujoco.Renderer(model, side, side)
        if not _atexit_registered:
            # Registered after MuJoCo's own EGL atexit hook so that it runs before it (LIFO).
            atexit.register(_close_renderers)
            _atexit_registered = True
    return _RENDERERS[key]


class MetaWorldTask:
    """One Meta-World task with a fixed camera, seeded goals and its scripted expert."""

    def __init__(
        self,
        task: str,
        image_size: int = 64,
        camera: CameraSpec = DEFAULT_CAMERA,
        supersample: int = 2,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        import mujoco

        if task not in TASK_INSTRUCTIONS:
            raise KeyError(f"unknown task {task!r}; known: {sorted(TASK_INSTRUCTIONS)}")
        _preload_llvm_users()
        env_cls, policy_map = _import_metaworld()
        self.task = task
        self.instruction = TASK_INSTRUCTIONS[task]
        self.image_size = image_size
        self.supersample = max(1, supersample)
        self.max_steps = max_steps
        self.env = env_cls[task]()
        # What MT benchmarks do: goal-observable state (the expert reads the goal from it).
        self.env._set_task_called = True
        self.env._partially_observable = False
        # The observation bounds are a cached property computed while the goal was hidden.
        self.env.__dict__.pop("sawyer_observation_space", None)
        self.env._freeze_rand_vec = True
        self.expert = policy_map[task]()
        self.renderer = _shared_renderer(task, image_size * self.supersample, self.env.model)
        flags = self.renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.camera.lookat[:] = camera.lookat
        self.camera.distance = camera.distance
        self.camera.azimuth = camera.azimuth
        self.camera.elevation = camera.elevation
        self.obs: np.ndarray | None = None
        self.steps = 0

    def reset(self, seed: int) -> np.ndarray:
        """Start an episode whose goal/object positions are drawn from ``seed``."""
        space = self.env._random_reset_space
        rng = np.random.default_rng(seed)
        self.env._last_rand_vec = rng.uniform(space.low, space.high)
        self.obs, _ = self.env.reset()
        self.steps = 0
        return self.obs

    def render(self, camera: str | None = None) -> np.ndarray:
        """The current frame, uint8 ``(image_size, image_size, 3)``, from the fixed camera or
        the named MuJoCo camera (e.g. :data:`WRIST_CAMERA`)."""
        self.renderer.update_scene(self.env.data, camera=self.camera if camera is None else camera)
        img = self.renderer.render()
        s = self.supersample
        if s > 1:
            h = self.image_size
            img = img.reshape(h, s, h, s, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        return np.ascontiguousarray(img)

    def render_views(self) -> tuple[np.ndarray, np.ndarray]:
        """(fixed camera, wrist camera) frames: the OFT-style policy's two views, in order."""
        return self.render(), self.render(WRIST_CAMERA)

    def proprio(self) -> np.ndarray:
        """The robot state the OFT-style policy reads: hand xyz and gripper opening."""
        assert self.obs is not None, "reset() first"
        return np.asarray(self.obs[:PROPRIO_DIM], np.float32)

    def expert_action(self, obs: np.ndarray | None = None) -> np.ndarray:
        """The scripted expert's action for ``obs`` (default: the current state), clipped."""
        obs = self.obs if obs is None else obs
        return np.clip(self.expert.get_action(obs), -1.0, 1.0).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool, bool]:
        """Apply ``action``; returns ``(obs, success, done)`` (done = success or step cap)."""
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(-1)[:ACTION_DIM], -1, 1)
        self.obs, _, _, truncated, info = self.env.step(action)
        self.steps += 1
        success = bool(info.get("success", 0.0))
        done = success or truncated or self.steps >= self.max_steps
        return self.obs, success, done


_TASK_CACHE: dict[tuple[str, int], MetaWorldTask] = {}


def make_task(task: str, image_size: int = 64, **kwargs: Any) -> MetaWorldTask:
    """A cached :class:`MetaWorldTask` (envs are kept alive: closing them can break EGL).

    The step cap is set on every call (``max_steps``, default :data:`DEFAULT_MAX_STEPS`), so
    a cap an earlier caller chose never leaks into the next one's episodes."""
    key = (task, image_size)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = MetaWorldTask(task, image_size=image_size, **kwargs)
    env = _TASK_CACHE[key]
    env.max_steps = kwargs.get("max_steps") or DEFAULT_MAX_STEPS
    return env


_LOCKSTEP_POOL: dict[tuple[str, int], list[MetaWorldTask]] = {}


def lockstep_envs(
    pairs: Sequence[tuple[str, int]], image_size: int = 64, max_steps: int | None = None
) -> list[MetaWorldTask]:
    """One env per ``(task, seed)`` pair for lockstep roll-outs, pooled across calls."""
    used: dict[tuple[str, int], int] = {}
    envs = []
    for task, _ in pairs:
        key = (task, image_size)
        pool = _LOCKSTEP_POOL.setdefault(key, [])
        n = used.get(key, 0)
        if n == len(pool):
            pool.append(MetaWorldTask(task, image_size=image_size))
        env = pool[n]
        used[key] = n + 1
        env.max_steps = max_steps or DEFAULT_MAX_STEPS
        envs.append(env)
    return envs


def train_seeds(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def eval_seeds(n: int) -> list[int]:
    """Held-out goal seeds (never used for demonstrations or DAgger)."""
    return list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + n))


def val_seeds(n: int) -> list[int]:
    """Validation goal seeds: choose checkpoints and settings here, report on held-out ones."""
    return list(range(VAL_SEED_OFFSET, VAL_SEED_OFFSET + n))


GOAL_SETS = {"heldout": eval_seeds, "validation": val_seeds}
