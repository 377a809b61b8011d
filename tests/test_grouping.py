"""The grouping maths (eq. 6-15) against references written out independently."""

import math

import pytest
import torch

from gopt_adapter import GoptConfig
from gopt_adapter.grouping import GroupingModule, gumbel_assignment, gumbel_noise_like
from gopt_adapter.prompter import ClassAwareUniModalPrompter, GroupingPrompter, PromptState
from gopt_adapter.adapter import GoptAdapter
from gopt_adapter.backbone import BackboneSpec
from model_helpers import make_backbone


def test_hard_assignment_is_one_hot_with_softmax_gradient():
    """Eq. 9: forward is one-hot(argmax), backward is the softmax's gradient."""
    logits = torch.randn(2, 7, 5, requires_grad=True)
    weights = torch.randn(2, 7, 5)
    hard = gumbel_assignment(logits, tau=0.7, hard=True, noise=False)
    assert torch.equal(hard.sum(-1), torch.ones(2, 7))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.argmax(-1), logits.argmax(-1))
    (hard * weights).sum().backward()
    hard_grad = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits / 0.7, -1) * weights).sum().backward()
    torch.testing.assert_close(hard_grad, logits.grad)


def test_soft_assignment_is_the_tempered_softmax():
    logits = torch.randn(3, 4, 6)
    torch.testing.assert_close(gumbel_assignment(logits, 2.0, hard=False, noise=False), torch.softmax(logits / 2.0, -1))


def test_gumbel_noise_follows_the_torch_seed():
    logits = torch.zeros(4, 64, 8)
    torch.manual_seed(3)
    first = gumbel_assignment(logits, 1.0, hard=True, noise=True)
    torch.manual_seed(3)
    again = gumbel_assignment(logits, 1.0, hard=True, noise=True)
    torch.manual_seed(4)
    other = gumbel_assignment(logits, 1.0, hard=True, noise=True)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # uniform logits + Gumbel noise: every group gets picked
    assert first.sum(dim=(0, 1)).min() > 0


def reference_logits(module, tokens, groups):
    q = tokens @ module.q.weight.T + module.q.bias
    k = groups @ module.k.weight.T + module.k.bias
    return torch.einsum("bnr,bgr->bng", q, k) / math.sqrt(tokens.shape[-1])


def test_merge_matches_eq_10_written_as_loops():
    torch.manual_seed(0)
    module = GroupingModule(6, "hard").eval()
    tokens, groups = torch.randn(2, 9, 6), torch.randn(2, 3, 6)
    with torch.no_grad():
        merged, assign = module.merge(tokens, groups)
        owner = reference_logits(module, tokens, groups).argmax(-1)  # [B, S]
        values = tokens @ module.v.weight.T + module.v.bias
        for b in range(2):
            for j in range(3):
                members = values[b][owner[b] == j]
                pooled = members.sum(0) / (len(members) + 1)  # GroupViT's count + 1
                expected = groups[b, j] + module.o.weight @ pooled + module.o.bias
                torch.testing.assert_close(merged[b, j], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(assign.argmax(-1), owner)


def test_dispatch_gives_each_token_its_groups_value():
    torch.manual_seed(1)
    module = GroupingModule(4, "hard").eval()
    tokens, groups = torch.randn(1, 10, 4), torch.randn(1, 5, 4)
    with torch.no_grad():
        out = module.dispatch(tokens, groups)
        owner = reference_logits(module, tokens, groups).argmax(-1)[0]
        values = groups[0] @ module.v.weight.T + module.v.bias
        expected = tokens[0] + values[owner] @ module.o.weight.T + module.o.bias
    torch.testing.assert_close(out[0], expected)


def test_cup_self_attention_matches_eq_6():
    torch.manual_seed(2)
    cup = ClassAwareUniModalPrompter(8, "soft", 1.0).eval()
    aux, cls = torch.randn(2, 12, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        aux_hat, prompts, assign = cup(aux, cls)
        z = torch.cat([aux, cls], 1)
        zn = torch.nn.functional.layer_norm(z, (8,), cup.norm.weight, cup.norm.bias)
        attn = torch.softmax(zn @ zn.transpose(1, 2) / math.sqrt(8), -1)
        expected = z + attn @ zn
    torch.testing.assert_close(aux_hat, expected[:, :12], rtol=1e-5, atol=1e-6)
    assert prompts.shape == (2, 3, 8) and assign.shape == (2, 12, 3)


@pytest.mark.parametrize("use_cup, use_acp", [(True, True), (False, True), (True, False)])
def test_class_tokens_inherit_the_previous_prompts(use_cup, use_acp):
    """Eq. 15: prompter l+1 receives prompter l's group prompts as its class tokens."""
    torch.manual_seed(0)
    model = make_backbone("vit", depth=3)
    spec = BackboneSpec.from_model(model)
    adapter = GoptAdapter(GoptConfig(1, 4, hidden_dim=8, use_cup=use_cup, use_acp=use_acp), spec).eval()
    received = []
    for prompter in adapter.prompters:
        prompter.register_forward_pre_hook(lambda m, args: received.append(args[2]))  # (tokens, P, state)
    aux = torch.randn(2, 1, 32, 48)
    x = torch.randn(2, 1 + 6, 32)
    state = adapter.initial_state(aux)
    outputs = []
    with torch.no_grad():
        for index in range(3):
            x, state = adapter.prompt(index, x, state)
            outputs.append(state)
    assert torch.equal(received[0].class_tokens, adapter.class_tokens.expand(2, -1, -1))
    for previous, current in zip(outputs, received[1:]):
        assert current.class_tokens is previous.class_tokens
        assert current.aux_tokens is previous.aux_tokens


def test_without_acp_tokens_take_their_aux_groups_prompt():
    torch.manual_seed(0)
    prompter = GroupingPrompter(GoptConfig(1, 3, hidden_dim=4, use_acp=False), embed_dim=6).eval()
    with torch.no_grad():
        prompter.up.weight.zero_()[:4].copy_(torch.eye(4))  # delta[:, :4] = token prompt
        prompter.up.bias.zero_()
    state = PromptState(torch.randn(1, 5, 4), torch.randn(1, 3, 4))
    with torch.no_grad():
        _, prompts, assign = prompter.cup(state.aux_tokens, state.class_tokens)
        out, _ = prompter(torch.ones(1, 5, 6), 0, state)
    prompts = prompts - prompts.mean(dim=1, keepdim=True)  # what CUP hands on is centred over the groups
    prompts = prompts / prompts.pow(2).mean().sqrt()  # and has RMS 1
    expected = prompts[0][assign[0].argmax(-1)]  # [S, r]
    torch.testing.assert_close(out[0, :, :4], 1 + expected)


def test_gumbel_noise_has_the_gumbel_distribution_and_max_trick():
    """Gumbel(0, 1) has mean Euler's gamma and variance pi^2 / 6, and the arg-max of logits plus
    Gumbel noise picks group j with probability softmax(logits)_j (the Gumbel-max trick that
    eq. 8-9 rely on). 200,000 draws: standard errors ~0.003 (mean), ~0.008 (variance)."""
    torch.manual_seed(0)
    noise = gumbel_noise_like(torch.zeros(200_000, dtype=torch.float64))
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772156649) < 0.015
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.04
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(50_000, 4)
    picks = gumbel_assignment(logits, tau=0.5, hard=True, noise=True).mean(0)
    torch.testing.assert_close(picks, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


@pytest.mark.parametrize("acp_query", ["aligned", "rgb"])
def test_acp_query_decides_whether_a_patch_sees_its_own_aux_token(acp_query):
    """Two patches with the same RGB token but different aligned aux tokens get different
    prompts only when ACP's query includes the aligned aux token. With the RGB token alone
    (eq. 12 as printed) the prompt of a patch depends on the aux image only through the C
    image-wide group prompts, so RGB-identical patches are always prompted alike."""
    torch.manual_seed(0)
    config = GoptConfig(1, 3, hidden_dim=8, acp_query=acp_query)
    prompter = GroupingPrompter(config, embed_dim=16).eval()
    with torch.no_grad():
        prompter.up.weight.normal_()
    tokens = torch.randn(1, 1 + 4, 16)
    tokens[0, 2] = tokens[0, 1]  # patches 0 and 1: the same RGB token
    state = PromptState(torch.randn(1, 4, 8), torch.randn(1, 3, 8))  # different aux tokens at patches 0, 1
    with torch.no_grad():
        out, _ = prompter(tokens, 1, state)
    same = torch.equal(out[0, 1], out[0, 2])
    assert same == (acp_query == "rgb")
    with pytest.raises(ValueError, match="acp_query must be one of"):
        GoptConfig(1, 3, acp_query="aux")


def test_bf16_logits_get_float32_noise_and_keep_their_dtype():
    """Under bf16 autocast the assignment logits are bf16: the Gumbel-max trick must still pick
    group j with probability softmax(logits)_j (bf16 noise is biased and ties break to index 0),
    and the assignment comes back in bf16 for the matmuls that follow."""
    torch.manual_seed(0)
    logits = torch.full((100_000, 8), 20.0, dtype=torch.bfloat16)
    assign = gumbel_assignment(logits, tau=1.0, hard=True, noise=True)
    assert assign.dtype == torch.bfloat16
    torch.testing.assert_close(assign.float().mean(0), torch.full((8,), 0.125), atol=0.005, rtol=0)


def test_without_cup_the_group_prompts_do_not_drift_from_block_to_block():
    """Without CUP every prompter groups with c^0 + mean(f^0): the class tokens pass on
    unchanged, so the mean aux token is not added again at each of the 12 prompters."""
    torch.manual_seed(0)
    model = make_backbone("vit", depth=12)
    spec = BackboneSpec.from_model(model)
    adapter = GoptAdapter(GoptConfig(1, 4, hidden_dim=8, use_cup=False), spec).eval()
    seen = []
    for prompter in adapter.prompters:
        prompter.acp.register_forward_pre_hook(lambda m, args: seen.append(args[2]))  # (tokens, P, prompts, aux)
    aux = torch.randn(2, 1, 32, 48)
    x = torch.randn(2, 1 + 6, 32)
    state = adapter.initial_state(aux)
    expected = adapter.class_tokens + adapter.aux_embed(aux).mean(dim=1, keepdim=True)  # [2, C, r]
    with torch.no_grad():
        for index in range(12):
            x, state = adapter.prompt(index, x, state)
    assert len(seen) == 12
    for prompts in seen:
        torch.testing.assert_close(prompts, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_empty_groups_under_hard_assignment_keep_gradients_and_adam_states_finite(bf16):
    """Eq. 10's denominator is ``count + 1``: with ``count + 1e-6`` the straight-through gradient
    through an empty group is scaled by 1e6 per prompter and, chained over inherited class tokens,
    overflows AdamW's second moments within a few steps (seen on real MFNet frames)."""
    from gopt_adapter import apply_gopt

    torch.manual_seed(0)
    segmenter = apply_gopt(make_backbone(depth=6), aux_channels=1, num_classes=12)  # 12 groups, 16 tokens
    params = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rgb, aux = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    label = torch.randint(0, 12, (2, 32, 32))
    usage = []  # groups with at least one aux token, per CUP call
    for prompter in segmenter.adapter.prompters:
        prompter.cup.register_forward_hook(lambda m, i, out: usage.append(int((out[2].sum(1) > 0).sum(-1).min())))
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = segmenter(rgb, aux)
        loss = torch.nn.functional.cross_entropy(logits.float(), label)
        optimizer.zero_grad()
        loss.backward()
        for param in params:
            assert param.grad is None or torch.isfinite(param.grad).all()
        optimizer.step()
    assert min(usage) < 12  # the condition under test: some groups were empty
    for param in params:
        assert torch.isfinite(param).all()
        state = optimizer.state[param]
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()


def test_cup_hands_on_tokens_at_the_first_prompters_scale_so_attention_stays_soft():
    """What CUP hands to ACP and to the next prompter is normalised: over twelve chained
    prompters the aux tokens and class tokens keep the RMS of 1 the first prompter's aux tokens
    have, and ACP's cross-attention stays as soft at the last prompter as at the second.
    Unnormalised, both grew with every prompter (and on real frames the attention turned one-hot)."""
    torch.manual_seed(0)
    spec = BackboneSpec.from_model(make_backbone("vit", depth=12))
    adapter = GoptAdapter(GoptConfig(1, 9), spec).eval()
    received, entropy = [], []
    for prompter in adapter.prompters:
        prompter.register_forward_pre_hook(lambda m, args: received.append(args[2]))  # (tokens, P, state)
        prompter.acp.register_forward_pre_hook(
            lambda m, args: entropy.append(attention_entropy(m, *args)))
    aux, x = torch.randn(2, 1, 128, 128), torch.randn(2, 1 + 64, spec.embed_dim)  # 8x8 patches of 16
    state = adapter.initial_state(aux)
    with torch.no_grad():
        for index in range(12):
            x, state = adapter.prompt(index, x, state)
    def mean_square(tokens):  # [B, N, r] -> [B]
        return tokens.pow(2).mean(dim=(1, 2))

    torch.testing.assert_close(mean_square(received[0].aux_tokens), torch.ones(2), rtol=1e-3, atol=0)
    for state in received[1:]:
        torch.testing.assert_close(mean_square(state.aux_tokens), torch.ones(2), rtol=1e-3, atol=0)
        torch.testing.assert_close(mean_square(state.class_tokens), torch.ones(2), rtol=1e-3, atol=0)
    assert min(entropy[1:]) > 0.5 * entropy[1]


def attention_entropy(acp, tokens, num_prefix_tokens, prompts, aux_tokens):
    """Mean entropy (nats) of ACP's cross-attention weights over the group prompts (eq. 12, 14)."""
    query = acp.project(tokens)[:, num_prefix_tokens:] + aux_tokens
    weights = (query @ prompts.transpose(1, 2) / query.shape[-1] ** 0.5).softmax(-1)
    return float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean())


def test_every_prompters_grouping_keeps_using_its_groups():
    """CUP's hard assignment spreads the aux tokens over the groups at the twelfth prompter as at
    the first: each prompter groups the first aux tokens anew. Chained through eq. 4-6's
    attention-only layers instead, the aux tokens were smoothed into about two clusters within a
    few prompters, and every later prompter put them into two groups (docs/method.md, reading 8)."""
    torch.manual_seed(0)
    spec = BackboneSpec.from_model(make_backbone("vit", depth=12))
    adapter = GoptAdapter(GoptConfig(1, 9), spec).eval()
    used = []
    for prompter in adapter.prompters:
        prompter.cup.register_forward_hook(
            lambda m, args, out: used.append(float((out[2].sum(dim=1) > 0).sum(dim=-1).float().mean())))
    aux = torch.nn.functional.interpolate(torch.rand(2, 1, 32, 32), size=(128, 128), mode="bilinear")  # smooth texture
    x = torch.randn(2, 1 + 64, spec.embed_dim)
    state = adapter.initial_state(aux)
    with torch.no_grad():
        for index in range(12):
            x, state = adapter.prompt(index, x, state)
    assert used[0] >= 4
    assert min(used) >= 0.75 * used[0], used
