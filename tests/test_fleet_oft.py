"""The chunk form of ``POST /v1/actions`` through a real Ray Serve fleet (one replica on a
tiny-oft checkpoint, the API key of ``tests/fleet_fixtures.py``).

The ingress validates a body with the endpoint's own validator and the served model's inputs
(asked of a replica), forwards a chunk body to the replica and returns its chunk.
"""

from __future__ import annotations

import pytest

from tests.fleet_fixtures import AUTH

pytestmark = pytest.mark.ray

REPLICA = "x-vla-replica"
CLIENT_TIMEOUT_S = 45.0


def test_oft_chunk_through_the_fleet_is_the_engine_chunk(ray_fleet_oft) -> None:
    """The chunk form of /v1/actions on a tiny-oft fleet: the ingress validates it with the
    endpoint's validator and the served model's inputs, the replica answers the chunk. The
    chunk equals the PyTorch oracle within the bound tests/test_oft_api_e2e.py holds the
    single server to; ``execute_steps`` answers its first rows; pruning reaches the replica;
    bad chunk fields are 4xx from the ingress naming the field."""
    import httpx
    import numpy as np

    from tests.test_oft_api_e2e import STATE, TOL, _body, _oracle_err
    from vllm_vla_pruner.research.reference_oft import ReferenceOFT

    url = ray_fleet_oft.url
    ref = ReferenceOFT.from_pretrained(ray_fleet_oft.model_dir)
    unpruned = {"method": "none"}
    with httpx.Client(headers=AUTH, timeout=CLIENT_TIMEOUT_S) as client:
        info = client.get(f"{url}/v1/actions/info").json()
        assert info["oft"]["cameras"] == ["primary", "wrist"] and info["oft"]["chunk"] == 3

        r = client.post(f"{url}/v1/actions", json=_body(70, pruning=unpruned))
        assert r.status_code == 200, r.text[:300]
        assert r.headers[REPLICA] not in ("", "ingress")
        out = r.json()
        assert (out["chunk"], out["action_dim"]) == (3, 7) and len(out["actions"]) == 3
        err = _oracle_err(ref, 70, out["actions"], None)
        assert err < TOL, f"fleet chunk vs oracle: {err}"
        part = client.post(f"{url}/v1/actions", json=_body(70, pruning=unpruned, execute_steps=2))
        assert part.status_code == 200, part.text[:300]
        np.testing.assert_allclose(part.json()["actions"], out["actions"][:2], atol=1e-6)

        # A robot's pruned chunks: warm-up frames, then a quarter of both cameras' tokens.
        m = 2 * ref.base.num_visual
        pruned = {"method": "vlapruner", "keep_ratio": 0.25}
        warm = int(info["defaults"]["warmup_frames"])
        for frame in range(warm + 1):
            body = _body(80 + frame, session_id="oft-robot", pruning=pruned, new_episode=frame == 0)
            r = client.post(f"{url}/v1/actions", json=body)
            assert r.status_code == 200, r.text[:300]
            rep = r.json()["pruning"]
            assert rep["warmup"] is (frame < warm), rep
            assert rep["visual_tokens_kept"] == (m if frame < warm else m // 4), rep

        only_primary = _body(71)
        del only_primary["images"]["wrist"]
        extra_cam = _body(71)
        extra_cam["images"]["top"] = extra_cam["images"]["wrist"]
        single = {"image": _body(71)["images"]["primary"], "instruction": "x", "state": STATE}
        cases = [
            (only_primary, "images.wrist"),
            (extra_cam, "images.top"),
            (_body(71, state=STATE[:3]), "state"),
            (_body(71, state=STATE[:7] + ["1"]), "state"),
            (_body(71, execute_steps=4), "execute_steps"),
            (_body(71, noise_seed=3), "noise_seed"),
            (_body(71, unnorm_key="no_such_robot"), "unnorm_key"),
            (single, "image"),
        ]
        for body, field_name in cases:
            r = client.post(f"{url}/v1/actions", json=body)
            assert 400 <= r.status_code < 500, (field_name, r.status_code, r.text[:300])
            assert r.json()["error"]["field"] == field_name, r.text[:300]
            assert r.headers[REPLICA] == "ingress", (field_name, r.headers)
