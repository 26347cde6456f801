"""The per-sample gradient rules of ``fedoap.privacy.grad_samplers``: for transposed convolutions (1D, 2D, 3D,
groups, stride, padding, output padding, dilation) and 2D convolutions (the kernels, strides and paddings of the
UNets, on outputs narrow enough to be unfolded and wide enough for shifted slices, and the cases left to Opacus's
rule), every sample's gradient equals the one autograd gives for that sample alone; an empty draw gives zeros;
DP-SGD's hooks on a real network use the rules (not the ``torch.func`` fallback) and store every parameter's exact
per-sample gradients; and a DP-SGD step with them equals one of Opacus as shipped."""

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from fedoap.privacy.grad_samplers import (REGISTERED, SHIFTED_MIN_WIDTH, conv2d_grad_sample,
                                          conv_transpose_grad_sample, stock_opacus)

CASES = [  # (class, input shape without the batch, layer arguments)
    (nn.ConvTranspose2d, (4, 5, 5), dict(in_channels=4, out_channels=6, kernel_size=2, stride=2)),  # MONAI's deconv
    (nn.ConvTranspose2d, (4, 5, 6), dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                                         output_padding=1)),
    (nn.ConvTranspose2d, (4, 5, 5), dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2,
                                         dilation=2, groups=2)),
    (nn.ConvTranspose2d, (3, 4, 4), dict(in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(2, 1),
                                         bias=False)),
    (nn.ConvTranspose1d, (4, 7), dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1)),
    (nn.ConvTranspose3d, (2, 3, 4, 3), dict(in_channels=2, out_channels=4, kernel_size=2, stride=2)),
    (nn.ConvTranspose3d, (4, 3, 3, 3), dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1,
                                            output_padding=1, groups=2)),
]


CONV2D_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),  # the UNets' convolutions
    dict(in_channels=3, out_channels=5, kernel_size=1),  # FedOAP's attention projections and head
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 2), dilation=2, padding=(2, 0)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),  # Opacus's rule
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"),  # Opacus's rule
]


def per_sample_autograd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[dict]:
    grads = []
    for i in range(len(x)):
        layer.zero_grad(set_to_none=True)
        (layer(x[i:i + 1]) * grad_out[i:i + 1]).sum().backward()
        grads.append({p: p.grad.clone() for p in layer.parameters()})
    return grads


def assert_rule_matches_autograd(rule_fn, layer: nn.Module, input_shape: tuple) -> None:
    """The rule's per-sample gradients of every parameter equal each sample's own autograd gradient (float64)."""
    layer = layer.double()
    x = torch.randn(3, *input_shape, dtype=torch.float64)
    grad_out = torch.randn_like(layer(x))
    rule = rule_fn(layer, [x], grad_out)
    assert set(rule) == set(layer.parameters())
    for i, expected in enumerate(per_sample_autograd(layer, x, grad_out)):
        for p, g in expected.items():
            torch.testing.assert_close(rule[p][i], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,shape,kwargs", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_rule_equals_each_samples_own_gradient(cls, shape, kwargs):
    torch.manual_seed(0)
    assert_rule_matches_autograd(conv_transpose_grad_sample, cls(**kwargs), shape)


@pytest.mark.parametrize("kwargs", CONV2D_CASES, ids=[str(i) for i in range(len(CONV2D_CASES))])
def test_conv2d_rule_equals_each_samples_own_gradient(kwargs):
    torch.manual_seed(0)
    assert_rule_matches_autograd(conv2d_grad_sample, nn.Conv2d(**kwargs), (kwargs["in_channels"], 7, 6))


#: stride-1 undilated convolutions whose outputs are wide enough for the shifted-slice path (no unfolding)
SHIFTED_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),  # the UNets' convolutions
    dict(in_channels=2, out_channels=3, kernel_size=(3, 2), padding=(2, 0)),  # rectangular, padding taller than wide
    dict(in_channels=2, out_channels=4, kernel_size=(2, 3), padding=(0, 1), bias=False),
    dict(in_channels=3, out_channels=2, kernel_size=5, padding=2),
    dict(in_channels=3, out_channels=2, kernel_size=3),  # no padding: the output is narrower than the input
]


@pytest.mark.parametrize("kwargs", SHIFTED_CASES, ids=[str(i) for i in range(len(SHIFTED_CASES))])
def test_conv2d_shifted_slices_equal_each_samples_own_gradient(kwargs):
    torch.manual_seed(0)
    layer = nn.Conv2d(**kwargs)
    shape = (kwargs["in_channels"], 9, SHIFTED_MIN_WIDTH + 3)
    assert layer(torch.zeros(1, *shape)).shape[-1] >= SHIFTED_MIN_WIDTH  # the case takes the shifted path
    assert_rule_matches_autograd(conv2d_grad_sample, layer, shape)


def test_empty_draw_gives_zero_gradients_of_the_right_shape():
    layer = nn.ConvTranspose2d(4, 6, 2, stride=2)
    rule = conv_transpose_grad_sample(layer, [torch.zeros(0, 4, 5, 5)], torch.zeros(0, 6, 10, 10))
    assert rule[layer.weight].shape == (1, *layer.weight.shape) and not rule[layer.weight].any()
    assert rule[layer.bias].shape == (1, 6) and not rule[layer.bias].any()


def _network(seed: int = 0) -> nn.Module:
    from fedoap.networks import FedOAPNet

    torch.manual_seed(seed)
    return FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8).double()


def test_registered_with_opacus_and_used_by_dp_sgd_on_a_real_network():
    """FedOAP's network under DP-SGD: its convolutions and transposed convolutions get the rules, not the
    torch.func fallback, and the per-sample gradients Opacus stores for every parameter equal each sample's own."""
    from fedoap.privacy.dp import DPSGD, DPSGDConfig

    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample
    for layer_type in REGISTERED[:-1]:
        assert GradSampleModule.GRAD_SAMPLERS[layer_type] is conv_transpose_grad_sample
    # ghost clipping computes norms from what a rule returns: it keeps Opacus's rules, in every variant
    import opacus.grad_sample as opacus_grad_sample

    ghosts = [c for c in vars(opacus_grad_sample).values()
              if isinstance(c, type) and issubclass(c, (GradSampleHooksFastGradientClipping,))]
    assert len(ghosts) >= 4  # hooks and module, plain, FSDP and TP
    for ghost in ghosts:
        assert ghost.GRAD_SAMPLERS[nn.Conv2d] is not conv2d_grad_sample, ghost
        assert nn.ConvTranspose2d not in ghost.GRAD_SAMPLERS, ghost
    model = _network()
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    reference = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        model(x[i:i + 1]).square().sum().backward()
        reference.append({name: p.grad.clone() for name, p in model.named_parameters()})
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=30, batch_size=3)
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for m in model.modules():  # the fallback would have wrapped the layer for torch.func
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            assert not hasattr(m, "ft_compute_sample_grad")
    optimizer.zero_grad(set_to_none=True)
    model(x).square().sum().backward()  # loss_reduction "mean": Opacus multiplies what it stores by the batch size
    for name, p in model.named_parameters():
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name] * 3, rtol=1e-8, atol=1e-12, msg=name)
    dp.close()


def test_a_dp_sgd_step_with_the_rules_equals_one_of_opacus_as_shipped():
    """Clipping needs every per-sample gradient exactly: one step without noise (so that only the clipped sum
    moves the weights) with the rules and with Opacus's own rules and fallback lands on the same weights."""
    from fedoap.privacy.dp import DPSGD, DPSGDConfig

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64, generator=g)

    def one_step() -> dict:
        model = _network()
        dp = DPSGD(DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.05), n_train=4, batch_size=4)
        model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0))
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        dp.close()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    ours = one_step()
    with stock_opacus():
        assert GradSampleModule.GRAD_SAMPLERS.get(nn.ConvTranspose2d) is None
        stock = one_step()
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample  # back after the block
    moved = False
    initial = dict(_network().named_parameters())
    for name, p in ours.items():
        torch.testing.assert_close(p, stock[name], rtol=1e-9, atol=1e-12, msg=name)
        moved |= not torch.equal(p, initial[name].detach())
    assert moved
