"""What both backends' rewrites agree on: the reference pattern's shape and how a rule reports.

The pattern apply_plan inserts in front of the MatMuls of one input x (mode m, threshold τ):

    z     = x − m                                  (no Subtract when m = 0)
    keep  = ¬(|z| ≤ τ)  [∨ keep_dense]             keep_dense: tokens per sequence ≠ 1 (prefill dense)
    z'    = Select(keep, z, 0)
    y_j   = z'·W_j [+ m·rowsum(W_j)]               (no Add when m = 0)

Rules recognise it by its structure (op types, constants, which value feeds which input), never by
node names: a model whose nodes were renamed, or written by another tool, is rewritten alike.
"""
from __future__ import annotations

import logging

log = logging.getLogger("actsparse")

# Name part of the inserted prefill test, for people reading the graph: no rule reads it.
KEEP_DENSE = "keep_dense"
# The token axis of a ``[batch, tokens, features]`` activation, tested by keep_dense.
TOKEN_AXIS = -2


def prefixes(plan: dict) -> dict[str, str]:
    """``actsparse.<module>`` for each planned MatMul's node name, to name the nodes that replace it."""
    return {layer["node"]: f"actsparse.{layer['module']}" for layer in plan.get("layers", [])}


def refuse(rule: str, where: str, reason: str) -> bool:
    """Log why ``rule`` leaves a match at ``where`` as it is; returns False (the callback's answer)."""
    log.warning("%s: not rewriting %s: %s", rule, where, reason)
    return False
