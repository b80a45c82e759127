"""Tree attention: many continuations of one prompt in a single batch row of its KV cache.

The trie sampler (:func:`modules.sampling.trie_sample`) and the weighted scorer
(:func:`modules.weighted.weighted_predict`) both lay a tree of token sequences after a prompt in
one cache row. A 4D additive attention mask lets each node see only the prompt and its own
ancestors, and its position id is the prompt length plus its depth, so its logits equal those of
its path run as a plain sequence, while the prompt's keys and values are stored once.
"""
from __future__ import annotations

import torch

# Attention implementations that take a custom 4D mask as given. Flash attention and the paged
# kernels build their own causal masks and would silently ignore the tree.
TREE_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def require_tree_attention(model, user: str, alternative: str) -> None:
    """Raise ``ValueError`` unless ``model`` uses an attention implementation that honours a
    custom 4D mask; the message names the caller (``user``) and what to do instead."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in TREE_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{user} needs sdpa or eager attention (custom 4D masks), the model uses "
                         f"{attention!r}: {alternative}")


def tree_attention_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``[B, 1, Q, L]`` from a boolean "query q sees cache slot l" table ``[B, Q, L]``:
    0 where visible, the dtype's minimum elsewhere. The model uses a 4D mask as given, which is what
    lets one cache row hold a whole tree."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
