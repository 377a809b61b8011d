"""The injection of eq. 3 through one GEMM equals the padded form, prefix tokens untouched."""

import pytest
import torch
import torch.nn.functional as F

from gopt_adapter.tokens import rescale_patch_tokens, rescale_patch_tokens_linear


@pytest.mark.parametrize("prefix, with_bias, sam", [(1, True, False), (5, True, False), (0, True, False),
                                                    (3, False, False), (0, True, True)])
def test_linear_injection_equals_the_padded_delta(prefix, with_bias, sam):
    generator = torch.Generator().manual_seed(prefix)
    x = torch.randn(2, 4, 5, 16, generator=generator) if sam else torch.randn(2, prefix + 20, 16, generator=generator)
    prompts = torch.randn(2, 20, 8, generator=generator, requires_grad=True)
    weight = torch.randn(16, 8, generator=generator, requires_grad=True)
    bias = torch.randn(16, generator=generator, requires_grad=True) if with_bias else None
    got = rescale_patch_tokens_linear(x, prefix, prompts, weight, bias)
    expected = rescale_patch_tokens(x, prefix, F.linear(prompts, weight, bias))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if prefix:
        assert torch.equal(got[:, :prefix], x[:, :prefix])  # exactly: the zero rows give a zero delta
    leaves = [t for t in (prompts, weight, bias) if t is not None]
    for a, b in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(expected.square().sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
