"""``POST /v1/actions`` on a real ``vla-pruner serve`` of a tiny-pi05 checkpoint.

One server for the module, started with no pi0 flags. The robot sends its raw state as for
pi0; the server bins it into the prompt. Chunks are compared with the PyTorch oracle on the
oracle's own prompt (:meth:`ReferencePi0.pi05_prompt`, written from openpi's tokenizer and
quantile normalisation), so the request builder's prompt is checked too (1e-4 absolute on
the normalised chunk); the pruned one with the kept indices the worker traced.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.pi0_fixtures import camera_images, checkpoint_fixtures, png_base64, siglip_pixels
from tests.serve_fixtures import traced_server
from vllm_vla_pruner.pi0_spec import PI0_CAMERAS, pi0_noise

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"


model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi05", seed=6)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pi05_server")
    with traced_server(model_dir, tmp, {"layer": K, "window": 3, "gamma": 0.8}) as (srv, trace):
        yield srv, trace


def _body(seed: int, state=STATE, **kw) -> dict:
    images = {cam: png_base64(arr) for cam, arr in zip(PI0_CAMERAS, camera_images(seed))}
    return {"images": images, "state": state, "instruction": INS, **kw}


def _post(server, body=None, raw: str | None = None) -> httpx.Response:
    srv, _ = server
    url = f"{srv.base_url}/v1/actions"
    if raw is not None:
        headers = {"Content-Type": "application/json"}
        return httpx.post(url, content=raw, headers=headers, timeout=300)
    return httpx.post(url, json=body, timeout=300)


def _oracle_err(ref, tokenizer, seed, noise_seed, actions, state=STATE, kept=None) -> float:
    ids = ref.pi05_prompt(tokenizer, INS, state)
    pixels = [siglip_pixels(a) for a in camera_images(seed)]
    inputs = ref.build_inputs(pixels, [True] * 3, ids, None)
    noise = pi0_noise(noise_seed, ref.spec.horizon, ref.spec.action_dim)
    keep = None if kept is None else torch.tensor(kept)
    want = ref.sample(inputs, noise, keep_visual=keep, prune_layer=K).normalized[:, :7]
    st = ref.norm_stats["actions"]
    q01, q99 = (torch.tensor(st[k], dtype=torch.float64) for k in ("q01", "q99"))
    got = (torch.tensor(actions, dtype=torch.float64) - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    return float((got - want.double()).abs().max())


def test_info_states_the_pi05_contract(server):
    srv, _ = server
    info = httpx.get(f"{srv.base_url}/v1/actions/info", timeout=30).json()
    assert info["oft"] is None
    assert info["pi0"] == {
        "cameras": list(PI0_CAMERAS),
        "state_dim": 8,
        "horizon": 5,
        "action_dim": 7,
        "num_steps": 10,
        "normalization": "quantile (q01/q99 -> [-1, 1])",
        "unnorm_key": "vla_pruner_robot",
        "noise_seed": True,
        "pi05_adaptive_norm": True,
    }


def test_chunk_equals_oracle_state_in_prompt(server, ref, tokenizer):
    r = _post(server, _body(1, noise_seed=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chunk"] == 5 and body["action_dim"] == 7 and body["noise_seed"] == 5
    assert _oracle_err(ref, tokenizer, 1, 5, body["actions"]) < TOL
    # The state reaches the chunk (through the prompt's bins).
    other = [x * -3 for x in STATE]
    r2 = _post(server, _body(1, state=other, noise_seed=5))
    assert r2.status_code == 200, r2.text
    assert r2.json()["actions"] != body["actions"]
    assert _oracle_err(ref, tokenizer, 1, 5, r2.json()["actions"], state=other) < TOL


def test_pruned_chunk_equals_oracle_with_kept(server, ref, tokenizer):
    r = _post(server, _body(3, noise_seed=9, pruning={"method": "vlapruner", "keep_ratio": 0.25}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pruning"]["visual_tokens_kept"] == 48
    _, trace = server
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    recs = [x for x in rows if x["req_id"] == body["id"] or x["req_id"].startswith(body["id"])]
    assert recs, f"no trace record for {body['id']}"
    assert _oracle_err(ref, tokenizer, 3, 9, body["actions"], kept=recs[-1]["kept"]) < TOL


def test_bad_state_is_4xx_naming_state(server):
    good = _body(4, noise_seed=1)
    missing = {k: v for k, v in good.items() if k != "state"}
    nan = json.dumps(good).replace(json.dumps(STATE), json.dumps(STATE[:7] + [0.0]))
    nan = nan.replace("0.0]", "NaN]")
    cases = [(missing, None), (_body(4, state=STATE[:3]), None), (None, nan)]
    for body, raw in cases:
        r = _post(server, body, raw)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["field"] == "state", r.text
    assert _post(server, good).status_code == 200
