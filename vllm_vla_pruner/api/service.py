"""``ActionService``: camera frame + instruction -> robot action, on any vLLM ``EngineClient``.

This is the engine-facing core of ``POST /v1/actions``. It knows nothing about HTTP so the
same object serves the vLLM API-server route (``api/endpoint.py``) and a Ray Serve replica.
Every refusal is an :class:`ApiError` naming the offending field; every engine failure or
timeout is an :class:`ApiError` with a 5xx status, raised after the request was aborted in
the engine, so a caller never hangs and the engine never keeps working for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_vla_pruner.api.images import decode_image
from vllm_vla_pruner.api.protocol import (
    SESSION_ID_HEADER,
    ActionChunkResponse,
    ActionRequest,
    ActionResponse,
    ApiError,
    ChunkInfo,
    InfoResponse,
    Pi0Info,
    PruningReport,
    PruningSettings,
    RequestContext,
    ServiceLimits,
    Timing,
    check_execute_steps,
    check_session_id,
)
from vllm_vla_pruner.api.request_builder import (
    EXTRA_ARG_FIELDS,
    EngineRequest,
    RequestBuilder,
    oft_camera_names,
)
from vllm_vla_pruner.engine.plan import ActionChunk, PruningResult

__all__ = ["ActionService", "ServiceLimits", "available_pruners"]

logger = logging.getLogger(__name__)


def available_pruners() -> list[str]:
    """Names of the pruning registry (what ``/v1/actions/info`` lists)."""
    from vllm_vla_pruner.pruning import PRUNERS

    return sorted(PRUNERS)


def _check_pruned_as_planned(out: Any) -> None:
    """A request the engine failed because its forward did not prune as planned: an error,
    never an action (``patches.scheduler_plan`` finishes it with ``FINISHED_ERROR``)."""
    if any(getattr(o, "finish_reason", None) == "error" for o in out.outputs):
        raise ApiError(
            500,
            "the engine could not run this request as planned (pruning did not run in its "
            "forward; see the server log); no action was produced",
            type="engine_error",
        )


# ----------------------------------------------------------------------------- service


def _ms(a: float, b: float) -> float | None:
    return round((b - a) * 1000.0, 3) if a > 0 and b > 0 and b >= a else None


class ActionService:
    """Turns an :class:`ActionRequest` into an :class:`ActionResponse` with one engine call.

    ``engine_client`` is vLLM's ``EngineClient`` (``AsyncLLM``); anything with the same
    ``generate``/``abort`` coroutines works, which is how the unit tests drive it.
    """

    def __init__(
        self,
        engine_client: Any,
        model_dir: str,
        *,
        served_model_names: Sequence[str] | None = None,
        limits: ServiceLimits | None = None,
        decoder: Any = None,
        tokenizer: Any = None,
        hf_config: Any = None,
        max_model_len: int | None = None,
        pruning_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        from vllm_vla_pruner.config import image_size, load_config_json, num_visual_tokens

        self.engine = engine_client
        self.model_dir = str(model_dir)
        names = [n for n in (served_model_names or []) if n]
        self.served_model_names = names or [self.model_dir]
        self.limits = limits or ServiceLimits()
        model_config = getattr(engine_client, "model_config", None)
        self.config = (
            hf_config
            if hf_config is not None
            else getattr(model_config, "hf_config", None) or load_config_json(self.model_dir)
        )
        from vllm_vla_pruner.pi0_spec import is_pi0_checkpoint, pi0_spec

        #: A pi0-style flow-matching checkpoint's contract (None: OpenVLA / OFT).
        self.pi0 = pi0_spec(self.model_dir) if is_pi0_checkpoint(self.model_dir) else None
        if decoder is None and self.pi0 is None:  # pi0 answers chunks: no token decoder
            from pathlib import Path

            from vllm_vla_pruner.actions import ActionDecoder

            # The checkpoint's own config.json when it is a local directory; otherwise (a hub
            # name resolved from the local cache) the engine's parsed config.
            if (Path(self.model_dir) / "config.json").is_file():
                decoder = ActionDecoder.from_pretrained(self.model_dir)
            else:
                decoder = ActionDecoder.from_config(self.config)
        self.decoder = decoder
        self._tokenizer = tokenizer
        self._builder: RequestBuilder | None = None
        self.num_visual = num_visual_tokens(self.config)
        self.image_side = image_size(self.config)
        self.max_model_len = max_model_len or getattr(model_config, "max_model_len", None)
        self.pruning_defaults = dict(pruning_defaults or {})
        self._init_oft()
        if self.pi0 is not None:
            # One norm-stats asset per checkpoint (openpi's assets/<asset_id>/).
            self.unnorm_keys = [self.pi0.asset_id]
            self.action_dims = {self.pi0.asset_id: self.pi0.robot_action_dim}
        elif self.oft is None:
            self.unnorm_keys = self._unnorm_keys()
            self.action_dims = {k: int(decoder.action_dim(k)) for k in self.unnorm_keys}
        else:
            # The model un-normalises with the one dataset key it loaded (config.oft_spec).
            self.unnorm_keys = [self.oft.unnorm_key]
            self.action_dims = {self.oft.unnorm_key: self.oft.action_dim}
        self.pruners = available_pruners()

    def _init_oft(self) -> None:
        """An OpenVLA-OFT checkpoint (action head beside the OpenVLA files): its contract and
        camera names; None for AR OpenVLA (``image`` in, ``action`` out)."""
        from pathlib import Path

        from vllm_vla_pruner.config import load_config_json
        from vllm_vla_pruner.server_defaults import oft_checkpoint_spec

        self.oft = oft_checkpoint_spec(self.model_dir)
        self.cameras: tuple[str, ...] | None = None
        if self.pi0 is not None:
            self.cameras = self.pi0.cameras
        elif self.oft is not None:
            cfg = load_config_json(Path(self.model_dir))
            self.cameras = oft_camera_names(self.oft.num_images, cfg)

    # -- construction helpers

    @classmethod
    def from_engine_client(
        cls, engine_client: Any, served_model_names: Sequence[str] | None = None, **kw: Any
    ) -> ActionService:
        """Build from a running engine: model path, names and limits come from its config."""
        mc = engine_client.model_config
        if not served_model_names:
            name = getattr(mc, "served_model_name", None)
            served_model_names = [name] if isinstance(name, str) else list(name or [])
        return cls(engine_client, mc.model, served_model_names=served_model_names, **kw)

    def _unnorm_keys(self) -> list[str]:
        keys = getattr(self.decoder, "unnorm_keys", None)
        if callable(keys):
            keys = keys()
        if keys is None:
            stats = getattr(self.decoder, "norm_stats", None)
            if stats is None:
                cfg = self.config
                stats = cfg.get("norm_stats") if isinstance(cfg, Mapping) else cfg.norm_stats
            keys = list(stats or {})
        return sorted(keys)

    @property
    def tokenizer(self) -> Any:
        """The engine's own tokenizer (same ids as chat completions), else the checkpoint's."""
        if self._tokenizer is None:
            renderer = getattr(self.engine, "renderer", None)
            tok = None
            if renderer is not None:
                try:
                    tok = renderer.get_tokenizer()
                except Exception:  # noqa: BLE001 - e.g. skip_tokenizer_init
                    tok = None
            if tok is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.model_dir)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def builder(self) -> RequestBuilder:
        """The request builder the benchmarks share (built once the tokenizer is known)."""
        if self._builder is None:
            from vllm_vla_pruner.pi0_spec import pi0_normalizer

            self._builder = RequestBuilder(
                self.decoder,
                self.tokenizer,
                self.num_visual,
                self.max_model_len,
                self.oft,
                self.pi0,
                pi0_normalizer(self.model_dir) if self.pi0 is not None else None,
            )
        return self._builder

    @property
    def default_unnorm_key(self) -> str | None:
        if self.pi0 is not None:
            return self.pi0.asset_id
        if self.oft is not None:
            return self.oft.unnorm_key
        return self.decoder.default_unnorm_key

    @property
    def num_cameras(self) -> int:
        """Camera views one request takes (the openpi route reads this)."""
        if self.pi0 is not None:
            return self.pi0.num_cameras
        return self.oft.num_images if self.oft is not None else 1

    @property
    def state_dim(self) -> int:
        """Proprio state length one request takes; 0: none (AR OpenVLA)."""
        if self.pi0 is not None:
            return self.pi0.state_dim
        return self.oft.proprio_dim if self.oft is not None else 0

    @property
    def visual_tokens_total(self) -> int:
        """Visual tokens of one request: every camera view's (OFT, pi0) or the one frame's."""
        return self.num_visual * self.num_cameras

    @property
    def chunk_len(self) -> int | None:
        """Rows of a chunk answer (OFT chunk, pi0 horizon); None: one action (AR)."""
        if self.pi0 is not None:
            return self.pi0.horizon
        return self.oft.chunk if self.oft is not None else None

    # -- validation

    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.served_model_names[0]
        if name not in self.served_model_names:
            raise ApiError(
                404,
                f"model {name!r} is not served here; served: {self.served_model_names}",
                field="model",
                type="not_found",
            )
        return name

    def resolve_unnorm_key(self, key: str | None) -> str:
        if key is None:
            key = self.default_unnorm_key
            if key is None:
                raise ApiError(
                    422,
                    f"unnorm_key: required, this model has several: {self.unnorm_keys}",
                    field="unnorm_key",
                )
        if key not in self.action_dims:
            raise ApiError(
                422,
                f"unnorm_key: unknown key {key!r}; expected one of {self.unnorm_keys}",
                field="unnorm_key",
            )
        return key

    def resolve_session(self, req: ActionRequest, header: str | None) -> str | None:
        """Body ``session_id`` wins over the ``X-Session-ID`` header; neither -> no session."""
        if req.session_id is not None:
            return req.session_id
        if header is None:
            return None
        try:
            return check_session_id(header.strip())
        except ValueError as exc:
            raise ApiError(422, f"{SESSION_ID_HEADER} header: {exc}", field="session_id") from None

    def request_context(self) -> RequestContext:
        """This model's inputs and allowed values, for validating action bodies."""
        return RequestContext(
            pruners=frozenset(self.pruners) if self.pruners else None,
            unnorm_keys=frozenset(self.unnorm_keys) if self.unnorm_keys else None,
            cameras=tuple(self.cameras) if self.cameras is not None else None,
            state_dim=self.state_dim,
            chunk=self.chunk_len,
            flow=self.pi0 is not None,
        )

    # -- the call

    def build_request(
        self, req: ActionRequest, image: Any, unnorm_key: str, sid: str | None
    ) -> EngineRequest:
        """The engine request for a validated body (the benchmarks build theirs alike)."""
        return self._build(req.instruction, image, unnorm_key, req.pruning, sid, req.new_episode)

    def _build(
        self,
        instruction: str,
        image: Any,
        unnorm_key: str,
        pruning: PruningSettings | None,
        sid: str | None,
        new_episode: bool,
    ) -> EngineRequest:
        return self.builder.build(
            instruction,
            image,
            self.action_dims[unnorm_key],
            method=pruning.method if pruning else None,
            keep_ratio=pruning.keep_ratio if pruning else None,
            session_id=sid,
            new_episode=new_episode,
        )

    async def _engine_input(self, prompt: dict[str, Any]) -> Any:
        """Render through the engine's renderer (the non-deprecated path) when it has one."""
        renderer = getattr(self.engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):
            return prompt
        (engine_input,) = await renderer.render_cmpl_async([prompt])
        return engine_input

    async def _run(self, engine_input: Any, params: Any, request_id: str, sid: str | None) -> Any:
        final = None
        kwargs = {"session_id": sid} if sid is not None else {}
        async for out in self.engine.generate(engine_input, params, request_id, **kwargs):
            final = out
        return final

    async def predict(
        self, req: ActionRequest, session_header: str | None = None
    ) -> ActionResponse:
        """Validate, run one greedy action decode, un-normalise; ApiError on any failure."""
        t0 = time.perf_counter()
        model = self.check_model(req.model)
        key = self.resolve_unnorm_key(req.unnorm_key)
        sid = self.resolve_session(req, session_header)
        if self.chunk_len is not None:
            images = await asyncio.to_thread(self._decode_views, req.images or {})
            return await self.predict_chunk(
                images,
                req.instruction,
                req.state,
                unnorm_key=key,
                pruning=req.pruning,
                session_id=sid,
                new_episode=req.new_episode,
                model=model,
                started=t0,
                execute_steps=req.execute_steps,
                noise_seed=req.noise_seed,
                num_steps=req.num_steps,
            )
        image = await asyncio.to_thread(decode_image, req.image, self.limits)
        return await self.predict_image(
            image,
            req.instruction,
            unnorm_key=key,
            pruning=req.pruning,
            session_id=sid,
            new_episode=req.new_episode,
            model=model,
            started=t0,
        )

    async def predict_image(
        self,
        image: Any,
        instruction: str,
        *,
        unnorm_key: str | None = None,
        pruning: PruningSettings | None = None,
        session_id: str | None = None,
        new_episode: bool = False,
        model: str | None = None,
        started: float | None = None,
    ) -> ActionResponse:
        """An already-decoded RGB frame + instruction -> one action (no base64 round trip).

        The openpi WebSocket route calls this with its decoded arrays; ``predict`` with the
        HTTP body's image. Same request builder, same engine call, same errors. The
        instruction and pruning settings must already be validated (``parse_action_request``
        or ``api/openpi/observations.py``).
        """
        t0 = time.perf_counter() if started is None else started
        if self.chunk_len is not None:
            kind = "pi0" if self.pi0 is not None else "OpenVLA-OFT"
            raise ApiError(
                422,
                f"image: this model ({kind}) takes camera views and a state "
                "(predict_chunk), not one frame",
                field="image",
            )
        model = self.check_model(model)
        key = self.resolve_unnorm_key(unnorm_key)
        action_dim = self.action_dims[key]
        request = self._build(instruction, image, key, pruning, session_id, new_episode)
        sid = request.session_id
        out, request_id, t_pre = await self._generate(request)
        token_ids = [int(t) for t in out.outputs[0].token_ids]
        if len(token_ids) != action_dim:
            raise ApiError(
                500,
                f"engine returned {len(token_ids)} tokens, expected {action_dim}",
                type="engine_error",
            )
        try:
            action = [float(a) for a in self.decoder.decode(token_ids, key)]
        except Exception as exc:  # noqa: BLE001 - a non-action token from the model
            raise ApiError(
                500, f"could not decode action tokens {token_ids}: {exc}", type="engine_error"
            ) from exc
        t_end = time.perf_counter()
        return ActionResponse(
            id=request_id,
            model=model,
            action=action,
            action_token_ids=token_ids,
            unnorm_key=key,
            session_id=sid,
            pruning=self._pruning_report(pruning, out),
            timing=self._timing(out, t0, t_pre, t_end),
        )

    async def predict_chunk(
        self,
        images: Sequence[Any],
        instruction: str,
        state: Sequence[float] | None,
        *,
        unnorm_key: str | None = None,
        pruning: PruningSettings | None = None,
        session_id: str | None = None,
        new_episode: bool = False,
        model: str | None = None,
        started: float | None = None,
        execute_steps: int | None = None,
        noise_seed: int | None = None,
        num_steps: int | None = None,
    ) -> ActionChunkResponse:
        """Decoded camera views (model order) + state + instruction -> one OFT action chunk.

        The chunk is computed by the request's one prefill forward and reported by the
        worker in the final output's ``kv_transfer_params`` (``ActionChunk``); the inputs
        must already be validated (:meth:`request_context`'s ``parse``).
        ``execute_steps``: answer only the chunk's first rows, the ones the robot executes
        before asking again (the engine request is the same). pi0: ``images`` holds the
        present cameras only, in model order (a camera left out is masked); ``noise_seed`` /
        ``num_steps`` reach the flow.
        """
        t0 = time.perf_counter() if started is None else started
        if self.chunk_len is None:
            raise ApiError(
                422,
                "images: this model takes one camera frame in 'image' (an autoregressive "
                "OpenVLA checkpoint), not a chunk request",
                field="images",
            )
        model = self.check_model(model)
        key = self.resolve_unnorm_key(unnorm_key)
        rows = check_execute_steps(execute_steps, self.chunk_len)
        if self.pi0 is not None and noise_seed is None:
            # Drawn here, not in the worker, so the response can tell the robot the seed.
            noise_seed = secrets.randbits(63)
        request = self.builder.build_chunk(
            instruction,
            list(images),
            None if state is None else list(state),
            method=pruning.method if pruning else None,
            keep_ratio=pruning.keep_ratio if pruning else None,
            session_id=session_id,
            new_episode=new_episode,
            noise_seed=noise_seed,
            num_steps=num_steps,
        )
        out, request_id, t_pre = await self._generate(request)
        chunk = ActionChunk.from_public(getattr(out, "kv_transfer_params", None))
        if chunk is None or chunk.error is not None:
            why = "no chunk reported" if chunk is None else chunk.error
            raise ApiError(500, f"the engine computed no action chunk: {why}", type="engine_error")
        t_end = time.perf_counter()
        return ActionChunkResponse(
            id=request_id,
            model=model,
            actions=chunk.rows()[:rows],
            chunk=chunk.chunk,
            action_dim=chunk.action_dim,
            unnorm_key=key,
            session_id=request.session_id,
            pruning=self._pruning_report(pruning, out),
            timing=self._timing(out, t0, t_pre, t_end),
            noise_seed=noise_seed if self.pi0 is not None else None,
        )

    def _decode_views(self, images: Mapping[str, str]) -> list[Any]:
        """Base64 views -> RGB images in the model's camera order; errors name the camera."""
        out = []
        for cam in self.cameras or ():
            if self.pi0 is not None and cam not in images:
                continue  # a masked pi0 camera (the body names at least one)
            try:
                out.append(decode_image(images[cam], self.limits))
            except ApiError as err:
                msg = err.message.removeprefix("image:").strip()
                raise ApiError(
                    err.status, f"images.{cam}: {msg}", field=f"images.{cam}", type=err.type
                ) from None
        return out

    async def _generate(self, request: EngineRequest) -> tuple[Any, str, float]:
        """Render and run one engine request: (final output, request id, preprocessing end).

        Refusals the client can fix are 4xx ApiErrors; a timeout or cancellation aborts the
        engine request first.
        """
        request_id = f"vla-{uuid.uuid4().hex}"
        try:
            engine_input = await self._engine_input(request.prompt)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - the processor refusing the image or prompt
            raise self._client_or_server_error(exc, request_id, "preprocessing") from exc
        t_pre = time.perf_counter()
        try:
            out = await asyncio.wait_for(
                self._run(engine_input, request.params, request_id, request.session_id),
                self.limits.timeout_s,
            )
        except asyncio.TimeoutError:
            await self._abort(request_id)
            raise ApiError(
                504,
                f"engine did not answer within {self.limits.timeout_s:g} s; request aborted",
                type="timeout",
            ) from None
        except asyncio.CancelledError:
            await self._abort(request_id)
            raise
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to 4xx/5xx below
            raise self._client_or_server_error(exc, request_id, "engine") from exc
        if out is None or not getattr(out, "outputs", None):
            raise ApiError(500, "engine returned no output", type="engine_error")
        _check_pruned_as_planned(out)
        return out, request_id, t_pre

    # -- response parts

    def _pruning_report(self, asked: PruningSettings | None, out: Any) -> PruningReport:
        """Counts from what the worker's forward did (``PruningResult``), never from the plan;
        without an engine report only what was asked is known."""
        result = PruningResult.from_public(getattr(out, "kv_transfer_params", None))
        if result is not None:
            outcome = result.outcome
            return PruningReport(
                method=result.method,
                keep_ratio=result.keep_ratio,
                visual_tokens_total=self.visual_tokens_total
                if outcome is None
                else outcome.visual_tokens_total,
                visual_tokens_kept=None if outcome is None else outcome.visual_tokens_kept,
                warmup=result.warmup,
                history_evicted=None if outcome is None else outcome.history_missing,
                source="worker",
            )
        method = asked.method if asked and asked.method else self.pruning_defaults.get("method")
        ratio = (
            asked.keep_ratio
            if asked and asked.keep_ratio is not None
            else self.pruning_defaults.get("keep_ratio")
        )
        return PruningReport(
            method=method,
            keep_ratio=None if ratio is None else float(ratio),
            visual_tokens_total=self.visual_tokens_total,
            visual_tokens_kept=self.visual_tokens_total if method == "none" else None,
            warmup=None,
            source="requested",
        )

    @staticmethod
    def _timing(out: Any, t0: float, t_pre: float, t_end: float) -> Timing:
        stats = getattr(out, "metrics", None)
        queued = float(getattr(stats, "queued_ts", 0.0) or 0.0)
        sched = float(getattr(stats, "scheduled_ts", 0.0) or 0.0)
        first = float(getattr(stats, "first_token_ts", 0.0) or 0.0)
        last = float(getattr(stats, "last_token_ts", 0.0) or 0.0)
        return Timing(
            total_ms=round((t_end - t0) * 1000.0, 3),
            preprocess_ms=round((t_pre - t0) * 1000.0, 3),
            queue_ms=_ms(queued, sched),
            prefill_ms=_ms(sched, first),
            decode_ms=_ms(first, last),
        )

    # -- errors

    async def _abort(self, request_id: str) -> None:
        abort = getattr(self.engine, "abort", None)
        if abort is None:
            return
        try:
            await asyncio.wait_for(abort(request_id), 5.0)
        except Exception:  # noqa: BLE001 - best effort; the request may already be gone
            logger.debug("abort of %s failed", request_id, exc_info=True)

    def _client_or_server_error(self, exc: Exception, request_id: str, stage: str) -> ApiError:
        """vLLM's client errors (bad settings, prompt too long) -> 4xx; the rest -> 5xx."""
        from vllm.exceptions import VLLMClientError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        cause = exc.__cause__
        if isinstance(exc, EngineGenerateError) and isinstance(
            cause, (ValueError, TypeError, VLLMClientError)
        ):
            # AsyncLLM wraps a plain ValueError raised while admitting the request.
            exc = cause
        if isinstance(exc, EngineDeadError):
            return ApiError(503, "engine is dead; the server must be restarted", type="engine_dead")
        if isinstance(exc, VLLMValidationError):
            param = getattr(exc, "parameter", None)
            fld = EXTRA_ARG_FIELDS.get(str(param), param)
            msg = str(exc.args[0]) if exc.args else str(exc)
            return ApiError(422, f"{fld}: {msg}" if fld else msg, field=fld)
        if isinstance(exc, (ValueError, TypeError)):
            # vLLM (and the plugin's extra_args check, patches/api_validation.py) refuse
            # requests with ValueError before they are queued; the message names the key.
            msg = str(exc)
            key = msg.split(":", 1)[0].strip()
            fld = EXTRA_ARG_FIELDS.get(key)
            return ApiError(422 if fld else 400, f"request refused: {msg}", field=fld)
        if isinstance(exc, VLLMClientError):
            return ApiError(400, f"request refused by the engine: {exc}", field=None)
        logger.exception("%s failed for %s", stage, request_id)
        return ApiError(500, f"{stage} failed: {type(exc).__name__}: {exc}", type="engine_error")

    # -- info

    def info(self) -> InfoResponse:
        return InfoResponse(
            model=self.served_model_names[0],
            served_model_names=list(self.served_model_names),
            action_dims=dict(self.action_dims),
            default_unnorm_key=self.default_unnorm_key,
            visual_tokens=self.num_visual,
            image_size=self.image_side,
            pruners=list(self.pruners),
            defaults={
                "method": self.pruning_defaults.get("method"),
                "keep_ratio": self.pruning_defaults.get("keep_ratio"),
                "layer": self.pruning_defaults.get("layer"),
                # Methods using action history run a session's first `window` frames unpruned.
                "warmup_frames": self.pruning_defaults.get("window"),
            },
            limits={
                "max_body_bytes": self.limits.max_body_bytes,
                "max_image_bytes": self.limits.max_image_bytes,
                "max_image_pixels": self.limits.max_image_pixels,
                "timeout_s": int(self.limits.timeout_s),
                "max_model_len": int(self.max_model_len or 0),
            },
            oft=self._chunk_info(),
            pi0=self._pi0_info(),
        )

    def _pi0_info(self) -> Pi0Info | None:
        if self.pi0 is None:
            return None
        return Pi0Info(
            cameras=list(self.pi0.cameras),
            state_dim=self.pi0.state_dim,
            horizon=self.pi0.horizon,
            action_dim=self.pi0.robot_action_dim,
            num_steps=self.pi0.num_steps,
            normalization=self.pi0.normalization,
            unnorm_key=self.pi0.asset_id,
            pi05_adaptive_norm=self.pi0.pi05,
        )

    def _chunk_info(self) -> ChunkInfo | None:
        if self.oft is None:
            return None
        return ChunkInfo(
            cameras=list(self.cameras or ()),
            state_dim=self.oft.proprio_dim,
            chunk=self.oft.chunk,
            action_dim=self.oft.action_dim,
            normalization=self.oft.normalization,
            unnorm_key=self.oft.unnorm_key,
            film=False,
        )
