"""The aux patch embedding keeps a patch's level, relative to its scene (docs/method.md, reading 2)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from gopt_adapter.adapter import xavier_init_
from gopt_adapter.prompter import AuxPatchEmbed


def embed(in_chans=1, dim=8, patch=4, seed=0):
    torch.manual_seed(seed)
    module = AuxPatchEmbed(in_chans, dim, (patch, patch), pad=False)
    xavier_init_(module)
    return module


def test_flat_patches_embed_to_their_level_relative_to_the_scene():
    """A scene of flat 4x4 patches at levels a_i: the conv gives (a_i * s + b) for the kernel sums
    s, so the tokens must be (a_i - mean a) * s / RMS, worked out here from the weights alone.
    A per-token LayerNorm (the old embedding) gave sign(a_i) * LN(s): the same token for every
    positive level, which is what kept thermal from the patches on real frames."""
    module = embed()
    with torch.no_grad():
        module.proj.bias.uniform_(-1, 1)  # a trained conv has a bias; centring removes it
    levels = torch.tensor([[0.1, 0.3, 0.35, 0.9], [0.5, 0.7, 0.2, 0.6]])  # [2 rows, 4 cols] of patches
    aux = levels.repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None]  # [1, 1, 8, 16]
    with torch.no_grad():
        tokens = module(aux)[0]  # [8, 8]
    s = module.proj.weight.sum(dim=(1, 2, 3))  # [r]: the conv of a flat unit patch
    a = levels.flatten() - levels.mean()  # [S], row-major like the tokens
    expected = a[:, None] * s[None]  # [S, r]
    expected = expected / expected.pow(2).mean().sqrt()
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tokens[1], tokens[2], atol=1e-2)  # levels 0.3 and 0.35 stay apart


@settings(max_examples=25, deadline=None)
@given(gain=st.floats(0.5, 20.0), offset=st.floats(-5.0, 5.0), seed=st.integers(0, 2**16))
def test_tokens_do_not_change_with_a_per_image_gain_and_offset(gain, offset, seed):
    """Depth or temperature read relative to the scene: the same image under another gain (> 0)
    and offset, as another sensor or another night would record it, gives the same tokens
    (wherever the scene's contrast is well above the floor that keeps a flat image at zero)."""
    module = embed(seed=seed % 7)
    generator = torch.Generator().manual_seed(seed)
    aux = torch.rand(2, 1, 16, 24, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(module(aux * gain + offset), module(aux), rtol=1e-3, atol=1e-3)


def test_padded_embedding_keeps_the_grid_of_the_backbone():
    """With padding (patch 14 on 30x44 pixels) the grid is 3x4 tokens, as timm's dynamic padding gives."""
    torch.manual_seed(0)
    module = AuxPatchEmbed(1, 8, (14, 14), pad=True)
    tokens = module(torch.rand(2, 1, 30, 44))
    assert tokens.shape == (2, 3 * 4, 8)
    assert torch.isfinite(tokens).all()
    assert F.mse_loss(tokens.pow(2).mean(dim=(1, 2)), torch.ones(2)) < 1e-6  # RMS 1 per sample at init


def test_a_flat_aux_image_embeds_to_zero_tokens_not_to_amplified_rounding_noise():
    """A constant image (a dead sensor, a blank frame) has no contrast to scale up: its tokens are
    zero (plus the learned bias), not float rounding blown up to unit RMS."""
    module = embed()
    with torch.no_grad():
        module.proj.bias.uniform_(-1, 1)
        tokens = module(torch.full((2, 1, 16, 24), 0.73))
    assert tokens.abs().max() < 1e-3
