"""``POST /v1/actions`` chunk form on a real ``vla-pruner serve`` of a tiny-oft checkpoint.

One server for the module, started exactly as a user would with no OFT flags: the engine
defaults (``server_defaults``) select the OFT architecture and allow two views. The worker's
pruning trace gives the kept visual indices of the pruned frame; the PyTorch oracle re-runs
the forward with exactly those (tolerance as tests/test_oft_engine_pruning.py: 1e-4 absolute
on the head's normalised scale).
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve_fixtures import traced_server
from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.research.reference_oft import ReferenceOFT

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"
CAMERAS = ("primary", "wrist")


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_api"), seed=7)


@pytest.fixture(scope="module")
def ref(oft_dir):
    return ReferenceOFT.from_pretrained(oft_dir)


@pytest.fixture(scope="module")
def server(oft_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oft_server")
    with traced_server(oft_dir, tmp, {"layer": K, "window": 3, "gamma": 0.8}) as (srv, trace):
        yield srv, trace


def _png(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in CAMERAS:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _body(seed: int, **kw) -> dict:
    images = {c: base64.b64encode(b).decode() for c, b in zip(CAMERAS, _png(seed))}
    return {"images": images, "state": STATE, "instruction": INS, **kw}


def _post(server, body, raw: str | None = None) -> httpx.Response:
    srv, _ = server
    if raw is not None:
        return httpx.post(
            f"{srv.base_url}/v1/actions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=300,
        )
    return httpx.post(f"{srv.base_url}/v1/actions", json=body, timeout=300)


def _kept(server, response_id: str) -> list[int]:
    _, trace = server
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    recs = [r for r in rows if r["req_id"] == response_id or r["req_id"].startswith(response_id)]
    assert recs, f"no trace record for {response_id}"
    return recs[-1]["kept"]


def _normalized(ref, actions: torch.Tensor) -> torch.Tensor:
    stats = ref.stats[ref.spec.unnorm_key]["action"]
    lo, hi = (torch.tensor(stats[k], dtype=torch.float64) for k in ref.spec.bound_keys)
    return torch.where(
        torch.tensor(stats["mask"]), 2 * (actions - lo) / (hi - lo + 1e-8) - 1, actions
    )


def _oracle_err(ref, seed: int, actions, kept: list[int] | None) -> float:
    views = [Image.open(io.BytesIO(b)).convert("RGB") for b in _png(seed)]
    inputs = ref.build_inputs(views, INS, STATE)
    want = ref.forward_inputs(
        inputs, keep_visual=None if kept is None else torch.tensor(kept), prune_layer=K
    )
    got = torch.tensor(actions, dtype=torch.float64)
    return float((_normalized(ref, got) - want.normalized.double()).abs().max())


def test_info_states_the_chunk_contract(server):
    srv, _ = server
    info = httpx.get(f"{srv.base_url}/v1/actions/info", timeout=30).json()
    assert info["oft"] == {
        "cameras": list(CAMERAS),
        "state_dim": 8,
        "chunk": 3,
        "action_dim": 7,
        "normalization": "bounds_q99",
        "unnorm_key": "libero_spatial_no_noops",
        "film": False,
    }


def test_fourth_chunk_pruned_to_a_quarter_equals_oracle(server, ref):
    session = f"robot-{uuid.uuid4().hex[:8]}"
    pruning = {"method": "vlapruner", "keep_ratio": 0.25}
    m = 2 * ref.base.num_visual
    for frame in range(4):
        seed = 40 + frame
        r = _post(server, _body(seed, session_id=session, pruning=pruning))
        assert r.status_code == 200, r.text
        resp = r.json()
        assert (resp["chunk"], resp["action_dim"]) == (3, 7)
        assert len(resp["actions"]) == 3 and all(len(row) == 7 for row in resp["actions"])
        rep = resp["pruning"]
        assert rep["source"] == "worker" and rep["visual_tokens_total"] == m
        if frame < 3:
            assert rep["warmup"] is True and rep["visual_tokens_kept"] == m
            assert _oracle_err(ref, seed, resp["actions"], None) < TOL
            continue
        assert rep["warmup"] is False and rep["visual_tokens_kept"] == m // 4
        kept = _kept(server, resp["id"])
        assert len(kept) == m // 4
        err = _oracle_err(ref, seed, resp["actions"], kept)
        assert err < TOL, f"served chunk vs oracle with the same kept indices: {err}"
        unpruned = _oracle_err(ref, seed, resp["actions"], None)
        assert unpruned > TOL  # the quarter really changed the chunk


def test_bad_inputs_name_the_field_and_others_are_served(server):
    good = _body(50)
    only_primary = _body(51)
    del only_primary["images"]["wrist"]
    extra_cam = _body(52)
    extra_cam["images"]["top"] = extra_cam["images"]["wrist"]
    short_state = _body(53, state=STATE[:3])
    single_image = {"image": good["images"]["primary"], "instruction": INS, "state": STATE}
    nan_state = json.dumps(_body(54)).replace(json.dumps(STATE), json.dumps(STATE[:7] + [0.0]))
    nan_state = nan_state.replace("0.0]", "NaN]")
    cases = [
        (only_primary, None, "images.wrist"),
        (extra_cam, None, "images.top"),
        (short_state, None, "state"),
        (None, nan_state, "state"),
        (single_image, None, "image"),
    ]
    for body, raw, field in cases:
        r = _post(server, body, raw)
        assert 400 <= r.status_code < 500, (field, r.status_code, r.text)
        assert r.json()["error"]["field"] == field, r.text
        ok = _post(server, good)
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["actions"]) == 3


def test_execute_steps_answers_the_first_rows_of_the_same_chunk(server):
    """A robot executing k of the chunk's rows gets exactly those rows of the chunk the
    engine computed (same request); k outside 1..chunk is a 422 naming the field."""
    full = _post(server, _body(60))
    assert full.status_code == 200, full.text
    part = _post(server, _body(60, execute_steps=2))
    assert part.status_code == 200, part.text
    rows = full.json()["actions"]
    assert len(rows) == 3 and part.json()["chunk"] == 3
    np.testing.assert_allclose(part.json()["actions"], rows[:2], atol=1e-6)
    for bad in (4, 0, "2"):
        r = _post(server, _body(60, execute_steps=bad))
        assert r.status_code == 422 and r.json()["error"]["field"] == "execute_steps", r.text
