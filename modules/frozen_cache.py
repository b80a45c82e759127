"""Frozen lower layers computed once (issue 46, ``main_pipeline.py --cache_frozen_layers``).

With LoRA on the top N decoder layers only (``--lora_top_layers N``), the layers below them never
change during training, so their output for a training example is the same at every epoch. Each
example's input to the first adapted layer, s = n_layers - N, is computed once before training
(:func:`frozen_states`), and every training step runs the model from layer s on
(:func:`layers_from`): the embeddings and the s lower layers cost nothing after the first pass, in
the forward or the backward.

    full:    logits = head(norm(L_{n-1}(... L_s(L_{s-1}(... L_0(embed(ids)))))))
    cached:  h_s = L_{s-1}(... L_0(embed(ids)))       once per example, no gradient
             logits = head(norm(L_{n-1}(... L_s(h_s))))  every step

Both read the same attention mask and positions, so they agree to float rounding; hidden-state
index l of the full pass is index l - s of the cached one. The model must feed ``inputs_embeds``
to its first layer unchanged (Llama, Mistral and Qwen do; Gemma scales them):
:func:`check_cached_forward` compares both paths on one example before training and refuses a
model where they differ.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STATES_KEY = "frozen_states"  # an example's [T, D] input to the first adapted layer


def decoder(model) -> nn.Module:
    """The decoder stack (the module holding ``layers``) inside a PEFT, causal-LM or bare model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "model", inner)
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(inner).__name__} has no decoder layer list: the frozen-layer cache needs one")
    return inner


@contextmanager
def layers_from(model, start: int, stop: int | None = None) -> Iterator[None]:
    """Within the block the model runs decoder layers ``start`` .. ``stop - 1`` only (its layer list
    cut; the final norm and LM head still run). Give it ``inputs_embeds`` = the states entering
    layer ``start``."""
    inner = decoder(model)
    hook_whole_stack(inner)
    layers = inner.layers
    inner.layers = nn.ModuleList(list(layers)[start:stop])
    try:
        yield
    finally:
        inner.layers = layers


def hook_whole_stack(inner: nn.Module) -> None:
    """Install transformers' hidden-state recording hooks on every decoder layer of ``inner`` now.
    transformers installs them once, on the first forward that asks for hidden states, on the
    layers present then: first asked inside :func:`layers_from`, every later whole pass would miss
    the dropped layers' states (a run resumed with a score head and the cache, then scored)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # a transformers that records without lasting hooks
        return
    maybe_install_capturing_hooks(inner)


def first_adapted_layer(model) -> int:
    """The lowest decoder layer with a trainable parameter (LoRA); every layer below it is frozen."""
    for index, layer in enumerate(decoder(model).layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    raise ValueError("no decoder layer is trained")


def frozen_states(model, examples: Sequence[dict], start: int) -> list[torch.Tensor]:
    """Per example (``input_ids``), float32 [T, D] on the CPU: the hidden states entering decoder
    layer ``start``, each example run alone through the embeddings and layers 0 .. start - 1 in
    eval mode (no dropout) without gradient, under the caller's autocast."""
    inner = decoder(model)
    captured: list[torch.Tensor] = []
    hook = inner.layers[start - 1].register_forward_hook(
        lambda module, args, output: captured.append((output[0] if isinstance(output, tuple) else output).detach()))
    device = inner.norm.weight.device
    was_training = model.training
    model.eval()
    states = []
    try:
        with torch.no_grad(), layers_from(model, 0, start):
            for example in tqdm(examples, desc="frozen layers", unit="essay", disable=None):
                ids = torch.tensor([example["input_ids"]], device=device)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)
                states.append(captured.pop()[0].float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return states


def with_frozen_states(model, examples: Sequence[dict], start: int) -> list[dict]:
    """``examples`` each with its :func:`frozen_states` under ``STATES_KEY`` (what the collator pads
    and the trainer's cached path reads), under the caller's autocast."""
    return [{**ex, STATES_KEY: state} for ex, state in zip(examples, frozen_states(model, examples, start))]


def cached_forward(model, states: torch.Tensor, start: int, stop: int | None = None, **kwargs):
    """The model's outputs from ``states`` [B, T, D] entering layer ``start`` (``kwargs``: the
    attention mask, positions, ``logits_to_keep``, ...), through layer ``stop - 1`` (default: the
    last); hidden-state index l is l - start here."""
    with layers_from(model, start, stop):
        return model(inputs_embeds=states.to(decoder(model).norm.weight.dtype), **kwargs)


def check_cached_forward(model, example: dict, start: int, atol: float = 1e-3) -> float:
    """The largest absolute difference between the logits of a full forward and of the cached path
    on one example, in eval mode and float32; ValueError above ``atol`` (a model that transforms
    ``inputs_embeds`` before its first layer)."""
    [state] = frozen_states(model, [example], start)
    device = decoder(model).norm.weight.device
    ids = torch.tensor([example["input_ids"]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            cached = cached_forward(model, state[None].to(device), start, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    gap = float((full - cached).abs().max())
    if gap > atol:
        raise ValueError(f"the frozen-layer cache changes this model's logits by {gap:.3g} (it transforms "
                         "inputs_embeds before its first layer); train without --cache_frozen_layers")
    return gap
