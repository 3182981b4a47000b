"""Fast checks of the fleet's pieces that need no Ray: config validation, the API key rules
and middleware, the session tables, the hash ring, the simulator's statistics and the
metrics helpers."""

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
from vllm_vla_pruner.serve.auth import (
    ApiKeyMiddleware,
    client_headers,
    is_loopback,
    key_digest,
    resolve_api_key,
)
from vllm_vla_pruner.serve.config import FleetConfigError, load_config, parse_config
from vllm_vla_pruner.serve.hashring import HashRing, key_hash
from vllm_vla_pruner.serve.sessions import FrameGaps, SessionTable

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
        ({"model": {"preset": "tiny"}, "auth": {"api_key": "s3cret"}}, "api_key_env"),
        ({"model": {"preset": "tiny"}, "auth": {"api_key_env": "MY KEY"}}, "auth.api_key_env"),
        ({"model": {"preset": "tiny"}, "auth": {"apikey_env": "K"}}, "auth.apikey_env"),
        (
            {"model": {"preset": "tiny"}, "auth": {"allow_unauthenticated": "maybe"}},
            "auth.allow_unauthenticated",
        ),
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


def test_config_key_in_file_is_refused_without_echoing_it() -> None:
    with pytest.raises(FleetConfigError) as ei:
        parse_config({"model": {"preset": "tiny"}, "auth": {"api_key": "s3cret-value"}})
    assert "s3cret-value" not in str(ei.value)


def test_shipped_configs_load() -> None:
    from pathlib import Path

    import vllm_vla_pruner.serve as serve_pkg

    configs = Path(serve_pkg.__file__).parent / "configs"
    cluster = load_config(configs / "cluster.yaml")
    assert cluster.http.host == "0.0.0.0" and not cluster.auth.allow_unauthenticated
    assert load_config(configs / "tiny.yaml").metrics.replica_host == "127.0.0.1"
    assert parse_config({"model": {"preset": "tiny"}}).metrics.replica_host == "127.0.0.1"


# ----------------------------------------------------------------------------- API key


def _cfg(host: str, **auth) -> object:
    return parse_config({"model": {"preset": "tiny"}, "http": {"host": host}, "auth": auth})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("robots.example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_api_key_off_by_default_on_loopback() -> None:
    assert resolve_api_key(_cfg("127.0.0.1"), {}) is None
    assert resolve_api_key(_cfg("localhost"), {"VLA_FLEET_API_KEY": ""}) is None  # empty: unset


def test_api_key_from_the_named_variable_wherever_bound() -> None:
    env = {"VLA_FLEET_API_KEY": "k1", "OTHER": "k2"}
    assert resolve_api_key(_cfg("127.0.0.1"), env) == "k1"
    assert resolve_api_key(_cfg("0.0.0.0"), env) == "k1"
    assert resolve_api_key(_cfg("0.0.0.0", api_key_env="OTHER"), env) == "k2"
    # A key, when given, is enforced even if running open was allowed.
    assert resolve_api_key(_cfg("0.0.0.0", allow_unauthenticated=True), env) == "k1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "robots.example.org"])
def test_public_fleet_without_key_is_refused(host: str) -> None:
    with pytest.raises(FleetConfigError, match=r"http\.host.*VLA_FLEET_API_KEY"):
        resolve_api_key(_cfg(host), {})
    with pytest.raises(FleetConfigError, match="MY_KEY"):
        resolve_api_key(_cfg(host, api_key_env="MY_KEY"), {"VLA_FLEET_API_KEY": "k"})


def test_public_fleet_without_key_when_explicitly_allowed() -> None:
    assert resolve_api_key(_cfg("0.0.0.0", allow_unauthenticated=True), {}) is None


def test_client_headers_follow_the_config() -> None:
    assert client_headers(_cfg("127.0.0.1"), {}) == {}
    cfg = _cfg("0.0.0.0", api_key_env="MY_KEY")
    assert client_headers(cfg, {"MY_KEY": "abc"}) == {"Authorization": "Bearer abc"}


def test_api_key_middleware() -> None:
    """The ASGI guard on a small app, through httpx (the real ingress: tests/test_fleet.py)."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    rejected: list[str] = []
    app = FastAPI()
    for path in ("/health", "/metrics", "/v1/actions/info", "/v1/fleet/sessions"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    app.add_middleware(
        ApiKeyMiddleware, digest=key_digest("k1"), on_reject=rejected.append, headers={"X-A": "b"}
    )

    async def get(path: str, auth: str | None = None) -> httpx.Response:
        headers = {"Authorization": auth} if auth is not None else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path, headers=headers)

    def status(path: str, auth: str | None = None) -> int:
        return asyncio.run(get(path, auth)).status_code

    assert status("/health") == 200 and status("/metrics") == 200
    assert status("/v1/actions/info", "Bearer k1") == 200
    assert status("/v1/fleet/sessions", "bearer k1") == 200  # scheme is case-insensitive
    for auth in (None, "", "Bearer", "Bearer ", "Bearer k2", "Bearer k1 ", "Basic k1", "k1"):
        assert status("/v1/actions/info", auth) == 401, auth
    assert status("/no/such/route") == 401  # unknown paths do not reveal what exists
    r = asyncio.run(get("/v1/fleet/sessions", "Bearer nope"))
    assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-a"] == "b"
    err = r.json()["error"]
    assert err["type"] == "unauthorized" and "Authorization: Bearer" in err["message"]
    assert rejected[-1] == "/v1/fleet/sessions" and "/health" not in rejected


# ----------------------------------------------------------------------------- sessions


def test_session_table_numbers_frames_and_notes_moves() -> None:
    table = SessionTable(window_s=60.0, max_sessions=2)
    a = table.next_frame("a")
    assert a.seq == 1 and table.next_frame("a").seq == 2
    assert not table.served(a, "r1") and not table.served(a, "r1")
    assert table.served(a, "r2")  # moved
    table.next_frame("b")
    table.next_frame("c")  # over the bound: the least recently seen ("a") is forgotten
    assert set(table.snapshot()) == {"b", "c"} and table.active() == 2
    assert table.next_frame("a").seq == 1


def test_frame_gaps_detect_frames_served_elsewhere() -> None:
    gaps = FrameGaps(window_s=60.0, max_sessions=8)
    assert not gaps.stale("r", 1)  # first frame seen here: nothing stale
    assert not gaps.stale("r", 2)
    assert gaps.stale("r", 5)  # frames 3 and 4 went to another replica
    assert not gaps.stale("r", 6)
    assert not gaps.stale("s", None) and not gaps.stale("s", None)  # unnumbered: no gaps
    assert gaps.active() == 2


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


def test_metrics_count_the_worker_reported_pruning_of_a_response() -> None:
    from vllm_vla_pruner.api.protocol import PruningReport

    rep = ReplicaMetrics(replica="abc")
    report = PruningReport(
        method="vlapruner",
        keep_ratio=0.25,
        visual_tokens_total=64,
        visual_tokens_kept=16,
        warmup=False,
        history_evicted=True,
        source="worker",
    )
    rep.observe_report(report, ModelDims(128, 256, 4, 2, 6), 3)
    text = render(rep.registry).decode()
    assert 'vla_visual_tokens_kept_total{method="vlapruner"} 16.0' in text
    assert (
        "vla_history_evicted_frames_total 1.0" in text and "vla_pruned_requests_total 1.0" in text
    )
