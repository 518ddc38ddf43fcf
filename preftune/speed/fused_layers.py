"""RMSNorm and gated MLP layers that keep fewer activations for the backward pass (exact to float rounding).

Per token and decoder layer, a Llama-style model run through plain autograd keeps, besides the
inputs of its linear layers:

* RMSNorm ``weight * (x * rsqrt(mean(x^2) + eps))``: the input, the reciprocal root and the normalised
  tensor (a hidden-size vector). :class:`RMSNormFunction` keeps the input and one float per row
  (the reciprocal root) and recomputes the normalised tensor in the backward;
* gated MLP ``down(silu(gate(x)) * up(x))``: ``gate(x)``, ``silu(gate(x))``, ``up(x)`` and the product
  (four intermediate-size vectors). :class:`GatedMLPFunction` keeps ``gate(x)`` and ``up(x)`` only and
  recomputes silu and the product (elementwise) in the backward. With peft LoRA projections,
  :class:`LoraDownFunction` runs the product and the adapted down projection keeping ``gate(x)``,
  ``up(x)`` and the rank-sized ``A h``; with other layers (quantised, LoRA with dropout or DoRA)
  :class:`SiluMulFunction` fuses the product alone (keeps ``gate(x)`` and ``up(x)``, not
  ``silu(gate(x))``). Under autocast (bf16, fp16) the full MLP function and the LoRA down projection get
  their inputs and weights cast as autocast casts a linear layer's, and run in that dtype (never float32).

The forward passes run the same operations as transformers' modules, so outputs are bitwise equal
(a float64 norm stays in float64 where transformers' rounds to float32); gradients differ by float
rounding only. :func:`fuse_layers` patches module *instances* (their
``forward``), found by formula: each candidate is probed against its own forward before it is patched,
so Gemma-style ``(1 + weight)`` norms and other variants are left as they are. Weights, state dicts
and configs are untouched: a saved model is an ordinary checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SILU_NAMES = ("silu", "swish")


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: one row per token."""
    return t.reshape(-1, t.shape[-1])


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), as Llama computes it:

    ``y = w * (x / sqrt(mean(x^2) + eps))``, the normalisation in float32 (float64 for float64 inputs), then
    cast back to ``x``'s dtype.

    Keeps ``x`` and ``r = 1 / sqrt(mean(x^2) + eps)`` (one float per row). With ``n = x * r`` and
    ``g`` the gradient of ``y``: ``dL/dw = sum_rows(g * n)`` and ``dL/dx = r * (gw - n * mean(gw * n))``.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normalized = x.to(rstd.dtype) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = rows(grad * normalized.to(x.dtype)).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            scaled = (grad * weight).to(rstd.dtype)
            grad_x = (rstd * (scaled - normalized * (scaled * normalized).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def weight_grad(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The gradient of a linear layer's weight: ``grad^T inputs`` over all tokens."""
    return rows(grad).t().mm(rows(inputs))


def product_grads(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: torch.Tensor):
    """Gradients of ``silu(gate) * up`` (``act = silu(gate)``): ``(grad * up * silu'(gate), grad * act)``."""
    return torch.ops.aten.silu_backward(grad * up, gate), grad * act


class SiluMulFunction(torch.autograd.Function):
    """The SwiGLU product (Shazeer 2020, "GLU Variants Improve Transformer"): ``h = silu(a) * b``.

    Keeps ``a`` and ``b``; ``silu(a)`` is recomputed in the backward: ``dL/db = g * silu(a)``,
    ``dL/da = g * b * silu'(a)``.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return product_grads(grad, gate, up, F.silu(gate))


class GatedMLPFunction(torch.autograd.Function):
    """The gated MLP of Llama-family models (SwiGLU, Shazeer 2020):
    ``y = W_d (silu(W_g x + b_g) * (W_u x + b_u)) + b_d``.

    Keeps ``x``, ``a = W_g x + b_g`` and ``b = W_u x + b_u`` (and the weights); ``h = silu(a) * b`` is
    recomputed in the backward. With ``g`` the gradient of ``y``: ``dh = g W_d``, ``dW_d = g^T h``,
    ``db = dh * silu(a)``, ``da = dh * b * silu'(a)``, ``dx = da W_g + db W_u``, ``dW_g = da^T x``,
    ``dW_u = db^T x``; bias gradients are the column sums.
    """

    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down):
        gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, w_down, b_down)

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        need = ctx.needs_input_grad
        act = F.silu(gate)
        grads = [None] * 7
        if need[5]:
            grads[5] = weight_grad(grad, act * up)
        if need[6]:
            grads[6] = rows(grad).sum(0)
        grad_gate, grad_up = product_grads(grad.matmul(w_down), gate, up, act)
        del act
        if need[0]:
            grads[0] = grad_gate.matmul(w_gate) + grad_up.matmul(w_up)
        for index, g in ((1, grad_gate), (3, grad_up)):
            if need[index]:
                grads[index] = weight_grad(g, x)
            if need[index + 1]:
                grads[index + 1] = rows(g).sum(0)
        return tuple(grads)


class LoraDownFunction(torch.autograd.Function):
    """A LoRA down projection (Hu et al. 2021, "LoRA") of the SwiGLU product:
    ``y = W h + b + s * B (A h)`` with ``h = silu(a) * u``.

    Keeps ``a``, ``u`` and ``z = A h`` (rank-sized), not ``h``, which is recomputed in the backward. With
    ``g`` the gradient of ``y``: ``dB = s g^T z``, ``dz = s g B``, ``dA = dz^T h``, ``dh = g W + dz A``,
    ``dW = g^T h``, ``db = sum(g)``, then ``da``, ``du`` as in :class:`SiluMulFunction`.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float):
        product = F.silu(gate) * up
        z = F.linear(product, lora_a)
        ctx.save_for_backward(gate, up, z, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(product, weight, bias) + F.linear(z, lora_b) * scaling

    @staticmethod
    def backward(ctx, grad):
        gate, up, z, weight, lora_a, lora_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        act = F.silu(gate)
        product = act * up
        grads = [None] * 7
        scaled = grad * ctx.scaling
        grad_z = scaled.matmul(lora_b)
        if need[5]:
            grads[5] = weight_grad(scaled, z)
        if need[4]:
            grads[4] = weight_grad(grad_z, product)
        if need[2]:
            grads[2] = weight_grad(grad, product)
        if need[3]:
            grads[3] = rows(grad).sum(0)
        del product
        grads[0], grads[1] = product_grads(grad.matmul(weight) + grad_z.matmul(lora_a), gate, up, act)
        return tuple(grads)


def norm_epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def fused_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, norm_epsilon(self))


def plain_linear(module: nn.Module) -> bool:
    """Calling ``module`` is exactly ``F.linear(x, weight, bias)``: an ``nn.Linear`` itself (quantised layers
    subclass it) with no hooks, patched forward or accelerate offload hook, and no weight that DeepSpeed ZeRO-3
    partitions (it is gathered only when its own module is called)."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__ and not hasattr(module, "_hf_hook")
            and not hasattr(module.weight, "ds_id"))


def plain_lora(layer: nn.Module, dtype: torch.dtype | None) -> tuple | None:
    """``(W, b, A, B, scaling)`` of a peft LoRA linear layer that runs one plain adapter (no dropout, no DoRA
    or other variant, not merged, adapters on, no cast of the input: adapter weights in ``dtype``, any dtype for
    None, as under autocast, which casts them all); None for anything else."""
    lora_a, lora_b, base = (getattr(layer, name, None) for name in ("lora_A", "lora_B", "base_layer"))
    if not isinstance(lora_a, nn.ModuleDict) or base is None or layer.disable_adapters or layer.merged:
        return None
    if layer._forward_hooks or layer._forward_pre_hooks or ("forward" in layer.__dict__ and not patched(layer)):
        return None
    active = [name for name in layer.active_adapters if name in lora_a]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}) or \
            getattr(layer, "use_dora", {}).get(active[0], False):
        return None
    a, b, dropout = lora_a[active[0]], lora_b[active[0]], layer.lora_dropout[active[0]]
    if not (plain_linear(base) and plain_linear(a) and plain_linear(b) and b.bias is None and a.bias is None
            and type(dropout) is nn.Identity and (dtype is None or a.weight.dtype == dtype)):
        return None
    return base.weight, base.bias, a.weight, b.weight, layer.scaling[active[0]]


def autocast_cast(*tensors: torch.Tensor | None, device: str) -> list[torch.Tensor | None]:
    """``tensors`` cast as autocast casts a linear layer's input, weight and bias (to its dtype; None stays)."""
    dtype = torch.get_autocast_dtype(device)
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def autocast_mlp(x, projections):
    """The fused MLP under autocast: inputs, weights and biases cast to the autocast dtype as autocast casts
    them for a linear layer, the function run with autocast off (its backward then sees the same dtypes)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device)
    tensors = [t if t is None else t.to(dtype) for p in projections for t in (p.weight, p.bias)]
    with torch.autocast(device, enabled=False):
        return GatedMLPFunction.apply(x.to(dtype), *tensors)


def fused_mlp_forward(self, x):
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    autocast = torch.is_autocast_enabled(x.device.type)
    if all(plain_linear(p) for p in projections):
        if autocast:
            return autocast_mlp(x, projections)
        return GatedMLPFunction.apply(x, *(t for p in projections for t in (p.weight, p.bias)))
    gate, up = self.gate_proj(x), self.up_proj(x)
    if autocast:   # LoRA projections under autocast: the fused down projection on the cast weights
        lora = plain_lora(self.down_proj, None)
        if lora is None:
            return self.down_proj(SiluMulFunction.apply(gate, up))
        device = x.device.type
        weight, bias, lora_a, lora_b = autocast_cast(*lora[:4], device=device)
        gate, up = autocast_cast(gate, up, device=device)
        with torch.autocast(device, enabled=False):
            return LoraDownFunction.apply(gate, up, weight, bias, lora_a, lora_b, lora[4])
    lora = plain_lora(self.down_proj, gate.dtype)
    if lora is not None:
        return LoraDownFunction.apply(gate, up, *lora)
    return self.down_proj(SiluMulFunction.apply(gate, up))


def is_rmsnorm_candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and norm_epsilon(module) is not None and getattr(module, "bias", None) is None)


def is_gated_mlp_candidate(module: nn.Module) -> bool:
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return isinstance(getattr(module, "act_fn", None), nn.Module) and (act is None or act in SILU_NAMES)


@torch.no_grad()
def same_formula(module: nn.Module, fused_forward, width: int) -> bool:
    """``module``'s own forward and ``fused_forward`` agree on a small random probe (one row tiny, so that a
    different epsilon shows)."""
    param = next(module.parameters())
    if param.is_meta or not param.dtype.is_floating_point:
        return False
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    x[0, 0] *= 1e-3
    x = x.to(param.device, param.dtype)
    try:
        expected, got = module(x), fused_forward(module, x)
    except (RuntimeError, TypeError, ValueError):
        return False
    tolerance = 1e-5 if param.dtype == torch.float32 else 1e-2
    scale = float(expected.abs().max()) + 1e-6
    return expected.shape == got.shape and float((expected - got).abs().max()) <= tolerance * scale


class FusedForward:
    """A module instance's patched ``forward``: ``function(module, ...)``. Unlike a bound method it survives
    pickling (``torch.save(model)``), and ``copy.deepcopy`` binds the copy to the copied module."""

    def __init__(self, module: nn.Module, function):
        self.module = module
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)


def patched(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), FusedForward)


def fuse_layers(model: nn.Module) -> int:
    """Patch the RMSNorms and SiLU-gated MLPs of ``model`` with the fused functions above; returns how many.

    Only module instances change (their ``forward``, a :class:`FusedForward`, which ``copy.deepcopy`` carries
    over to the copy); LoRA wrapping later, saving, gradient checkpointing and sharding see the same modules
    and weights. Layers whose forward does not compute the standard formula are left alone.
    """
    count = 0
    for module in model.modules():
        if patched(module) or "forward" in module.__dict__:
            continue
        if is_rmsnorm_candidate(module):
            fused, width = fused_norm_forward, module.weight.shape[0]
        elif is_gated_mlp_candidate(module):
            fused, width = fused_mlp_forward, getattr(module.gate_proj, "in_features", None)
        else:
            continue
        if width and same_formula(module, fused, width):
            module.forward = FusedForward(module, fused)
            count += 1
    return count
