"""ActionHistory: decay order and exact weights, warm-up, reset, LRU and idle eviction."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_vla_pruner.pruning import ActionHistory, debug_checks, decay_weights


@pytest.fixture(autouse=True, scope="module")
def _value_checks_on():
    """These tests exercise the value checks, which the engine's path runs only in debug."""
    with debug_checks():
        yield


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def onehot(i: int, m: int = 4) -> torch.Tensor:
    x = torch.zeros(m)
    x[i] = 1.0
    return x


def test_exact_weights_w3_gamma08_newest_first():
    want = torch.tensor([1.0, 0.8, 0.64]) / 2.44
    torch.testing.assert_close(decay_weights(3, 0.8), want)
    h = ActionHistory(window=3, gamma=0.8)
    torch.testing.assert_close(h.weights, want)
    for i in range(3):  # frame i puts its mass on token i: oldest 0, newest 2
        h.push("ep", onehot(i))
    est = h.estimate("ep")
    torch.testing.assert_close(est, torch.tensor([0.64, 0.8, 1.0, 0.0]) / 2.44)
    assert est[2] > est[1] > est[0]  # newest weighted most (not the reference code's order)


def test_window_slides():
    h = ActionHistory(window=3, gamma=0.8)
    for i in range(4):
        h.push("ep", onehot(i))
    assert h.num_frames("ep") == 3
    torch.testing.assert_close(h.estimate("ep"), torch.tensor([0.0, 0.64, 0.8, 1.0]) / 2.44)


def test_warm_up_and_reset():
    h = ActionHistory(window=3)
    assert h.estimate("ep") is None and not h.is_warm("ep") and h.num_frames("ep") == 0
    for n in range(1, 3):
        h.push("ep", torch.rand(5))
        assert h.num_frames("ep") == n and not h.is_warm("ep") and h.estimate("ep") is None
    h.push("ep", torch.rand(5))
    assert h.is_warm("ep") and h.estimate("ep") is not None
    h.reset("ep")
    assert h.num_frames("ep") == 0 and h.estimate("ep") is None and "ep" not in h
    h.reset("never-seen")  # no-op
    h.push("ep", torch.rand(7))  # new episode may change M
    assert h.num_frames("ep") == 1


def test_gamma_one_is_plain_mean_and_window_one_is_last():
    h = ActionHistory(window=2, gamma=1.0)
    h.push("a", torch.tensor([1.0, 0.0]))
    h.push("a", torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(h.estimate("a"), torch.tensor([0.5, 1.5]))
    h1 = ActionHistory(window=1)
    h1.push("a", torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(h1.estimate("a"), torch.tensor([2.0, 1.0]))


def test_sessions_are_independent_and_inputs_copied():
    h = ActionHistory(window=1)
    x = torch.tensor([1.0, 2.0])
    h.push("a", x)
    h.push("b", torch.tensor([5.0, 6.0, 7.0]))
    x.zero_()  # caller mutating its buffer must not change the history
    torch.testing.assert_close(h.estimate("a"), torch.tensor([1.0, 2.0]))
    assert h.estimate("b").shape == (3,)
    assert sorted(h.sessions()) == ["a", "b"] and len(h) == 2


def test_lru_eviction():
    clock = FakeClock()
    h = ActionHistory(window=1, max_sessions=2, clock=clock)
    h.push("a", torch.ones(2))
    clock.t += 1
    h.push("b", torch.ones(2))
    clock.t += 1
    h.estimate("a")  # touch a: b is now least recently used
    clock.t += 1
    h.push("c", torch.ones(2))
    assert h.sessions() == ["a", "c"]
    h.num_frames("a")  # a peek does not refresh
    h.push("d", torch.ones(2))
    assert h.sessions() == ["c", "d"] and len(h) == 2


def test_idle_timeout_eviction_with_fake_clock():
    clock = FakeClock()
    h = ActionHistory(window=2, idle_timeout_s=10.0, clock=clock)
    h.push("a", torch.ones(3))
    h.push("b", torch.ones(3))
    clock.t += 6
    h.push("a", torch.ones(3))  # refresh a
    clock.t += 6  # b idle 12 s, a idle 6 s
    assert h.sessions() == ["a"]
    assert h.num_frames("a") == 2 and h.num_frames("b") == 0
    clock.t += 10  # a idle exactly 16 s > timeout
    assert len(h) == 0 and h.estimate("a") is None
    h2 = ActionHistory(idle_timeout_s=math.inf, clock=clock)
    h2.push("x", torch.ones(1))
    clock.t += 1e12
    assert h2.num_frames("x") == 1


def test_errors():
    h = ActionHistory(window=3)
    h.push("a", torch.ones(4))
    with pytest.raises(ValueError, match="4"):
        h.push("a", torch.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        h.push("a", torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        h.push("a", torch.ones(2, 2))
    assert h.num_frames("a") == 1  # rejected frames are not stored
    for kwargs in (
        dict(window=0),
        dict(gamma=0.0),
        dict(gamma=1.5),
        dict(max_sessions=0),
        dict(idle_timeout_s=0.0),
        dict(idle_timeout_s=float("nan")),
    ):
        with pytest.raises(ValueError):
            ActionHistory(**kwargs)


def test_thread_safety_smoke():
    h = ActionHistory(window=3, max_sessions=8)
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            for i in range(200):
                sid = f"s{(tid * 7 + i) % 12}"
                h.push(sid, torch.full((16,), float(i)))
                h.estimate(sid)
                if i % 17 == 0:
                    h.reset(sid)
                h.sessions()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(h) <= 8


@settings(max_examples=40, deadline=None)
@given(
    window=st.integers(1, 5),
    gamma=st.floats(0.05, 1.0),
    frames=st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=0, max_size=8),
)
def test_estimate_matches_formula(window, gamma, frames):
    h = ActionHistory(window=window, gamma=gamma)
    for f in frames:
        h.push("ep", torch.tensor(f))
    est = h.estimate("ep")
    if len(frames) < window:
        assert est is None
        return
    recent = frames[-window:][::-1]  # newest first
    w = [gamma**i for i in range(window)]
    want = [sum(wi * fr[j] for wi, fr in zip(w, recent, strict=True)) / sum(w) for j in range(3)]
    torch.testing.assert_close(est, torch.tensor(want), atol=1e-5, rtol=1e-5)
