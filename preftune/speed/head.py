"""Log-probabilities through a plain ``nn.Linear`` output head, projection and softmax fused by hand.

:func:`preftune.logprobs.projected_logprobs` turns ``[N, H]`` hidden states into ``log p(target)``
``chunk_size`` rows at a time. For an ordinary linear head (most causal LMs, tied or not) it calls
:func:`linear_head_logprobs`, one ``torch.autograd.Function`` over all N rows whose gradient is
written out rather than traced. With ``z = m (h W^T + b)`` (``m`` the model's logit scale times the
inverse sampling temperature) and ``p = softmax(z)``:

* forward, per chunk: one projection, a fused ``log_softmax``, gather the targets (and the entropy
  ``H = -sum_v p_v log p_v`` when asked);
* ``d log p_t / d z = onehot(t) - p`` and ``d H / d z = -p (log p + H)``; with ``G`` the incoming
  gradients times those, ``d/dh = m G W``, ``d/dW = m G^T h``, ``d/db = m sum_rows G``;
* trainable head: the backward recomputes each chunk's projection once (no second autograd graph),
  turns it into ``G`` in place and accumulates ``d/dW`` with one ``addmm`` per chunk;
* frozen head (LoRA, a frozen tied embedding): the forward already computes
  ``m (onehot - p) W``, ``[rows, H]`` per chunk, so the backward is a row scaling with no projection
  at all (2 products of ``hidden x vocab`` per row instead of 3). Should the entropy get a gradient
  too, the backward recomputes the chunk for it.

Only one chunk's ``[rows, vocab]`` block (and its softmax) exists at a time. The projection runs in
the dtype the head's own call would use (the weights', or autocast's), softmax in float32 (float64
models: float64), as in :func:`preftune.logprobs._chunk_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .fused_layers import plain_linear as calls_linear

OFF = "preftune_head_function_off"


def use_head_function(model: nn.Module, enabled: bool) -> bool:
    """Switch :func:`linear_head_logprobs` on or off for ``model``'s output head (the ``fused_head`` setting);
    True if the head is now computed by it. Off, the head is called as a module chunk by chunk."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return False
    if enabled:
        head.__dict__.pop(OFF, None)
    else:
        head.__dict__[OFF] = True
    return plain_linear(head) is not None


def plain_linear(lm_head: nn.Module) -> nn.Linear | None:
    """``lm_head`` if calling it is exactly ``F.linear(x, weight, bias)`` (no subclass, wrapper or hook) and the
    head function is not switched off for it, else None."""
    if not calls_linear(lm_head) or lm_head.__dict__.get(OFF, False):
        return None
    if any(p is not None and type(p) is not nn.Parameter for p in (lm_head.weight, lm_head.bias)):
        return None   # sharded (DTensor) or quantised parameters: the module knows how to call them
    return lm_head


def log_softmax_stats(logits: Tensor, targets: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(log p[target], entropy or None)`` of each row of ``logits``, through one fused ``log_softmax``."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return picked, entropy


STAT_COLUMNS = ("mean_logit", "top1", "entropy", "wpo_aligned")   # the columns of token_stats


STATS_ROWS = 64   # rows of a chunk whose statistics are taken at once: the [rows, vocab] temporaries stay small


def token_stats(logits: Tensor, logp: Tensor, targets: Tensor) -> Tensor:
    """``[rows, 4]`` diagnostics of one chunk, no gradient (:data:`STAT_COLUMNS`): each row's mean logit over the
    vocabulary, whether its most likely token is the target (1/0), its entropy (TRL's ``logits/*``,
    ``mean_token_accuracy``, ``entropy``) and WPO's aligned log-prob ``log p[target] - log Σ_v p_v²``
    (:func:`preftune.losses.weighting.wpo_weights`). float32; float64 logits give float64. Taken
    :data:`STATS_ROWS` rows at a time, so the probabilities and products it needs never add a chunk-sized
    ``[rows, vocab]`` tensor to the head's peak (each row's numbers are the same either way)."""
    with torch.no_grad():
        blocks = []
        for start in range(0, logits.shape[0], STATS_ROWS):
            rows = slice(start, start + STATS_ROWS)
            block_logits, block_logp, block_targets = logits[rows], logp[rows], targets[rows]
            hit = (block_logits.argmax(-1) == block_targets).to(block_logp.dtype)
            probs = block_logp.exp()
            entropy = -(probs * block_logp).sum(-1)
            picked = block_logp.gather(-1, block_targets.unsqueeze(-1)).squeeze(-1)
            aligned = picked - probs.square_().sum(-1).log()
            blocks.append(torch.stack([block_logits.mean(-1).to(block_logp.dtype), hit, entropy, aligned], -1))
        stats = torch.cat(blocks) if blocks else logp.new_zeros(0, len(STAT_COLUMNS))
        return stats if stats.dtype == torch.float64 else stats.float()


def linear_head_logprobs(head: nn.Linear, hidden: Tensor, targets: Tensor, chunk_size: int, multiplier: float,
                         with_entropy: bool, stats: list | None = None) -> tuple[Tensor, Tensor | None]:
    """``[N]`` ``log softmax(multiplier * head(hidden))[targets]`` (and ``[N]`` entropies), float32 or float64.
    ``stats``: a list that receives each chunk's :func:`token_stats`."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, *head.parameters())):
        out = _LinearHeadLogprobs.apply(hidden, head.weight, head.bias, targets, chunk_size, multiplier, with_entropy,
                                        stats)
        return out if with_entropy else (out, None)
    logp, entropy, _, _ = _forward(hidden, head.weight, head.bias, targets, chunk_size, multiplier, with_entropy,
                                   stats=stats)
    return logp, entropy


class _LinearHeadLogprobs(torch.autograd.Function):
    """See the module docstring. Outputs ``logp`` or ``(logp, entropy)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, multiplier, with_entropy, stats=None):
        ctx.set_materialize_grads(False)
        frozen = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        logp, entropy, slopes, dtype = _forward(hidden, weight, bias, targets, chunk_size, multiplier, with_entropy,
                                                keep_slopes=frozen, stats=stats)
        ctx.chunk_size, ctx.multiplier, ctx.dtype = chunk_size, multiplier, dtype
        ctx.save_for_backward(hidden, weight, bias, targets, entropy, slopes)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, entropy, slopes = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(targets, dtype=torch.float32 if entropy is None else entropy.dtype)
        if slopes is not None and grad_entropy is None:   # frozen head: d log p / d h is already known
            grad_hidden = (slopes * grad_logp.unsqueeze(-1).to(slopes.dtype)).to(hidden.dtype)
            return (grad_hidden, *[None] * (len(ctx.needs_input_grad) - 1))
        grads = _backward(ctx, hidden, weight, bias, targets, grad_logp, grad_entropy, entropy)
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))   # one per input (stats optional)


def _softmax_input(projected: Tensor, multiplier: float) -> Tensor:
    """``multiplier * projected`` in float32 (float64 stays), in place where ``projected`` already is."""
    logits = projected if projected.dtype in (torch.float32, torch.float64) else projected.float()
    return logits.mul_(multiplier) if multiplier != 1.0 else logits


def _forward(hidden, weight, bias, targets, chunk_size, multiplier, with_entropy, keep_slopes=False, stats=None):
    """``(logp, entropy or None, slopes or None, projection dtype)``; ``slopes`` (``keep_slopes``: frozen head)
    is ``[N, H]`` ``d log p[target] / d hidden``; ``stats`` (a list) receives each chunk's :func:`token_stats`."""
    logps, entropies, slopes, dtype = [], [], [], weight.dtype
    for start in range(0, hidden.shape[0], chunk_size):
        rows, picked_ids = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        projected = F.linear(rows, weight, bias)     # the head's own call (autocast applies as there)
        dtype = projected.dtype
        logits = _softmax_input(projected, multiplier)
        del projected
        logp = torch.log_softmax(logits, dim=-1)
        if stats is not None:
            stats.append(token_stats(logits, logp, picked_ids))
        del logits
        logps.append(logp.gather(-1, picked_ids.unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            entropies.append(-(logp.exp() * logp).sum(-1))
        if keep_slopes:
            probs = logp.exp_().scatter_add_(-1, picked_ids.unsqueeze(-1), _minus_ones(picked_ids, logp.dtype))
            slopes.append((probs.to(dtype) @ weight.to(dtype)).to(hidden.dtype).mul_(-multiplier))
        del logp
    empty = hidden.new_zeros(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    logp = torch.cat(logps) if logps else empty
    entropy = (torch.cat(entropies) if entropies else empty.clone()) if with_entropy else None
    return logp, entropy, (torch.cat(slopes) if slopes else None), dtype


def _minus_ones(targets: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.full((targets.shape[0], 1), -1.0, dtype=dtype, device=targets.device)


def _backward(ctx, hidden, weight, bias, targets, grad_logp, grad_entropy, entropy):
    """Gradients w.r.t. hidden, weight and bias, one recomputed chunk at a time."""
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    projection, shift = weight.to(ctx.dtype), _cast(bias, ctx.dtype)   # as autocast cast them in the forward
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            piece = slice(start, start + ctx.chunk_size)
            rows = hidden[piece].to(ctx.dtype)
            logits = _softmax_input(F.linear(rows, projection, shift), ctx.multiplier)
            g = _logit_grads(logits, targets[piece], grad_logp[piece] * ctx.multiplier,
                             None if grad_entropy is None else grad_entropy[piece] * ctx.multiplier,
                             None if entropy is None else entropy[piece])
            del logits
            projected = g.to(ctx.dtype)
            if need_hidden:
                grad_hidden[piece] = projected @ projection
            if need_weight:
                grad_weight = _accumulate(grad_weight, projected.T, rows, weight.dtype)
            if need_bias:
                grad_bias += g.sum(0).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def _logit_grads(logits: Tensor, targets: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None,
                 entropy: Tensor | None) -> Tensor:
    """``grad_logp (onehot - p) - grad_entropy p (log p + H)`` for one chunk (``grad_*`` already times the
    multiplier): a new ``[rows, vocab]`` block, built in place from its softmax."""
    grad_logp = grad_logp.to(logits.dtype).unsqueeze(-1)
    if grad_entropy is None:
        g = torch.softmax(logits, dim=-1).mul_(-grad_logp)
    else:
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        coef = grad_entropy.to(logits.dtype).unsqueeze(-1)
        g = logp.add_(entropy.to(logits.dtype).unsqueeze(-1)).mul_(coef).add_(grad_logp).mul_(probs).neg_()
    return g.scatter_add_(-1, targets.unsqueeze(-1), grad_logp)


def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return tensor.to(dtype) if tensor is not None else None


def _accumulate(total: Tensor | None, left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``total + left @ right`` in ``dtype``, into ``total``'s memory (the first product starts it)."""
    if total is None:
        return (left @ right).to(dtype)
    if left.dtype == total.dtype:
        return total.addmm_(left, right)
    return total.add_((left @ right).to(dtype))
