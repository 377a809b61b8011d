"""bf16 autocast (``train.amp``) on the CPU: the mixed-precision path, tested without a GPU."""

import math

import pytest
import torch
from safetensors.torch import load_file

from gopt_adapter import apply_gopt, grouping
from gopt_adapter.train.engine import LOG_NAME, Dist, TrainConfig, Trainer, _autocast, resolve_amp
from gopt_adapter.grouping import GroupingModule, gumbel_assignment
from gopt_adapter.heads import LinearHead, SetrNaiveHead
from gopt_adapter.gopt_segmenter import WEIGHTS_NAME
from model_helpers import make_backbone
from test_engine import make_trainer, read_log, synthetic_sets

BF16_RTOL = 2 ** -7  # bf16 keeps 8 significant bits


def test_amp_defaults_to_cuda_only_and_is_validated():
    assert TrainConfig().amp is None
    assert resolve_amp(None, "cuda") and not resolve_amp(None, "cpu")
    assert resolve_amp(True, "cpu") and not resolve_amp(False, "cuda")
    with pytest.raises(ValueError, match="amp=True needs one of"):
        resolve_amp(True, "meta")
    with pytest.raises(ValueError, match="amp must be true, false or null"):
        TrainConfig(amp="yes")
    with _autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with _autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def fixed_batch_trainer(out, amp=False, epochs=8, **overrides):
    """Eight steps on the same eight unaugmented synthetic samples (one batch per epoch): a
    loss that should fall step after step."""
    _, val = synthetic_sets()
    model = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=len(val.class_names),
                       hidden_dim=8, head_channels=16)
    config = TrainConfig(**{**dict(epochs=epochs, batch_size=8, lr=3e-2, log_every=1, progress=False, amp=amp),
                            **overrides})
    return Trainer(model, val, len(val.class_names), config, out, device="cpu", ctx=Dist())


def test_amp_training_on_the_cpu_runs_bf16_and_learns(tmp_path):
    """Under autocast the adapter's linears do run in bf16, the loss is finite, falls, and
    follows the fp32 run of the same steps within bf16 precision; weights stay fp32."""
    losses = {}
    for amp in (False, True):
        trainer = fixed_batch_trainer(tmp_path / str(amp), amp)
        assert trainer.config.amp is amp
        seen = set()
        linears = [m for m in trainer.model.adapter.modules() if isinstance(m, torch.nn.Linear)]
        hooks = [m.register_forward_hook(lambda module, args, out: seen.add(out.dtype)) for m in linears]
        trainer.fit()
        for hook in hooks:
            hook.remove()
        assert linears and seen == {torch.bfloat16 if amp else torch.float32}
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        losses[amp] = [r["loss"] for r in read_log(tmp_path / str(amp) / LOG_NAME) if r["event"] == "train"]
    bf16 = losses[True]
    assert len(bf16) == 8 and all(isinstance(loss, float) and math.isfinite(loss) for loss in bf16)
    assert bf16[-1] < 0.8 * bf16[0] and bf16[-1] < min(bf16[:4])
    for step, (half, full) in enumerate(zip(bf16, losses[False])):
        assert abs(half - full) <= 0.05 * full, (step, half, full)


def test_cpu_default_is_fp32_and_recorded_resolved(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    assert trainer.config.amp is False  # None resolved for the CPU: the checkpoint records what ran


def test_gumbel_assignment_stays_float32_under_autocast(monkeypatch):
    """Under bf16 autocast the assignment logits are bf16, but the noise and the softmax are
    drawn and computed in float32: the draw equals the float32 computation on the same logits,
    seed for seed, and a bf16 draw would not (bf16 has about 2,000 distinct uniforms)."""
    torch.manual_seed(0)
    module = GroupingModule(16, "hard", tau=0.5).train()
    tokens, groups = torch.randn(2, 300, 16), torch.randn(2, 12, 16, requires_grad=True)
    noise_dtypes = []
    draw = grouping.gumbel_noise_like
    monkeypatch.setattr(grouping, "gumbel_noise_like", lambda x: noise_dtypes.append(x.dtype) or draw(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module.q(tokens) @ module.k(groups).transpose(1, 2) * module.scale
        torch.manual_seed(1)
        assign = module.assign(tokens, groups)
    assert logits.dtype == torch.bfloat16 and noise_dtypes == [torch.float32]
    torch.manual_seed(1)
    expected = gumbel_assignment(logits.detach().float(), 0.5, hard=True, noise=True)
    assert torch.equal(assign.detach().float().argmax(-1), expected.argmax(-1))
    assert torch.equal(assign.detach().float(), torch.nn.functional.one_hot(expected.argmax(-1), 12).float())
    torch.manual_seed(1)
    bf16_noise = logits.detach() + grouping.gumbel_noise_like(logits.detach())  # what bf16 noise would give
    assert not torch.equal(bf16_noise.argmax(-1), expected.argmax(-1))
    assign.sum(-1).mean().backward()  # straight-through: the softmax's gradient reaches the groups
    assert groups.grad is not None and torch.isfinite(groups.grad).all()


@pytest.mark.parametrize("head_cls", [SetrNaiveHead, LinearHead])
def test_batchnorm_and_head_behave_in_bf16(head_cls):
    """'Behave' = under autocast the head keeps fp32 weights and fp32 running statistics, its
    BatchNorm updates those statistics as the fp32 head does on the same batch (within bf16
    rounding of the conv output), its output matches fp32 within bf16 precision and its weight
    gradients point the same way (cosine > 0.99), in train mode (batch statistics) and in eval mode (running statistics)."""
    torch.manual_seed(0)
    args = (24, 5) if head_cls is LinearHead else (24, 5, 16)
    fp32, amp = head_cls(*args), head_cls(*args)
    amp.load_state_dict(fp32.state_dict())
    features = 3 + 2 * torch.randn(4, 24, 6, 7)  # mean and scale away from 0 and 1: the stats matter
    outputs = {}
    for name, head, enabled in (("fp32", fp32, False), ("amp", amp, True)):
        head.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = head(features)
        out.float().square().mean().backward()
        head.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            outputs[name] = (out.detach().float(), head(features).float())
    assert outputs["amp"][0].dtype == torch.float32 and amp.classifier(torch.zeros(1, amp.classifier.in_channels,
                                                                                    1, 1)).dtype == torch.float32
    for tensor in (*amp.parameters(), *amp.buffers()):
        assert tensor.dtype in (torch.float32, torch.int64)
    torch.testing.assert_close(amp.bn.running_mean, fp32.bn.running_mean, rtol=4 * BF16_RTOL, atol=1e-2)
    torch.testing.assert_close(amp.bn.running_var, fp32.bn.running_var, rtol=4 * BF16_RTOL, atol=1e-2)
    assert amp.bn.num_batches_tracked == fp32.bn.num_batches_tracked == 1
    assert not torch.equal(amp.bn.running_mean, torch.zeros_like(amp.bn.running_mean))  # updated at all
    for mode in (0, 1):  # train-mode and eval-mode outputs
        expected, got = outputs["fp32"][mode], outputs["amp"][mode]
        scale = expected.abs().max()
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max() <= 0.05 * scale, (mode, (got - expected).abs().max(), scale)
    largest = max(p.grad.norm() for p in fp32.parameters())
    for p32, p16 in zip(fp32.parameters(), amp.parameters()):
        assert p16.grad.dtype == torch.float32
        if p32.grad.norm() < 1e-3 * largest:  # the conv bias before BatchNorm: its gradient is ~0
            assert p16.grad.norm() < 1e-2 * largest
            continue
        cosine = torch.nn.functional.cosine_similarity(p16.grad.flatten(), p32.grad.flatten(), dim=0)
        assert cosine > 0.99, cosine  # same direction; elementwise, bf16 rounding of small entries dominates


def test_adapter_saved_after_amp_training_is_fp32_unless_asked(tmp_path):
    trainer = make_trainer(tmp_path / "run", epochs=1, amp=True)
    trainer.fit()
    segmenter = trainer.model
    default = load_file(segmenter.save_pretrained(tmp_path / "fp32") / WEIGHTS_NAME)
    assert default and {t.dtype for t in default.values() if t.is_floating_point()} == {torch.float32}
    halved = load_file(segmenter.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16) / WEIGHTS_NAME)
    assert {t.dtype for t in halved.values() if t.is_floating_point()} == {torch.bfloat16}

