"""VLA-Pruner visual-token pruning core: engine-free PyTorch functions.

Scores (attention rows -> semantic / action importance), per-episode temporal smoothing of
action scores, Combine-then-Filter selection, and the named baselines behind one registry.
Each pruner declares the attention rows it reads, so the engine computes only those. The
engine integration calls these; nothing here imports vLLM, and nothing on the engine's path
reads device memory from the host unless ``VLA_PRUNER_DEBUG_CHECKS=1`` (see ``checks``).
"""

from .checks import debug_checks
from .history import ActionHistory, decay_weights
from .pruners import (
    PRUNERS,
    PromptLayout,
    PruneInputs,
    QKRequest,
    budget_for,
    get_pruner,
    needed_rows,
    needs_action_history,
    register_pruner,
    select_batch,
    select_from_qk,
    select_tokens,
    validate_inputs,
)
from .scores import (
    SEMANTIC_ROWS,
    action_scores,
    attention_rows,
    semantic_row_range,
    semantic_scores,
)
from .selection import (
    combine_then_filter,
    combine_then_filter_batch,
    cosine_distance_matrix,
    diversity_filter,
    greedy_maxmin,
    greedy_maxmin_batched,
    greedy_maxmin_from_distances,
    stable_topk,
    union_indices,
)

__all__ = [
    "PRUNERS",
    "SEMANTIC_ROWS",
    "ActionHistory",
    "PromptLayout",
    "PruneInputs",
    "QKRequest",
    "action_scores",
    "attention_rows",
    "budget_for",
    "combine_then_filter",
    "combine_then_filter_batch",
    "cosine_distance_matrix",
    "debug_checks",
    "decay_weights",
    "diversity_filter",
    "get_pruner",
    "greedy_maxmin",
    "greedy_maxmin_batched",
    "greedy_maxmin_from_distances",
    "needed_rows",
    "needs_action_history",
    "register_pruner",
    "select_batch",
    "select_from_qk",
    "select_tokens",
    "semantic_row_range",
    "semantic_scores",
    "stable_topk",
    "union_indices",
    "validate_inputs",
]
