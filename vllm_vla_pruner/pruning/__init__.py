"""VLA-Pruner visual-token pruning core: engine-free PyTorch functions.

Scores (attention rows -> semantic / action importance), per-episode temporal smoothing of
action scores, Combine-then-Filter selection, and the named baselines behind one registry.
The engine integration calls these; nothing here imports vLLM.
"""

from .history import ActionHistory, decay_weights
from .pruners import (
    PRUNERS,
    PruneInputs,
    budget_for,
    get_pruner,
    needs_action_history,
    register_pruner,
    select_batch,
    select_tokens,
    validate_inputs,
)
from .scores import SEMANTIC_ROWS, action_scores, attention_rows, semantic_scores
from .selection import (
    combine_then_filter,
    cosine_distance_matrix,
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
    "PruneInputs",
    "action_scores",
    "attention_rows",
    "budget_for",
    "combine_then_filter",
    "cosine_distance_matrix",
    "decay_weights",
    "get_pruner",
    "greedy_maxmin",
    "greedy_maxmin_batched",
    "greedy_maxmin_from_distances",
    "needs_action_history",
    "register_pruner",
    "select_batch",
    "select_tokens",
    "semantic_scores",
    "stable_topk",
    "union_indices",
    "validate_inputs",
]
