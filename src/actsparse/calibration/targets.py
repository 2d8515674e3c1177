"""Which Linear layers are pruned, and how their inputs group (backend-neutral).

A graph MatMul is traced from a Hugging Face module; the module's name says its kind.
Consumers of one input tensor (gate+up, q+k+v) form a group that shares ``m``, ``τ`` and
one mask, as NNCF's ``_group_nodes_by_source`` does for SmoothQuant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Module-name suffix -> kind; the longest matching suffix wins.
KIND_BY_SUFFIX = {
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "up",
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "qkv",
    "mlp.c_fc": "up", "mlp.c_proj": "down", "attn.c_attn": "qkv", "attn.c_proj": "o",          # GPT-2
    "intermediate.dense": "up", "output.dense": "down", "attention.output.dense": "o",          # BERT
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "fc1": "up", "fc2": "down", "self_attn.out_proj": "o", "self_attn.dense": "o",             # OPT, Phi
    "dense_h_to_4h": "up", "dense_4h_to_h": "down", "query_key_value": "qkv",                  # NeoX, Falcon
    "attention.dense": "o", "self_attention.dense": "o",
}
# The kind whose --sparsity-KIND flag sets a layer's sparsity; one per group.
SPARSITY_KIND = {"gate": "up", "up": "up", "down": "down", "q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "o": "o"}
SPARSITY_KINDS = ("up", "down", "qkv", "o")
TARGET_KINDS = {"mlp": {"up", "down"}, "all": {"up", "down", "qkv", "o"}}


def kind_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(min(3, len(parts)), 0, -1):
        kind = KIND_BY_SUFFIX.get(".".join(parts[-n:]))
        if kind:
            return kind
    return None


@dataclass
class Target:
    module: str        # Hugging Face module name, e.g. model.layers.0.mlp.down_proj
    node: str          # graph node name of the MatMul
    kind: str          # gate | up | down | q | k | v | qkv | o
    in_features: int
    out_features: int


@dataclass
class Group:
    """Target layers that read one tensor; ``name`` identifies that tensor in the graph."""
    name: str
    targets: list[Target] = field(default_factory=list)

    @property
    def sparsity_kind(self) -> str:
        return SPARSITY_KIND[self.targets[0].kind]


def group_targets(targets: list[tuple[str, Target]], kinds: set[str]) -> list[Group]:
    """Group ``(source tensor name, target)`` pairs by source, keeping the sparsity kinds asked for."""
    groups: dict[str, Group] = {}
    for source, target in targets:
        if SPARSITY_KIND[target.kind] in kinds:
            groups.setdefault(source, Group(source)).targets.append(target)
    for group in groups.values():
        mixed = {SPARSITY_KIND[t.kind] for t in group.targets}
        if len(mixed) > 1:  # e.g. a tensor read by both an MLP and an attention projection
            raise ValueError(f"tensor {group.name} feeds layers of kinds {sorted(mixed)}")
    return list(groups.values())
