"""The decoder loop that prunes visual tokens inside the engine.

Runs vLLM's own Llama layers. For a step that carries pruned requests:

* layer K-1 is run by hand to keep its post-RoPE queries/keys; the pruning core turns the
  rows of each request being prefilled into semantic scores and picks ``num_keep`` visual
  tokens (with the robot's smoothed action scores where the method uses them);
* before layer K the rows of dropped tokens are removed; layers >= K get attention metadata
  built by the backend's own builder for the compacted layout (BOS, kept visual tokens, the
  rest, every pruned request shifted down by P = M - num_keep), so they neither compute nor
  write KV for dropped tokens; kept tokens keep their original RoPE positions;
* at the action layer, each tracked request's action queries (the last prompt row, then each
  decode row) are scored against the visual keys; when the request has emitted its action the
  mean goes into the robot's temporal history;
* final hidden states are scattered back to the runner's row order for the sampler;
* every planned request's first forward reports a :class:`PruneOutcome` (what it actually
  kept) through the step channel; the scheduler fails a request planned to be pruned that
  reports none, so a forward that bypassed this code can never be taken for a pruned one.

A step without pruning plans takes the plain loop (identical to vLLM's LlamaModel); so do
vLLM's dummy and profiling runs, which carry no step context.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_vla_pruner.config import grid_shape
from vllm_vla_pruner.engine.action_block import ActionBlock, layer_with_blocks
from vllm_vla_pruner.engine.plan import PruneOutcome, PruningPlan
from vllm_vla_pruner.engine.settings import PruningSettings
from vllm_vla_pruner.engine.step import StepChannel, StepContext
from vllm_vla_pruner.pruning import (
    ActionHistory,
    QKRequest,
    action_scores,
    attention_rows,
    checks,
    select_from_qk,
)

PAD_SLOT_ID = -1
#: ``kv_sink(layer, blocks, k, v)``: after each decoder layer of a step with action blocks,
#: the blocks in that layer's (possibly compacted) row layout and the layer's post-RoPE K and
#: V rows (pi0's action expert attends to them).
KVSink = Callable[[int, list[ActionBlock], torch.Tensor, torch.Tensor], None]


@dataclass
class _ActionTrack:
    """A request in flight whose action attention feeds its robot's history.

    Decode steps only collect the action layer's new keys and action queries; the attention
    is computed once, for all action queries together, when the action is complete (the
    per-step work stays two small copies however many robots share the batch).
    """

    session: str
    num_visual: int
    max_rows: int
    visual_start: int = 1
    keys: list[torch.Tensor] = field(default_factory=list)  # [t, Hkv, D] chunks, in order
    queries: list[torch.Tensor] = field(default_factory=list)  # [n, Hq, D] action queries
    positions: list[int] = field(default_factory=list)  # key-axis position of each query
    visual_ids: torch.Tensor | None = None  # original ids of the visual keys in that layout
    block: int = 0  # parallel decoding: rows of the action block (placeholders + stop)
    num_keys: int = 0
    rows: int = 0
    done: bool = False


@dataclass
class _Req:
    """One request's rows in this step."""

    req_id: str
    plan: PruningPlan | None
    max_tokens: int
    q_start: int  # row offset in the runner's layout
    q_len: int
    num_computed: int
    seq_len: int
    shift: int = 0  # P for pruned requests, else 0
    prune_now: bool = False  # choose kept tokens in this step (its prefill)
    kept: torch.Tensor | None = None  # original visual ids kept (prune_now only)
    had_history: bool = False  # the selection used the robot's smoothed action scores
    recomputed: bool = False  # preempted and re-prefilled with its generated tokens
    prompt_len: int = 0  # rows of this step that are the prompt (prefills)
    block: int = 0  # parallel decoding: the prefill's last rows that attend bidirectionally
    whole_block: bool = False  # prefix-LM models: every row of the prefill is bidirectional
    row: int = 0  # row offset in the current (possibly compacted) layout
    rows_now: int = 0


@dataclass
class PruneStats:
    """Counters the metrics exporter and benchmarks read (worker process)."""

    steps_pruned: int = 0
    requests_pruned: int = 0
    warmup_frames: int = 0
    history_missing: int = 0  # pruned frames whose expected action history was gone
    recomputed: int = 0  # re-prefills after preemption (action attention not recorded)
    actions_recorded: int = 0  # complete actions whose attention entered a robot's history
    visual_tokens_total: int = 0
    visual_tokens_kept: int = 0
    select_seconds: float = 0.0
    layers_after_k: int = 0
    num_layers: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class PrunedDecoder:
    """Owns the pruning state of one model replica (worker process)."""

    def __init__(self, model: Any, vllm_config: Any) -> None:
        self.model = model
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.settings = PruningSettings.from_vllm_config(vllm_config).check(self.num_layers)
        self.K = self.settings.layer
        self.action_layer = self.settings.action_layer_for(self.num_layers)
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = getattr(text, "num_key_value_heads", self.num_heads)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.num_heads
        self.grid = grid_shape(model.config)
        self.history = ActionHistory(
            window=self.settings.window,
            gamma=self.settings.gamma,
            max_sessions=self.settings.max_sessions,
            idle_timeout_s=self.settings.idle_timeout_s,
        )
        self.tracks: dict[str, _ActionTrack] = {}
        self.stats = PruneStats(layers_after_k=self.num_layers - self.K, num_layers=self.num_layers)
        self._lock = threading.Lock()
        self.kv_blocks_log: deque[tuple[str, list[int]]] = deque(maxlen=4096)
        self._trace_path = os.environ.get("VLA_PRUNER_TRACE")
        self.channel = StepChannel()
        # Prefix-LM models (pi0): a prefill is one bidirectional block of prompt rows, and the
        # action rows live outside the LM; the model reports their attention itself
        # (``record_action_scores``), so the decoder tracks no LM action rows.
        self.prefix_lm = False
        self.kept_now: dict[str, torch.Tensor] = {}  # this step's kept visual ids per request
        if self.settings.separate_kv_group:
            self._use_pruned_kv_spec(model)

    def _use_pruned_kv_spec(self, model: Any) -> None:
        """Put layers >= K in their own KV group, sized for the pruned length."""
        from vllm_vla_pruner.engine.kv_spec import PrunedAttentionSpec, register_spec

        register_spec()
        for layer in model.language_model.model.layers[self.K :]:
            attn = layer.self_attn.attn
            full_spec = attn.get_kv_cache_spec

            def get_kv_cache_spec(vllm_config, _full=full_spec):
                spec = _full(vllm_config)
                return None if spec is None else PrunedAttentionSpec.from_full(spec)

            attn.get_kv_cache_spec = get_kv_cache_spec

    # ------------------------------------------------------------------ entry point

    def run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        blocks: list[ActionBlock] | None = None,
        kv_sink: KVSink | None = None,
    ) -> torch.Tensor:
        """The decoder stack; ``blocks``: rows that attend bidirectionally (parallel-decoding
        models' action rows, prefix-LM models' whole prompts; in the runner's row order);
        ``kv_sink`` receives every layer's K/V of those blocks."""
        lm = self.model.language_model.model
        ctx = self.channel.current
        self.kept_now = {}
        if self.prefix_lm and blocks and ctx is not None:
            self._install_bidirectional_metadata(ctx)
        if ctx is None or not any(r.plan for r in ctx.requests):
            if blocks:
                return self._plain_blocks(lm, embeds, positions, blocks, kv_sink)
            return self._plain(lm, embeds, positions)
        return self._pruned(lm, ctx, embeds, positions, blocks or [], kv_sink)

    def _block_layer(self, layer: Any, pos: torch.Tensor, hidden, residual, blocks):
        """A layer whose blocks attend bidirectionally: (hidden, residual, q, k, v).

        Prefix-LM steps run the kernel itself without the causal mask
        (``_install_bidirectional_metadata``); other models' action blocks are recomputed
        by hand (``action_block.layer_with_blocks``)."""
        return layer_with_blocks(layer, pos, hidden, residual, [] if self.prefix_lm else blocks)

    def _plain_blocks(
        self,
        lm: Any,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        blocks: list[ActionBlock],
        kv_sink: KVSink | None = None,
    ) -> torch.Tensor:
        residual = None
        for i, layer in enumerate(lm.layers):
            hidden, residual, _, k, v = self._block_layer(
                layer, positions, hidden, residual, blocks
            )
            if kv_sink is not None:
                kv_sink(i, blocks, k, v)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    def _install_bidirectional_metadata(self, ctx: StepContext) -> None:
        """Prefix-LM models (pi0): every layer attends without the causal mask in this step
        (a prefill's whole prompt is one bidirectional block; a lone decode row sees all its
        keys either way). vLLM's kernels take ``causal=False``; the step's recorded metadata
        is updated too, so the compacted builds of layers >= K stay non-causal."""
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        for gid, groups in enumerate(ctx.runner.attn_groups):
            cm = ctx.common_metadata.get(gid)
            if cm is None:
                raise RuntimeError(f"vla_pruner: no attention metadata recorded for group {gid}")
            cm = dataclasses.replace(cm, causal=False)
            ctx.common_metadata[gid] = cm
            for g in groups:
                with self.channel.not_recorded():
                    metadata = g.build_metadata(cm, 0)
                for n in g.layer_names:
                    fc.attn_metadata[n] = metadata

    @staticmethod
    def _plain(lm: Any, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in lm.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    # ------------------------------------------------------------------ pruned step

    def _describe(self, ctx: StepContext) -> list[_Req]:
        cm = ctx.common_metadata[0]
        qsl = cm.query_start_loc_cpu.tolist()
        # The runner's CPU copy (num_computed + scheduled; exact without speculative drafts,
        # which this plugin does not run): reading the device copy would stall the GPU.
        seq_cpu = cm.seq_lens_cpu_upper_bound
        if seq_cpu is None or (checks.enabled() and not torch.equal(seq_cpu, cm.seq_lens.cpu())):
            seq_cpu = cm.seq_lens.cpu()
        seq_lens = seq_cpu.tolist()
        reqs = []
        for i, sr in enumerate(ctx.requests):
            q_start, q_len = qsl[i], qsl[i + 1] - qsl[i]
            r = _Req(
                sr.req_id, sr.plan, sr.max_tokens, q_start, q_len, seq_lens[i] - q_len, seq_lens[i]
            )
            plan = sr.plan
            if plan is not None and r.num_computed == 0:
                # A first prefill has exactly the prompt's rows; a recompute after preemption
                # also carries the tokens generated before it.
                r.recomputed = q_len > sr.num_prompt_tokens
                r.prompt_len = min(q_len, sr.num_prompt_tokens)
                self.stats.recomputed += int(r.recomputed)
                if not plan.prune:
                    total = plan.num_visual
                    self._report(r, PruneOutcome(False, total, total, recomputed=r.recomputed))
            if plan is not None and plan.prune:
                r.shift = plan.pruned_slots
                end_visual = plan.visual_start + plan.num_visual
                if r.num_computed == 0:
                    r.prune_now = True
                elif r.num_computed < end_visual:
                    raise RuntimeError(
                        "visual token pruning needs the whole image in one prefill step: "
                        "disable chunked prefill (--no-enable-chunked-prefill)"
                    )
            r.row, r.rows_now = q_start, q_len
            reqs.append(r)
        return reqs

    def _pruned(
        self,
        lm: Any,
        ctx: StepContext,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        blocks: list[ActionBlock],
        kv_sink: KVSink | None = None,
    ) -> torch.Tensor:
        reqs = self._describe(ctx)
        by_start = {b.start: b.end - b.block_start for b in blocks}
        for r in reqs:
            r.block = by_start.get(r.q_start, 0) if r.num_computed == 0 else 0
            if self.prefix_lm:  # the block is the prompt itself, not action rows after it
                r.whole_block, r.block = r.block > 0, 0
        for r in reqs:
            self._start_tracking(r)
        any_prune = any(r.prune_now for r in reqs)
        any_shift = any(r.shift for r in reqs)
        tracked = [r for r in reqs if r.req_id in self.tracks and not self.tracks[r.req_id].done]

        hidden, residual, pos = embeds, None, positions
        keep_index: torch.Tensor | None = None
        for i, layer in enumerate(lm.layers):
            if i == self.K and any_shift:
                keep_index = self._keep_index(reqs, embeds.shape[0])
                hidden, residual, pos = hidden[keep_index], residual[keep_index], pos[keep_index]
                self._install_compacted_metadata(ctx, reqs, pos)
            capture_sem = i == self.K - 1 and any_prune
            capture_act = i == self.action_layer and bool(tracked)
            now = self._blocks_now(reqs) if blocks else []
            if now:
                hidden, residual, q, k, v = self._block_layer(layer, pos, hidden, residual, now)
                if kv_sink is not None:
                    kv_sink(i, now, k, v)
                if capture_sem:
                    self._select(reqs, q, k, embeds)
                if capture_act:
                    self._capture_actions(tracked, q, k, compacted=i >= self.K)
            elif capture_sem or capture_act:
                hidden, residual, q, k, _ = layer_with_blocks(layer, pos, hidden, residual, [])
                if capture_sem:
                    self._select(reqs, q, k, embeds)
                if capture_act:
                    self._capture_actions(tracked, q, k, compacted=i >= self.K)
            else:
                hidden, residual = layer(pos, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        if keep_index is None:
            return hidden
        out = hidden.new_zeros(embeds.shape[0], hidden.shape[-1])
        out[keep_index] = hidden
        return out

    @staticmethod
    def _blocks_now(reqs: list[_Req]) -> list[ActionBlock]:
        """Each action block in the current (possibly compacted) row layout: the last rows of
        its request."""
        return [
            ActionBlock(
                r.row,
                r.row if r.whole_block else r.row + r.rows_now - r.block,
                r.row + r.rows_now,
            )
            for r in reqs
            if r.block or r.whole_block
        ]

    # ------------------------------------------------------------------ selection (layer K-1)

    def _select(self, reqs: list[_Req], q: torch.Tensor, k: torch.Tensor, embeds: torch.Tensor):
        """Kept visual tokens of every request prefilled now, from layer K-1's q/k: only the
        attention rows each request's pruner reads are computed (one for FastV)."""
        t0 = time.perf_counter()
        requests, targets = [], []
        for r in reqs:
            if not r.prune_now:
                continue
            plan = r.plan
            # Scores come from the prompt's rows only: a recompute after preemption also
            # carries the action tokens decoded before it, which must not vote.
            # Parallel decoding: the action block is this frame's action signal, not prefill.
            n = r.prompt_len - r.block
            rows = slice(r.row, r.row + n)
            vs, m = plan.visual_start, plan.num_visual
            estimate = None
            if plan.track_actions and plan.session:
                estimate = self.history.estimate(plan.session)
            r.had_history = estimate is not None
            rows_g, cols_g = self.grid
            # Views stacked vertically; a request with fewer views (pi0's masked cameras) has
            # fewer grid rows.
            grid = self.grid if rows_g * cols_g == m or m % cols_g else (m // cols_g, cols_g)
            fields = dict(
                visual_start=vs,
                num_visual=m,
                embeddings=embeds[r.row + vs : r.row + vs + m].float(),
                action_estimate=estimate,
                grid_shape=grid,
                seed=plan.seed,
                semantic_rows=self.settings.semantic_rows,
                text_start=vs + m,
            )
            qi = q[rows].view(n, self.num_heads, self.head_dim)
            ki = k[rows].view(n, self.num_kv_heads, self.head_dim)
            requests.append(QKRequest(qi, ki, plan.method, plan.num_keep, fields, self.prefix_lm))
            targets.append(r)
        for r, kept in zip(targets, select_from_qk(requests)):
            r.kept = kept
            self.kept_now[r.req_id] = kept
        self.stats.select_seconds += time.perf_counter() - t0
        self.stats.steps_pruned += 1
        for r in targets:
            kept = r.kept.numel()  # a shape, known on the host: no device sync
            missing = r.plan.expects_history and not r.had_history
            self.stats.requests_pruned += 1
            self.stats.visual_tokens_total += r.plan.num_visual
            self.stats.visual_tokens_kept += kept
            self.stats.history_missing += int(missing)
            self._report(
                r,
                PruneOutcome(
                    pruned=kept < r.plan.num_visual,
                    visual_tokens_total=r.plan.num_visual,
                    visual_tokens_kept=kept,
                    used_history=r.had_history,
                    history_missing=missing,
                    recomputed=r.recomputed,
                ),
            )
            self._trace(r)

    def _keep_index(self, reqs: list[_Req], num_rows: int) -> torch.Tensor:
        """Rows (of ``num_rows``) that layers >= K run on, ascending; updates each request's
        compacted row range. Padding rows after the last request are dropped.

        Built by concatenation on the kept ids' device (not a mask's ``nonzero``), so its
        size comes from host ints and nothing waits for the device."""
        device = next((r.kept.device for r in reqs if r.kept is not None), torch.device("cpu"))
        parts = []
        for r in reqs:
            start, end = r.q_start, r.q_start + r.q_len
            if r.prune_now:
                vs, m = r.plan.visual_start, r.plan.num_visual
                parts.append(torch.arange(start, start + vs, device=device))
                parts.append(r.kept.to(device) + (start + vs))
                parts.append(torch.arange(start + vs + m, end, device=device))
            else:
                parts.append(torch.arange(start, end, device=device))
        row = 0
        for r in reqs:
            r.row = row
            r.rows_now = r.q_len - (r.shift if r.prune_now else 0)
            row += r.rows_now
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(parts)

    def _install_compacted_metadata(
        self, ctx: StepContext, reqs: list[_Req], pos: torch.Tensor
    ) -> None:
        """Attention metadata and KV slots of layers >= K for the compacted rows."""
        from vllm.forward_context import get_forward_context
        from vllm.model_executor.models.utils import extract_layer_index

        fc = get_forward_context()
        runner = ctx.runner
        q_lens = torch.tensor([r.rows_now for r in reqs], dtype=torch.int32)
        seq_lens = torch.tensor([r.seq_len - r.shift for r in reqs], dtype=torch.int32)
        starts = torch.tensor(
            [r.num_computed - (r.shift if r.num_computed > 0 else 0) for r in reqs],
            dtype=torch.int64,
        )
        qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(q_lens, 0)
        req_of_row = torch.repeat_interleave(torch.arange(len(reqs)), q_lens.long())
        within = torch.arange(int(qsl[-1])) - qsl[:-1].long()[req_of_row]
        compact_pos = starts[req_of_row] + within  # index in the compacted KV sequence
        for gid, groups in enumerate(runner.attn_groups):
            names = [n for g in groups for n in g.layer_names if extract_layer_index(n) >= self.K]
            if not names:
                continue
            # Group 0's metadata is rebuilt every step; other groups' builders may take an
            # update-in-place path, so read this group's block table from the runner itself.
            cm = ctx.common_metadata[0]
            bs = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec.block_size
            bt = runner.input_batch.block_table[gid].get_device_tensor(cm.num_reqs)
            device = bt.device
            slots = bt[req_of_row.to(device), (compact_pos // bs).to(device)].long() * bs + (
                compact_pos % bs
            ).to(device)
            n_reqs = cm.num_reqs
            pad_reqs = n_reqs - len(reqs)
            qsl_full = torch.cat([qsl, qsl[-1:].repeat(pad_reqs)]) if pad_reqs else qsl
            seq_full = torch.cat([seq_lens, seq_lens.new_zeros(pad_reqs)]) if pad_reqs else seq_lens
            new_cm = dataclasses.replace(
                cm,
                query_start_loc=qsl_full.to(device),
                query_start_loc_cpu=qsl_full,
                seq_lens=seq_full.to(device),
                seq_lens_cpu_upper_bound=seq_full,
                num_actual_tokens=int(qsl[-1]),
                max_query_len=int(q_lens.max()),
                max_seq_len=int(seq_lens.max()),
                block_table_tensor=bt,
                slot_mapping=slots,
                positions=pos,
            )
            for g in groups:
                layer_names = [n for n in g.layer_names if extract_layer_index(n) >= self.K]
                if not layer_names:
                    continue
                with self.channel.not_recorded():  # maps to kernel blocks, then the builder
                    metadata = g.build_metadata(new_cm, 0)
                for n in layer_names:
                    fc.attn_metadata[n] = metadata
                    if isinstance(fc.slot_mapping, dict):
                        fc.slot_mapping[n] = slots

    # ------------------------------------------------------------------ action attention

    def _start_tracking(self, r: _Req) -> None:
        plan = r.plan
        if plan is None or not plan.track_actions or r.num_computed != 0:
            return  # nothing to record, or joined mid-request (e.g. restart)
        if r.recomputed:
            # Re-prefill after preemption (vLLM keeps the request's worker state, so its track
            # is still here): its rows past the prompt are the action tokens decoded before,
            # not this frame's action queries. The partial action is dropped, not recorded.
            self.tracks.pop(r.req_id, None)
            return
        if r.req_id in self.tracks:
            return
        if plan.new_episode:
            self.history.reset(plan.session)
        if plan.warmup:
            self.stats.warmup_frames += 1
        if self.prefix_lm:
            return  # the model reports its action rows' attention (record_action_scores)
        self.tracks[r.req_id] = _ActionTrack(
            block=r.block,
            session=plan.session,
            num_visual=plan.num_visual,
            max_rows=r.block - 1 if r.block else r.max_tokens,
            visual_start=plan.visual_start,
        )

    def _capture_actions(self, reqs: list[_Req], q: torch.Tensor, k: torch.Tensor, compacted: bool):
        t0 = time.perf_counter()
        for r in reqs:
            track = self.tracks[r.req_id]
            rows = slice(r.row, r.row + r.rows_now)
            if not track.keys:  # the prefill: every key, and the last prompt row's query
                m = track.num_visual
                track.visual_ids = (
                    r.kept
                    if (compacted and r.kept is not None)
                    else torch.arange(m, device=k.device)
                )
                new_queries = q[r.row + r.rows_now - 1 : r.row + r.rows_now]
                if track.block:  # parallel decoding: the placeholders (the stop row is not one)
                    end = r.row + r.rows_now - 1
                    new_queries = q[end - track.max_rows : end]
            else:
                new_queries = q[rows]
            track.keys.append(k[rows].clone())
            track.num_keys += r.rows_now
            n_new = new_queries.shape[0]
            track.queries.append(new_queries.clone())
            if track.block:  # bidirectional: every placeholder sees every key of the request
                track.positions.extend([track.num_keys - 1] * n_new)
            else:
                track.positions.extend(range(track.num_keys - n_new, track.num_keys))
            track.rows += n_new
            if track.rows >= track.max_rows:
                self._finish_track(r.req_id)
        self.stats.select_seconds += time.perf_counter() - t0

    def _finish_track(self, req_id: str) -> None:
        """Score the completed action's attention over the visual keys into the history."""
        track = self.tracks.get(req_id)
        if track is None or track.done:
            return
        track.done = True
        if track.rows >= track.max_rows:  # a preempted or aborted action is not an action
            keys = torch.cat(track.keys).view(track.num_keys, self.num_kv_heads, self.head_dim)
            queries = torch.cat(track.queries).view(track.rows, self.num_heads, self.head_dim)
            positions = torch.tensor(track.positions, device=keys.device)
            rows_attn = attention_rows(queries, keys, positions)
            nv = track.visual_ids.numel()
            key_cols = torch.arange(track.visual_start, track.visual_start + nv, device=keys.device)
            scores = action_scores(rows_attn, key_cols, track.visual_ids, track.num_visual)
            self.history.push(track.session, scores)
            self.stats.actions_recorded += 1
        track.keys, track.queries = [], []

    def record_action_scores(self, session: str, scores: torch.Tensor) -> None:
        """A prefix-LM model's frame action signal (original visual ids) into the history."""
        with self._lock:
            self.history.push(session, scores)
            self.stats.actions_recorded += 1

    def _report(self, r: _Req, outcome: PruneOutcome) -> None:
        self.channel.report(r.req_id, outcome)

    def on_request_finished(self, req_id: str, kv_blocks: list[int] | None = None) -> None:
        """Runner hook: the request left the batch (finished, aborted or preempted)."""
        with self._lock:
            self._finish_track(req_id)
            self.tracks.pop(req_id, None)
            if kv_blocks:
                self.kv_blocks_log.append((req_id, kv_blocks))

    def report(self) -> dict[str, Any]:
        """Counters for metrics and benchmarks (read through ``collective_rpc``)."""
        return {
            "stats": dataclasses.asdict(self.stats),
            "sessions": len(self.history),
            "kv_blocks": list(self.kv_blocks_log),
        }

    # ------------------------------------------------------------------ tracing

    def _trace(self, r: _Req) -> None:
        if not self._trace_path:
            return
        rec = {
            "req_id": r.req_id,
            "session": r.plan.session,
            "method": r.plan.method,
            "num_keep": r.plan.num_keep,
            "kept": r.kept.tolist(),
            "had_history": r.had_history,
            "recomputed": r.recomputed,
            "rows": r.q_len,
        }
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
