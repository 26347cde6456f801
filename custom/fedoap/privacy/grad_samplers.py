"""Per-sample gradient rules for layers Opacus 1.6 has none for (and a faster one for ``nn.Conv2d``), registered in the
registry of Opacus's per-sample hooks (``GradSampleHooks.GRAD_SAMPLERS``, where ``register_grad_sampler`` writes), so
DP-SGD's hooks use them instead of the ``torch.func`` fallback. Opacus's ghost-clipping classes share that one
registry; they are given their own copy of Opacus's rules first, because they compute norms from what a rule returns
and these rules hand their gradients over instead (below).

Why: Opacus computes the per-sample gradients of a layer without a registered rule by ``vmap`` over the layer's
functional forward and backward, one small convolution per sample. The decoders of MONAI's UNet and of FedOAP's
network upsample with ``nn.ConvTranspose2d`` (and ``3d`` for FedMEPD's volumes), which has no rule, so every DP-SGD
step paid that fallback on each up-block (``fedoap bench train`` shows the step with and without these rules).

The rule, for one sample: a transposed convolution ``y = conv_transpose(x, W)`` is linear in ``W`` and the adjoint
of the convolution with the same kernel, stride, padding and dilation; so ``dL/dW[i, o, k] = sum_l x[i, l] *
unfold(dL/dy)[o, k, l]``, where ``unfold`` cuts ``dL/dy`` into the patches that the convolution would read, one per
input position ``l``. One batched matrix product per layer gives every sample's gradient, as Opacus's rule for
``nn.Conv2d`` does with the roles of input and output swapped. The bias's gradient is ``dL/dy`` summed over space.

``nn.Conv2d`` (groups 1, numeric zero padding: every convolution of the UNets here) gets a rule of its own for speed,
the same formula as Opacus's (``dL/dW = dL/dy x unfold(x)^T`` per sample; no unfolding at all for a 1 x 1 kernel)
without its two copies of every per-sample gradient. Unfolding copies the input once per kernel position (9 copies
for 3 x 3), which on a CPU cost more than the products at the UNets' full-resolution layers; so a stride-1,
undilated convolution whose output is at least :data:`SHIFTED_MIN_WIDTH` wide unfolds nothing: with the input
zero-padded and flattened row by row (row length ``Wp``) and ``dL/dy`` padded to the same row length with zeros, the
input window of kernel position ``(a, b)`` is the contiguous slice at offset ``a * Wp + b``, so each kernel position
is one batched product over views (the padding columns of ``dL/dy`` are zero, so what the slice reads past a row's
end adds nothing). Narrower outputs (where padding to ``Wp`` wastes more than it saves) use Opacus's ``unfold2d``
and one batched product straight into the weight's layout, where Opacus's rule makes the result contiguous once more
after extracting the group diagonal. Other convolutions keep Opacus's rule. Both rules hand their per-sample
gradients to Opacus's hooks as its accumulator (``_current_grad_sample``) when the hooks have none yet for the
parameter (the usual case: one call per parameter and backward pass), instead of letting Opacus copy them into a
freshly zeroed one of the same size.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn

__all__ = ["conv_transpose_grad_sample", "conv2d_grad_sample", "REGISTERED", "SHIFTED_MIN_WIDTH", "stock_opacus"]

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: the layer types this module has rules for (a benchmark puts Opacus's own back to time stock Opacus)
REGISTERED = (*TRANSPOSED, nn.Conv2d)
_REGISTRY = GradSampleHooks.GRAD_SAMPLERS
#: the narrowest output (columns) for which a 2D convolution's rule uses shifted slices instead of unfolding: below
#: it, padding each row of ``dL/dy`` to the input's width (2 more columns for a 3 x 3 kernel) is a large share of the
#: products, and the unfolded copies are small anyway
SHIFTED_MIN_WIDTH = 8
#: what Opacus itself registered for those types (None: nothing, the torch.func fallback)
_STOCK = {t: _REGISTRY.get(t) for t in REGISTERED}


def _handed_over(layer: nn.Module, grads: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """Give each fresh per-sample gradient to Opacus's hooks as the parameter's accumulator when it has none yet and
    covers the whole batch; return the rest for Opacus to accumulate as usual (a second call in one backward pass)."""
    rest = {}
    for param, grad in grads.items():
        if hasattr(param, "_current_grad_sample") or grad.shape[0] != getattr(layer, "max_batch_len", None):
            rest[param] = grad
        else:
            param._current_grad_sample = grad
    return rest


def _patches(grad_out: torch.Tensor, layer: nn.Module, positions: int) -> torch.Tensor:
    """``dL/dy`` cut into the convolution's patches: ``(n, C_out * prod(kernel), positions)``."""
    if grad_out.dim() == 5:
        cols = unfold3d(grad_out, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                        dilation=layer.dilation)
    else:  # 2D, or 1D as a 2D input of height 1
        flat = grad_out.dim() == 3
        cols = unfold2d(grad_out.unsqueeze(2) if flat else grad_out,
                        kernel_size=(1, *layer.kernel_size) if flat else layer.kernel_size,
                        padding=(0, *layer.padding) if flat else layer.padding,
                        stride=(1, *layer.stride) if flat else layer.stride,
                        dilation=(1, *layer.dilation) if flat else layer.dilation)
    if cols.shape[-1] != positions:  # output_padding >= stride cannot happen (PyTorch refuses it), so this is a bug
        raise RuntimeError(f"{type(layer).__name__}: {cols.shape[-1]} patches of dL/dy for {positions} input positions")
    return cols


def conv_transpose_grad_sample(
    layer: Union[nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d],
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a transposed convolution's weight ``(n, C_in, C_out / groups, *kernel)`` and bias
    ``(n, C_out)``, from its input (``activations[0]``) and the gradient of its output (``backprops``)."""
    x = activations[0].to(backprops.dtype)
    n, c_in = x.shape[:2]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # an empty Poisson draw: zero gradients of the right shape, as Opacus's rules return
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    if layer.weight.requires_grad:
        g = layer.groups
        positions = x[0, 0].numel()
        cols = _patches(backprops, layer, positions).reshape(n, g, -1, positions)  # (n, g, C_out/g * k, L)
        xs = x.reshape(n, g, c_in // g, positions)  # (n, g, C_in/g, L)
        grad = torch.matmul(xs, cols.transpose(-1, -2))  # (n, g, C_in/g, C_out/g * k)
        ret[layer.weight] = grad.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return _handed_over(layer, ret)


def _shifted_weight_grad(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(n, C_out, C_in, kh, kw)`` of a stride-1, undilated 2D convolution from shifted
    contiguous slices of the padded, flattened input (no unfolding; see the module's docstring)."""
    n, c_in = x.shape[:2]
    c_out, (kh, kw), (ph, pw) = layer.out_channels, layer.kernel_size, layer.padding
    out_h, out_w = backprops.shape[-2:]
    row = x.shape[-1] + 2 * pw  # Wp: the padded input's row length; out_w == row - kw + 1
    # one more zero row at the bottom: the last kernel position's slice reads kw - 1 elements past the padded input
    flat_x = F.pad(x, (pw, pw, ph, ph + 1)).reshape(n, c_in, -1)
    flat_g = F.pad(backprops, (0, row - out_w)).reshape(n, c_out, out_h * row)
    length = out_h * row
    grads = x.new_empty(kh * kw, n, c_out, c_in)
    for a in range(kh):
        for b in range(kw):
            start = a * row + b
            torch.bmm(flat_g, flat_x[:, :, start:start + length].transpose(1, 2), out=grads[a * kw + b])
    return grads.permute(1, 2, 3, 0).reshape(n, c_out, c_in, kh, kw)


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a 2D convolution's weight ``(n, C_out, C_in, kh, kw)`` and bias ``(n, C_out)``;
    Opacus's own rule for grouped convolutions, string or non-zero padding, and an empty batch."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    grad_out = backprops.reshape(n, layer.out_channels, -1)  # (n, C_out, L)
    if layer.weight.requires_grad:
        pointwise = layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
        if not pointwise and layer.stride == (1, 1) and layer.dilation == (1, 1) \
                and backprops.shape[-1] >= SHIFTED_MIN_WIDTH:
            ret[layer.weight] = _shifted_weight_grad(layer, x, backprops)
        else:
            cols = x.reshape(n, layer.in_channels, -1) if pointwise else \
                unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                         dilation=layer.dilation)  # (n, C_in * kh * kw, L); strided views, faster than F.unfold
            ret[layer.weight] = torch.bmm(grad_out, cols.transpose(1, 2)).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = grad_out.sum(dim=2)
    return _handed_over(layer, ret)


_OURS = {**dict.fromkeys(TRANSPOSED, conv_transpose_grad_sample), nn.Conv2d: conv2d_grad_sample}
if GradSampleHooksFastGradientClipping.GRAD_SAMPLERS is _REGISTRY:  # every ghost-clipping class inherits from it
    GradSampleHooksFastGradientClipping.GRAD_SAMPLERS = dict(_REGISTRY)
_REGISTRY.update(_OURS)


@contextlib.contextmanager
def stock_opacus() -> Iterator[None]:
    """Opacus as shipped while the block runs: its own rules (or its torch.func fallback) for the layer types above,
    for a benchmark's reference loop. Models made private inside the block must also be trained inside it."""
    for layer_type, rule in _STOCK.items():
        if rule is None:
            _REGISTRY.pop(layer_type, None)
        else:
            _REGISTRY[layer_type] = rule
    try:
        yield
    finally:
        _REGISTRY.update(_OURS)
