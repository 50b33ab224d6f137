"""Per-layer rules: captured (inputs, output gradients) of one module -> per-sample statistics.

* :mod:`.base`      -- the contract (:class:`Call`, :class:`Rule`), the registry (:data:`RULES`,
  :func:`register_rule`, :func:`rule_for`) and the shared helpers (:func:`reduce_into`,
  :func:`chunk_rows`, :func:`call_input`, :data:`CHUNK_BYTES`, ...).
* :mod:`.linear`    -- ``nn.Linear``: weight P_n = G_n^T A_n via :func:`ewc_fast.ops.persample_sq_`, bias sum_t G_n.
* :mod:`.conv`      -- ``nn.Conv1d/2d/3d``: the direct per-sample kernel :func:`ewc_fast.ops.persample_conv_sq_`
  (im2col, then as Linear per group, for a module called several times per batch).
* :mod:`.conv_transpose` -- ``nn.ConvTranspose1d/2d/3d``: the same kernel with input and output gradient swapped.
* :mod:`.embedding` -- ``nn.Embedding``: P_n[v] = sum_{t: id_nt = v} G_nt (duplicates summed before squaring).
* :mod:`.norm`      -- LayerNorm, RMSNorm, GroupNorm, BatchNorm: weight sum_t G ⊙ x_hat, bias sum_t G.
* :mod:`.attention` -- ``nn.MultiheadAttention``: the input projections' output gradients and the
  context, read from inside its calls (:mod:`.attention_watch`), squared against the inputs.

Every module states its formulas (Fisher / MAS statistics and SIG, Kutalev 2020) in its docstring.
Importing this package registers the built-in rules below in :data:`RULES`; user rules are added
with :func:`register_rule`.
"""

from torch import nn

from .attention import MultiheadAttentionRule
from .base import (
    CHUNK_BYTES,
    RULES,
    Call,
    InnerCapture,
    Rule,
    call_input,
    chunk_rows,
    reduce_into,
    register_rule,
    rule_for,
)
from .conv import ConvRule, conv_padding, unfold
from .conv_transpose import ConvTransposeRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import BatchNormRule, GroupNormRule, LayerNormRule, NormRule, RMSNormRule

__all__ = [
    "CHUNK_BYTES",
    "RULES",
    "Call",
    "InnerCapture",
    "Rule",
    "call_input",
    "chunk_rows",
    "reduce_into",
    "register_rule",
    "rule_for",
    "LinearRule",
    "ConvRule",
    "ConvTransposeRule",
    "conv_padding",
    "unfold",
    "EmbeddingRule",
    "NormRule",
    "LayerNormRule",
    "RMSNormRule",
    "GroupNormRule",
    "BatchNormRule",
    "MultiheadAttentionRule",
]


def _register_builtin_rules() -> None:
    builtin = {
        nn.Linear: LinearRule(),
        nn.Conv1d: ConvRule(),
        nn.Conv2d: ConvRule(),
        nn.Conv3d: ConvRule(),
        nn.ConvTranspose1d: ConvTransposeRule(),
        nn.ConvTranspose2d: ConvTransposeRule(),
        nn.ConvTranspose3d: ConvTransposeRule(),
        nn.Embedding: EmbeddingRule(),
        nn.LayerNorm: LayerNormRule(),
        nn.GroupNorm: GroupNormRule(),
        nn.BatchNorm1d: BatchNormRule(),
        nn.BatchNorm2d: BatchNormRule(),
        nn.BatchNorm3d: BatchNormRule(),
        nn.MultiheadAttention: MultiheadAttentionRule(),
    }
    if hasattr(nn, "RMSNorm"):
        builtin[nn.RMSNorm] = RMSNormRule()
    for module_type, rule in builtin.items():
        register_rule(module_type, rule)


_register_builtin_rules()
