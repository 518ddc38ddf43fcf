"""Per-token and per-sequence log-probabilities of completions under a causal language model.

The textbook recipe (as in the DPO paper's reference code) is: run the model, take ``log_softmax``
of the logits, shift by one, gather each actual next token, mask out the prompt and padding. Done
literally, that materialises a ``[batch, seq, vocab]`` logits tensor, a second one of the same size
for ``log_softmax`` (in float32 when the model runs in bf16), and keeps both alive for the backward
pass. With a 128k vocabulary and 4k tokens that is ~2 GB per sequence per tensor: the largest
thing in preference training by far.

:func:`token_logprobs` avoids all of it:

* It runs only the *backbone* (the model without its output projection) to get final hidden states.
* It keeps only the hidden states that predict completion tokens (position ``t-1`` predicts token
  ``t``). Prompt and padding positions never reach the vocabulary projection, which skips roughly
  half of the ``lm_head`` compute on typical preference data.
* It projects those rows onto the vocabulary ``chunk_size`` rows at a time, in float32, and turns
  each chunk into ``log_softmax(logits)[target]`` at once: ``[chunk_size, vocab]`` is the largest
  tensor it ever creates, never ``[N, vocab]`` or ``[batch, seq, vocab]``.
* A plain ``nn.Linear`` head (tied or not) goes through :mod:`preftune.speed.head`, whose hand-written
  backward recomputes each chunk's projection once, or not at all when the head is frozen (LoRA).
  Any other head (LoRA-wrapped, softcapped, hooked) is called as a module, so its adapter or hook
  applies, with each chunk under activation checkpointing when gradients are needed: the graph
  stores only the chunk's input hidden states. Under ``torch.no_grad`` / ``inference_mode`` (the
  reference model) nothing is kept for a backward pass.

Model-specific logit post-processing is honoured: Cohere's ``logit_scale``, Granite's
``logits_scaling`` and Gemma's ``final_logit_softcapping``.

For PPO and evaluation, :func:`token_logprobs_and_entropy` also returns each predicted distribution's
entropy (computed in the same chunks, optionally at a sampling temperature), and
:func:`final_hidden_states` + :func:`completion_logprobs` let a caller reuse the hidden states (a value
head on the same backbone).

Under data parallelism, call this inside the forward of the module the distributed wrapper wraps
(``preftune.modality.logprobs.CompletionLogprobs``): calling the inner model's submodules from outside the
wrapper's forward would skip its gradient synchronisation. Likewise ``model.forward`` itself is
never called, so an autocast patched into it (accelerate's mixed precision) does not apply: run
under ``accelerator.autocast()`` / ``torch.autocast`` or load the weights in the target dtype.

peft models: a LoRA-style ``PeftModel`` is unwrapped with ``get_base_model()``; its adapter layers
stay injected in the modules, so they still apply, and ``with peft_model.disable_adapter():`` still
switches them off. Prompt-learning adapters (prefix / prompt tuning) change the model's inputs
rather than its modules, so for them the peft model's own forward runs and its backbone's hidden
states are captured on the way (the logits it computes for the last position only, where the model
supports ``logits_to_keep``, are thrown away); the vocabulary projection is then chunked as above.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .data.packed import PackedLayout, scored_positions
from .speed.head import linear_head_logprobs, log_softmax_stats, plain_linear, token_stats
from .wrappers import base_model, is_peft_model


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor,
                   chunk_size: int = 1024, position_ids: Tensor | None = None,
                   model_kwargs: dict[str, Any] | None = None, stats: list | None = None) -> Tensor:
    """Log-probability of each completion token given everything before it.

    Args:
        model: a Hugging Face ``*ForCausalLM`` model, or a peft ``PeftModel`` wrapping one.
        input_ids: ``[B, L]`` token ids (prompt + completion + padding).
        attention_mask: ``[B, L]`` passed to the model as is.
        completion_mask: ``[B, L]`` bool (or 0/1), true at completion tokens. Position 0 has no
            predecessor and is never scored.
        chunk_size: rows projected onto the vocabulary at a time.
        position_ids: optional ``[B, L]`` position ids passed to the model (padding-free batches).
        model_kwargs: further keyword arguments of the model's forward (a packed row's block layout).
        stats: a list that receives ``(token stats [N, 4], row of each token [N])`` of the N completion
            tokens (:func:`~preftune.speed.head.token_stats`).

    Returns:
        float32 ``[B, L]``: entry ``[b, t]`` is ``log p(input_ids[b, t] | input_ids[b, :t])`` where
        ``completion_mask[b, t]`` is true, exactly 0 elsewhere. Differentiable with respect to the
        model's parameters.
    """
    _check_inputs(input_ids, completion_mask, chunk_size)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids, **(model_kwargs or {}))
    chunks = [] if stats is not None else None
    values, _ = completion_logprobs(model, hidden, input_ids, completion_mask, chunk_size=chunk_size, stats=chunks)
    if stats is not None:
        rows = completion_mask[:, 1:].to(device=values.device, dtype=torch.bool).nonzero()[:, 0]
        stats.append((torch.cat(chunks) if chunks else values.new_zeros(0, 4), rows))
    return _to_token_layout(values, completion_mask)


def token_logprobs_and_entropy(model, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor,
                               chunk_size: int = 1024, position_ids: Tensor | None = None,
                               temperature: float = 1.0, model_kwargs: dict[str, Any] | None = None
                               ) -> tuple[Tensor, Tensor]:
    """:func:`token_logprobs` plus the entropy of each predicted next-token distribution.

    Both ``[B, L]`` float32, 0 off the completion. The entropy at ``[b, t]`` is that of the
    distribution that predicted ``input_ids[b, t]``; it is computed per chunk with the log-probs
    (no ``[B, L, V]`` tensor). ``temperature`` divides the logits first, as sampling does. ``model_kwargs``:
    further inputs of the backbone's forward (the prompts' image tensors).
    """
    _check_inputs(input_ids, completion_mask, chunk_size)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids, **(model_kwargs or {}))
    values, entropy = completion_logprobs(model, hidden, input_ids, completion_mask, chunk_size=chunk_size,
                                          temperature=temperature, with_entropy=True)
    return _to_token_layout(values, completion_mask), _to_token_layout(entropy, completion_mask)


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None,
                        position_ids: Tensor | None = None, **extra: Any) -> Tensor:
    """``[B, L, H]``: what the model's output projection would receive (peft unwrapped as above).

    ``extra`` keyword arguments go to the backbone's forward (a packed row's block layout)."""
    causal_lm, backbone, _ = _split_model(model)
    return _final_hidden_states(model, causal_lm, backbone, input_ids, attention_mask, position_ids, extra)


def completion_logprobs(model, hidden: Tensor, input_ids: Tensor, completion_mask: Tensor, chunk_size: int = 1024,
                        temperature: float = 1.0, with_entropy: bool = False,
                        stats: list | None = None) -> tuple[Tensor, Tensor | None]:
    """Flat float32 ``[N]`` log-probs of the N completion tokens (row-major order) from ``hidden``.

    ``hidden`` comes from :func:`final_hidden_states`; state ``t-1`` predicts token ``t``, so
    ``hidden[:, :-1][completion_mask[:, 1:]]`` are the rows used, in the same order. With
    ``with_entropy`` the second value is the ``[N]`` entropy of those distributions, else None.
    """
    target_mask = completion_mask[:, 1:].to(device=input_ids.device, dtype=torch.bool)
    selected = hidden[:, :-1][target_mask]          # [N, H]: only states that predict completion tokens
    targets = input_ids[:, 1:][target_mask]         # [N]
    return projected_logprobs(model, selected, targets, chunk_size, temperature, with_entropy, stats)


def projected_logprobs(model, selected: Tensor, targets: Tensor, chunk_size: int = 1024, temperature: float = 1.0,
                       with_entropy: bool = False, stats: list | None = None) -> tuple[Tensor, Tensor | None]:
    """``log p(targets[i] | selected[i])`` (and the entropies) for ``[N, H]`` hidden states, chunk by chunk;
    ``stats`` (a list) receives each chunk's :func:`~preftune.speed.head.token_stats`, ``[rows, 4]``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    causal_lm, _, lm_head = _split_model(model)
    scale, softcap = _logit_postprocessing(causal_lm.config)
    if selected.shape[0] == 0:  # no completion token at all: keep the result attached to the graph
        values = selected.sum(-1).float() * 0.0
        return values, values.detach().clone() if with_entropy else None
    head = plain_linear(lm_head) if softcap is None else None
    if head is not None:
        values, entropy = linear_head_logprobs(head, selected, targets, chunk_size, (scale or 1.0) / temperature,
                                               with_entropy, stats)
    else:
        values, entropy = _module_head_logprobs(lm_head, selected, targets, chunk_size, scale, softcap,
                                                None if temperature == 1.0 else 1.0 / temperature, with_entropy)
        if stats is not None:   # a module head: its chunks again, without gradients (checkpointing recomputes)
            with torch.no_grad():
                for start in range(0, selected.shape[0], chunk_size):
                    logits = _chunk_logits(lm_head, selected[start:start + chunk_size], scale, softcap)
                    logits = logits / temperature if temperature != 1.0 else logits
                    stats.append(token_stats(logits, torch.log_softmax(logits, -1), targets[start:start + chunk_size]))
    return values.to(torch.float32), entropy.to(torch.float32) if with_entropy else None


def _module_head_logprobs(lm_head: nn.Module, selected: Tensor, targets: Tensor, chunk_size: int,
                          scale: float | None, softcap: float | None, inverse_temperature: float | None,
                          with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Any other head (LoRA-wrapped, softcapped, hooked), called as a module: each chunk under activation
    checkpointing when gradients are needed, so the backward recomputes it one chunk at a time."""
    use_checkpoint = torch.is_grad_enabled() and (
        selected.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    logps, entropies = [], []
    for start in range(0, selected.shape[0], chunk_size):
        args = (lm_head, selected[start:start + chunk_size], targets[start:start + chunk_size], scale, softcap,
                inverse_temperature, with_entropy)
        out = checkpoint(_chunk_stats, *args, use_reentrant=False) if use_checkpoint else _chunk_stats(*args)
        logps.append(out[0])
        if with_entropy:
            entropies.append(out[1])
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def head_logits(model):
    """``logits(hidden)``: the logits a causal LM's softmax sees for ``[n, H]`` final hidden states (its output
    layer and post-processing; float32), for a caller that chunks positions itself (distillation)."""
    causal_lm, _, lm_head = _split_model(model)
    scale, softcap = _logit_postprocessing(causal_lm.config)
    return lambda hidden: _chunk_logits(lm_head, hidden, scale, softcap)


def packed_sequence_logprobs(model, batch: dict[str, Tensor], chunk_size: int = 1024,
                             stats: list | None = None) -> Tensor:
    """Summed completion log-probability of every sequence of a packed batch, ``[S]`` float32.

    ``batch`` is a padding-free or prefix-shared row (:mod:`preftune.data.packed`); sequences come in its order
    (completion-major, as the rows of the padded batch). Each value equals :func:`sequence_logprobs` of the same
    sequence in a padded row: only the states that predict completion tokens are projected, in chunks, as there.
    ``stats`` (a list) receives ``(token stats [N, 4], sequence of each token [N])`` (:func:`~.speed.head.token_stats`).
    """
    from .speed.attention import packed_model_inputs

    hidden = final_hidden_states(model, batch["input_ids"], **packed_model_inputs(model, batch))
    chunks = [] if stats is not None else None
    values, _, sequences, targets = packed_completion_logprobs(model, hidden, batch, chunk_size, stats=chunks)
    if stats is not None:
        stats.append((torch.cat(chunks) if chunks else values.new_zeros(0, 4), sequences))
    return packed_sums(values, sequences, targets, batch)


def packed_completion_logprobs(model, hidden: Tensor, batch: dict[str, Tensor], chunk_size: int = 1024,
                               temperature: float = 1.0, with_entropy: bool = False, stats: list | None = None):
    """``(log-probs [N], entropies [N] or None, sequence of each [N], target position of each [N])`` of the
    completion tokens of a packed row, from its final hidden states ``[1, T, H]``: its layout says which state
    predicts which token (:func:`~preftune.data.packed.scored_positions`)."""
    targets, predictors, sequences = (t.to(batch["input_ids"].device)
                                      for t in scored_positions(PackedLayout.of(batch)))
    values, entropy = projected_logprobs(model, hidden[0][predictors], batch["input_ids"][0, targets], chunk_size,
                                         temperature, with_entropy, stats)
    return values, entropy, sequences, targets


def packed_sums(values: Tensor, sequences: Tensor, targets: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """``[S]`` float32 sums per sequence of a packed row's token log-probs, each times the batch's ``token_weights``
    (``[1, T]`` by position, LD-DPO's: :func:`~preftune.losses.weighting.ld_token_weights`) if it has them."""
    if batch.get("token_weights") is not None:
        values = values * batch["token_weights"][0, targets].to(values)
    total = torch.zeros(PackedLayout.of(batch).lengths().shape[0], dtype=torch.float32, device=values.device)
    return total.index_add(0, sequences, values)


def _check_inputs(input_ids: Tensor, completion_mask: Tensor, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if input_ids.dim() != 2 or completion_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and completion_mask must both be [batch, seq]; got "
                         f"{tuple(input_ids.shape)} and {tuple(completion_mask.shape)}")


def _to_token_layout(values: Tensor, completion_mask: Tensor) -> Tensor:
    """Flat completion values -> ``[B, L]`` with zeros elsewhere (position 0 never scored)."""
    batch, length = completion_mask.shape
    target_mask = completion_mask[:, 1:].to(device=values.device, dtype=torch.bool)
    shifted = torch.zeros(batch, length - 1, dtype=torch.float32, device=values.device)
    shifted = shifted.masked_scatter(target_mask, values.to(torch.float32))
    return nn.functional.pad(shifted, (1, 0))


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor,
                      chunk_size: int = 1024, position_ids: Tensor | None = None,
                      token_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed completion log-probability per row and the number of completion tokens.

    Returns ``(logps [B] float32, lengths [B] float32)``; ``logps[b]`` is
    ``sum_t log p(input_ids[b, t] | input_ids[b, :t])`` over the completion tokens of row ``b``
    (position 0 excluded, as in :func:`token_logprobs`), each term times ``token_weights[b, t]`` when given
    (LD-DPO's, ``[B, L]``).
    """
    per_token = token_logprobs(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size,
                               position_ids=position_ids)
    lengths = completion_mask[:, 1:].to(torch.bool).sum(-1).to(torch.float32)
    return weighted_sums(per_token, token_weights), lengths


def weighted_sums(per_token: Tensor, token_weights: Tensor | None) -> Tensor:
    """``[B]`` row sums of ``[B, L]`` per-token log-probs, each token times its weight (None: the plain sum)."""
    return per_token.sum(-1) if token_weights is None else (per_token * token_weights.to(per_token)).sum(-1)


def _chunk_logprobs(lm_head: nn.Module, hidden: Tensor, targets: Tensor, scale: float | None,
                    softcap: float | None) -> Tensor:
    """``log softmax(lm_head(hidden))[target]`` for one chunk of rows, in float32 (or float64)."""
    return _chunk_stats(lm_head, hidden, targets, scale, softcap)[0]


def _chunk_stats(lm_head: nn.Module, hidden: Tensor, targets: Tensor, scale: float | None, softcap: float | None,
                 inverse_temperature: float | None = None, with_entropy: bool = False) -> tuple[Tensor, ...]:
    """``(log p[target],)`` or ``(log p[target], entropy)`` for one chunk of rows, in float32 (or float64)."""
    logits = _chunk_logits(lm_head, hidden, scale, softcap)
    if inverse_temperature is not None:
        logits = logits * inverse_temperature
    picked, entropy = log_softmax_stats(logits, targets, with_entropy)
    return (picked, entropy) if with_entropy else (picked,)


def _split_model(model) -> tuple[Any, nn.Module, nn.Module]:
    """``(causal_lm, backbone, lm_head)`` of a ``*ForCausalLM`` model, unwrapping peft."""
    causal_lm = base_model(model)
    prefix = getattr(causal_lm, "base_model_prefix", None)
    backbone = getattr(causal_lm, prefix, None) if prefix else None
    get_head = getattr(causal_lm, "get_output_embeddings", None)
    lm_head = get_head() if callable(get_head) else None
    if not isinstance(backbone, nn.Module) or backbone is causal_lm or not isinstance(lm_head, nn.Module):
        raise TypeError(
            f"{type(causal_lm).__name__} is not a causal language model with a backbone and an output "
            "projection (expected a Hugging Face *ForCausalLM model, optionally wrapped by peft)")
    return causal_lm, backbone, lm_head


def _final_hidden_states(model, causal_lm, backbone: nn.Module, input_ids: Tensor,
                         attention_mask: Tensor | None, position_ids: Tensor | None,
                         extra: dict[str, Any] | None = None) -> Tensor:
    """Final hidden states ``[B, L, H]``, i.e. exactly what the model's ``lm_head`` would receive."""
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False, **(extra or {})}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if is_peft_model(model) and _uses_prompt_learning(model):
        return _hidden_states_through_peft(model, causal_lm, backbone, input_ids, kwargs)
    return _first_output(backbone(input_ids=input_ids, **kwargs))


def _uses_prompt_learning(peft_model) -> bool:
    config = getattr(peft_model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _hidden_states_through_peft(model, causal_lm, backbone: nn.Module, input_ids: Tensor,
                                kwargs: dict[str, Any]) -> Tensor:
    """Run a prompt-learning peft model's own forward and capture its backbone output."""
    captured: list[Tensor] = []

    def grab(_module, _args, output):
        captured.append(_first_output(output))

    if "logits_to_keep" in inspect.signature(causal_lm.forward).parameters:
        kwargs = {**kwargs, "logits_to_keep": 1}
    handle = backbone.register_forward_hook(grab)
    try:
        model(input_ids=input_ids, **kwargs)
    finally:
        handle.remove()
    hidden = captured[-1]
    # prompt tuning prepends virtual tokens to the sequence; the real tokens are the last L.
    return hidden[:, hidden.shape[1] - input_ids.shape[1]:]


def _first_output(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _logit_postprocessing(config) -> tuple[float | None, float | None]:
    """``(multiplier, softcap)`` a model applies to ``lm_head`` outputs before the softmax."""
    scale = None
    if getattr(config, "logit_scale", None) is not None:          # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    factor = getattr(config, "logits_scaling", None)
    if factor is not None and float(factor) != 1.0:
        model_type = str(getattr(config, "model_type", ""))
        # HyperCLOVA X multiplies by it; Granite (and its relatives) divide by it.
        extra = float(factor) if model_type.startswith("hyperclovax") else 1.0 / float(factor)
        scale = extra if scale is None else scale * extra
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    return scale, softcap


def _chunk_logits(lm_head: nn.Module, hidden: Tensor, scale: float | None, softcap: float | None) -> Tensor:
    """The logits of one chunk of rows as the model's softmax sees them, in float32 (or float64)."""
    logits = lm_head(hidden)
    if logits.dtype != torch.float64:  # half-precision models: softmax in float32
        logits = logits.float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


@torch.no_grad()
def token_kl(model, ref_model, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor,
             chunk_size: int = 1024, model_kwargs: dict[str, Any] | None = None) -> Tensor:
    """Exact KL(π ‖ π_ref) between the two models' next-token distributions at each completion token.

    ``KL_t = Σ_v π(v | y_<t) (log π(v | y_<t) - log π_ref(v | y_<t))`` over the whole vocabulary, for
    the distribution that predicts ``input_ids[b, t]``. Summed over a response ``y`` sampled from π,
    ``Σ_t KL_t`` is an unbiased estimate of the sequence-level KL(π ‖ π_ref) (the chain rule of KL) that,
    unlike the sampled log-ratio ``log π(y) - log π_ref(y)``, can never be negative, and has lower
    variance (Schulman, "Approximating KL divergence", 2020). Both models see the same ids and must
    share the vocabulary.

    Returns ``[B, L]`` float32, 0 off the completion. Computed ``chunk_size`` rows at a time from the
    two models' final hidden states: the largest tensors are two ``[chunk_size, vocab]`` blocks, never
    ``[B, L, vocab]``. ``model_kwargs``: further inputs of both backbones' forwards (the prompts' image tensors).
    """
    _check_inputs(input_ids, completion_mask, chunk_size)
    target_mask = completion_mask[:, 1:].to(device=input_ids.device, dtype=torch.bool)
    rows, heads = [], []
    for m in (model, ref_model):
        causal_lm, _, lm_head = _split_model(m)
        rows.append(final_hidden_states(m, input_ids, attention_mask, **(model_kwargs or {}))[:, :-1][target_mask])
        heads.append((lm_head, *_logit_postprocessing(causal_lm.config)))
    values = [torch.zeros(0, dtype=torch.float32, device=input_ids.device)]
    for start in range(0, rows[0].shape[0], chunk_size):
        logp, logq = (torch.log_softmax(_chunk_logits(head, r[start:start + chunk_size], scale, softcap), -1)
                      for r, (head, scale, softcap) in zip(rows, heads))
        if logp.shape[-1] != logq.shape[-1]:
            raise ValueError(f"the models' vocabularies differ ({logp.shape[-1]} and {logq.shape[-1]} tokens)")
        values.append((logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0).float())  # clamp: rounding only
    return _to_token_layout(torch.cat(values), completion_mask)
