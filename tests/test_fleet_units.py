"""Fast checks of the fleet's pieces that need no Ray: config validation, the hash ring,
the simulator's statistics and the metrics helpers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vllm_vla_pruner.metrics import IngressMetrics, ModelDims, ReplicaMetrics, flops_saved, render
from vllm_vla_pruner.research.bench.fleet_simulator import (
    PhaseResult,
    load_factor,
    percentile,
    robots_at_budget,
)
from vllm_vla_pruner.serve.config import FleetConfigError, load_config, parse_config
from vllm_vla_pruner.serve.hashring import HashRing, key_hash

# ----------------------------------------------------------------------------- config


def test_config_minimal_defaults() -> None:
    cfg = parse_config({"model": {"preset": "tiny"}})
    assert cfg.replica_count() == 1
    assert cfg.http.host == "127.0.0.1"
    assert cfg.routing.num_fallback_replicas >= 1
    assert cfg.model.checkpoint_dir().name == "tiny-seed0"


def test_config_full_yaml(tmp_path) -> None:
    p = tmp_path / "fleet.yaml"
    p.write_text(
        "name: robots\n"
        "model: {path: ckpt}\n"
        "autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}\n"
        "replica: {num_cpus: 2, max_ongoing_requests: 8, engine: {max_num_seqs: 8}}\n"
        "pruning: {method: vlapruner, keep_ratio: 0.25, layer: 2}\n"
        "http: {port: 9000}\n"
    )
    cfg = load_config(p)
    assert cfg.model.path == str((tmp_path / "ckpt").resolve())  # relative to the file
    assert cfg.replica_count() == 1 and cfg.max_replica_count() == 4
    assert cfg.local_num_cpus() >= 8
    assert cfg.pruning == {"method": "vlapruner", "keep_ratio": 0.25, "layer": 2}


def test_config_json_and_overrides(tmp_path) -> None:
    p = tmp_path / "fleet.json"
    p.write_text(json.dumps({"model": {"preset": "bench"}, "replicas": 2}))
    cfg = load_config(p, {"http": {"port": 1234}, "replicas": 3})
    assert cfg.http.port == 1234 and cfg.replica_count() == 3


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"model": {}}, "model"),
        ({"model": {"preset": "tiny", "path": "/x"}}, "model"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"model": {"preset": "tiny"}, "replicas": 0}, "replicas"),
        ({"model": {"preset": "tiny"}, "replica": {"num_cpu": 1}}, "replica.num_cpu"),
        ({"model": {"preset": "tiny"}, "replica": {"num_cpus": -1}}, "replica.num_cpus"),
        ({"model": {"preset": "tiny"}, "pruning": {"keep_ratio": 1.5}}, "keep_ratio"),
        ({"model": {"preset": "tiny"}, "pruning": {"method": "magic"}}, "method"),
        ({"model": {"preset": "tiny"}, "pruning": {"keep": 0.5}}, "keep"),
        ({"model": {"preset": "tiny"}, "replicas": 2, "autoscaling": {}}, "autoscaling"),
        (
            {"model": {"preset": "tiny"}, "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            "min_replicas",
        ),
        ({"model": {"preset": "tiny"}, "http": {"route_prefix": "api"}}, "route_prefix"),
        ({"model": {"preset": "tiny"}, "name": "a b"}, "name"),
        ({"model": {"preset": "tiny"}, "colour": "red"}, "colour"),
    ],
)
def test_config_rejects(data, names) -> None:
    with pytest.raises(FleetConfigError, match=names):
        parse_config(data)


def test_config_bad_files(tmp_path) -> None:
    with pytest.raises(FleetConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(FleetConfigError, match="not valid"):
        load_config(bad)
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(FleetConfigError, match="mapping"):
        load_config(top)


# ----------------------------------------------------------------------------- hashing

SESSIONS = [f"robot-{i}" for i in range(3000)]


def test_hash_is_stable_across_processes() -> None:
    # Pinned value: a different hash would remap every robot after an upgrade.
    assert key_hash("robot-0") == key_hash("robot-0")
    assert key_hash("robot-0") != key_hash("robot-1")
    assert 0 <= key_hash("x") < 2**64


def test_ring_assignment_stable_and_order_independent() -> None:
    a = HashRing(["r1", "r2", "r3"])
    b = HashRing(["r3", "r1", "r2"])
    assert [a.owner(s) for s in SESSIONS] == [b.owner(s) for s in SESSIONS]
    assert not a.rebuild(["r2", "r3", "r1"])  # same set: no rebuild


def test_ring_balance() -> None:
    ring = HashRing([f"r{i}" for i in range(4)])
    counts = Counter(ring.owner(s) for s in SESSIONS)
    assert set(counts) == {"r0", "r1", "r2", "r3"}
    assert max(counts.values()) < 1.5 * len(SESSIONS) / 4


def test_ring_minimal_movement_when_replica_leaves() -> None:
    ring = HashRing(["r1", "r2", "r3", "r4"])
    before = {s: ring.ranked(s, 2) for s in SESSIONS}
    ring.rebuild(["r1", "r2", "r4"])
    for s in SESSIONS:
        owner = ring.owner(s)
        if before[s][0] != "r3":
            assert owner == before[s][0], "a session not on the leaving replica moved"
        else:
            # The leaving replica's sessions go to their first fallback, nowhere else.
            assert owner == before[s][1]


def test_ring_minimal_movement_when_replica_joins() -> None:
    ring = HashRing(["r1", "r2", "r3"])
    before = {s: ring.owner(s) for s in SESSIONS}
    ring.rebuild(["r1", "r2", "r3", "r4"])
    moved = [s for s in SESSIONS if ring.owner(s) != before[s]]
    assert all(ring.owner(s) == "r4" for s in moved)
    assert 0.1 < len(moved) / len(SESSIONS) < 0.4  # ~1/4 move, only to the newcomer


def test_ring_ranked_fallbacks() -> None:
    ring = HashRing(["a", "b", "c"])
    r = ring.ranked("robot-7", 2)
    assert len(r) == 2 and len(set(r)) == 2
    assert ring.ranked("robot-7", 10) == ring.ranked("robot-7")  # capped at members
    assert set(ring.ranked("robot-7")) == {"a", "b", "c"}
    assert HashRing().ranked("x") == [] and HashRing().owner("x") is None
    with pytest.raises(ValueError):
        HashRing(virtual_nodes=0)


# ----------------------------------------------------------------------------- simulator


def _phase(mode: str, n: int, p95: float, errors: int = 0) -> PhaseResult:
    return PhaseResult(
        mode=mode, robots=n, hz=5.0, duration_s=10.0, requests=10, ok=10, errors=errors,
        deadline_misses=0, miss_rate=0.0, p50_ms=1.0, p95_ms=p95, p99_ms=p95, mean_ms=1.0,
        achieved_hz_mean=5.0, achieved_hz_min=5.0, replicas_used=1, warmup_frames=0,
        pruned_frames=0, error_samples=[],
    )  # fmt: skip


def test_percentile_matches_numpy_default() -> None:
    import numpy as np

    vals = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (50, 95, 99):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert percentile([], 50) is None


def test_robots_at_budget_interpolates() -> None:
    res = [_phase("pruned", 2, 50), _phase("pruned", 4, 150), _phase("pruned", 8, 400)]
    out = robots_at_budget(res, "pruned", 200)
    assert out["max_robots"] == 4 and not out["saturated_sweep"]
    # load factor: max(p95 / budget, 0.9 * C / achieved) = 0.9 at 4 robots, 2.0 at 8.
    assert load_factor(res[1], 200) == pytest.approx(0.9)
    assert out["interpolated"] == pytest.approx(4 + 4 * 0.1 / 1.1, abs=0.01)
    slow = _phase("slow", 2, 50)
    slow.achieved_hz_mean = 3.0  # latency fine, but the robots fell behind
    assert robots_at_budget([slow], "slow", 200)["max_robots"] == 0
    res_err = [_phase("x", 2, 50), _phase("x", 4, 60, errors=1)]
    assert robots_at_budget(res_err, "x", 200)["max_robots"] == 2


# ----------------------------------------------------------------------------- metrics


def test_flops_saved() -> None:
    dims = ModelDims(hidden=512, intermediate=1376, num_heads=8, num_kv_heads=8, num_layers=32)
    assert flops_saved(256, 256, dims, 29) == 0.0
    assert flops_saved(256, 64, dims, 0) == 0.0
    more = flops_saved(256, 32, dims, 29)
    less = flops_saved(256, 64, dims, 29)
    assert more > less > 0
    cfg = {"text_config": {"hidden_size": 128, "intermediate_size": 256,
                           "num_attention_heads": 4, "num_key_value_heads": 2,
                           "num_hidden_layers": 6}}  # fmt: skip
    assert ModelDims.from_config(cfg) == ModelDims(128, 256, 4, 2, 6)


def test_metrics_render_and_worker_deltas() -> None:
    ing = IngressMetrics()
    ing.observe("/v1/actions", 200, 0.05)
    ing.observe("/v1/actions", 422, 0.001, "invalid_request")
    text = render(ing.registry).decode()
    assert 'vla_ingress_requests_total{route="/v1/actions",status="422"} 1.0' in text
    assert "vla_ingress_request_latency_seconds_bucket" in text

    rep = ReplicaMetrics(replica="abc")
    dims = ModelDims(128, 256, 4, 2, 6)
    assert rep.observe_pruning("vlapruner", 64, 16, False, dims, 3) > 0
    rep.observe_pruning("vlapruner", 64, 64, True, dims, 3)
    rep.observe_worker_report({"stats": {"warmup_frames": 3, "select_seconds": 0.5}})
    rep.observe_worker_report({"stats": {"warmup_frames": 5, "select_seconds": 0.7}})
    rep.observe_worker_report({"stats": {"warmup_frames": 1}, "sessions": 2})  # restart
    text = render(rep.registry).decode()
    assert "vla_worker_warmup_frames_total 6.0" in text
    assert 'vla_visual_tokens_kept_total{method="vlapruner"} 80.0' in text
    assert "vla_warmup_frames_total 1.0" in text
    assert "vla_worker_sessions 2.0" in text
