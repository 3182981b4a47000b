"""``POST /v1/actions`` chunk form on a real ``vla-pruner serve`` of a tiny-pi0 checkpoint.

One server for the module, started as a user would with no pi0 flags (the engine defaults
allow the checkpoint's three cameras). Chunks are compared with the PyTorch oracle for the
same noise seed (1e-4 absolute on the normalised chunk), pruned ones with the kept indices
the worker traced.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.pi0_fixtures import camera_images, checkpoint_fixtures, png_base64, siglip_pixels
from tests.serve_fixtures import traced_server
from vllm_vla_pruner.pi0_spec import PI0_CAMERAS, pi0_noise, pi0_prompt_token_ids

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"


model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi0", seed=6)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pi0_server")
    with traced_server(model_dir, tmp, {"layer": K, "window": 3, "gamma": 0.8}) as (srv, trace):
        yield srv, trace


def _body(seed: int, cameras=PI0_CAMERAS, **kw) -> dict:
    arrays = zip(PI0_CAMERAS, camera_images(seed))
    images = {cam: png_base64(arr) for cam, arr in arrays if cam in cameras}
    return {"images": images, "state": STATE, "instruction": INS, **kw}


def _post(server, body) -> httpx.Response:
    srv, _ = server
    return httpx.post(f"{srv.base_url}/v1/actions", json=body, timeout=300)


def _kept(server, response_id: str) -> list[int]:
    _, trace = server
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    recs = [r for r in rows if r["req_id"] == response_id or r["req_id"].startswith(response_id)]
    assert recs, f"no trace record for {response_id}"
    return recs[-1]["kept"]


def _oracle_err(ref, tokenizer, seed, noise_seed, actions, cameras=PI0_CAMERAS, kept=None):
    ids = pi0_prompt_token_ids(tokenizer, INS, 48)
    mask = [c in cameras for c in PI0_CAMERAS]
    pixels = [siglip_pixels(a) if m else None for a, m in zip(camera_images(seed), mask)]
    inputs = ref.build_inputs(pixels, mask, ids, STATE)
    noise = pi0_noise(noise_seed, ref.spec.horizon, ref.spec.action_dim)
    keep = None if kept is None else torch.tensor(kept)
    want = ref.sample(inputs, noise, keep_visual=keep, prune_layer=K).normalized[:, :7]
    mean, std = ref.norm._act
    got = (torch.tensor(actions, dtype=torch.float64) - mean) / (std + 1e-6)
    return float((got - want.double()).abs().max())


def test_info_states_the_pi0_contract(server):
    srv, _ = server
    info = httpx.get(f"{srv.base_url}/v1/actions/info", timeout=30).json()
    assert info["oft"] is None
    assert info["pi0"] == {
        "cameras": list(PI0_CAMERAS),
        "state_dim": 8,
        "horizon": 5,
        "action_dim": 7,
        "num_steps": 10,
        "normalization": "z-score (mean/std)",
        "unnorm_key": "vla_pruner_robot",
        "noise_seed": True,
        "pi05_adaptive_norm": False,
    }


def test_chunk_equals_oracle_and_seed_reproduces(server, ref, tokenizer):
    r1 = _post(server, _body(1, noise_seed=5))
    assert r1.status_code == 200, r1.text
    body = r1.json()
    assert body["chunk"] == 5 and body["action_dim"] == 7 and len(body["actions"]) == 5
    assert _oracle_err(ref, tokenizer, 1, 5, body["actions"]) < TOL
    again = _post(server, _body(1, noise_seed=5)).json()
    assert again["actions"] == body["actions"]
    other = _post(server, _body(1, noise_seed=6)).json()
    assert other["actions"] != body["actions"]
    assert body["noise_seed"] == 5
    drawn = _post(server, _body(1)).json()  # no seed: the server draws one and says which
    assert isinstance(drawn["noise_seed"], int)
    replay = _post(server, _body(1, noise_seed=drawn["noise_seed"])).json()
    assert replay["actions"] == drawn["actions"]


def test_masked_camera_and_steps(server, ref, tokenizer):
    cams = ("base_0_rgb", "right_wrist_0_rgb")
    r = _post(server, _body(2, cameras=cams, noise_seed=3))
    assert r.status_code == 200, r.text
    assert _oracle_err(ref, tokenizer, 2, 3, r.json()["actions"], cams) < TOL
    r = _post(server, _body(2, noise_seed=3, num_steps=4))
    assert r.status_code == 200, r.text


def test_pruned_chunk_equals_oracle_with_kept(server, ref, tokenizer):
    r = _post(server, _body(3, noise_seed=9, pruning={"method": "fastv", "keep_ratio": 0.25}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pruning"]["visual_tokens_kept"] == 48
    kept = _kept(server, body["id"])
    assert _oracle_err(ref, tokenizer, 3, 9, body["actions"], kept=kept) < TOL


@pytest.mark.parametrize(
    "change, field",
    [
        ({"state": STATE[:3]}, "state"),
        ({"images": {}}, "images"),
        ({"images": {"top": "aGVsbG8="}}, "images.top"),
        ({"noise_seed": "7"}, "noise_seed"),
        ({"noise_seed": -1}, "noise_seed"),
        ({"num_steps": 0}, "num_steps"),
        ({"image": "aGVsbG8="}, "image"),
    ],
)
def test_bad_bodies_are_4xx_naming_the_field(server, change, field):
    r = _post(server, {**_body(4), **change})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["field"] == field, r.text
