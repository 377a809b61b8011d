"""GoptSegmenter.forward_mixed: many tasks in one batch equals each sample run alone."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gopt_adapter import GoptConfig, apply_gopt
from model_helpers import make_backbone, perturb_adapter

DEPTH, SIZE = 4, (32, 48)


def build(configs: list[GoptConfig], family: str = "vit", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A segmenter holding one perturbed (trained-like) adapter per config, named t0, t1, ..."""
    segmenter = apply_gopt(make_backbone(family, depth=DEPTH).to(dtype), aux_channels=1, num_classes=2)
    for index, config in enumerate(configs):
        segmenter.add_adapter(f"t{index}", config)
        segmenter.set_adapter(f"t{index}")
        perturb_adapter(segmenter, std=0.05, seed=seed + index)
    segmenter.delete_adapter("default")
    return segmenter.eval()


def alone(segmenter, rgb, aux, names):
    """Reference: each sample on its own, batch 1, under its adapter through forward."""
    out = []
    for index, name in enumerate(names):
        segmenter.set_adapter(name)
        out.append(segmenter(rgb[index:index + 1], aux[index][None])[0])
    return out


configs = st.builds(
    GoptConfig,
    aux_channels=st.integers(1, 3),
    num_classes=st.integers(2, 6),
    interval=st.integers(1, DEPTH),
    hidden_dim=st.sampled_from([4, 8]),
    assignment=st.sampled_from(["hard", "soft"]),
    head=st.sampled_from(["setr_naive", "linear"]),
    head_channels=st.just(8),
    use_cup=st.just(True),
    use_acp=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters=st.lists(configs, min_size=1, max_size=4), data=st.data())
def test_mixed_batch_equals_each_sample_alone(adapters, data):
    """In float64, so that the comparison sees the routing and not fp32 rounding: fp32 kernels
    round differently with batch size and memory layout, and one drawn example with every
    sample on one adapter (a single route, the plain forward's path) differed from batch-1
    runs by 1.6e-5 in fp32. The fixed-family tests below run fp32."""
    segmenter = build(adapters, seed=data.draw(st.integers(0, 100)), dtype=torch.float64)
    names = data.draw(st.lists(st.sampled_from(list(segmenter.adapters)), min_size=1, max_size=6), label="names")
    generator = torch.Generator().manual_seed(len(names))
    rgb = torch.randn(len(names), 3, *SIZE, generator=generator, dtype=torch.float64)
    aux = [torch.randn(segmenter.adapters[n].config.aux_channels, *SIZE, generator=generator, dtype=torch.float64)
           for n in names]
    with torch.no_grad():
        mixed = segmenter.forward_mixed(rgb, aux, names)
        expected = alone(segmenter, rgb, aux, names)
    assert len(mixed) == len(names)
    for index, (got, want) in enumerate(zip(mixed, expected)):
        assert got.shape == (segmenter.adapters[names[index]].config.num_classes, *SIZE)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"sample {index} ({names[index]}): {m}")
        assert torch.equal(got.argmax(0), want.argmax(0))


@pytest.mark.parametrize("family", ["dinov2_reg", "eva02"])
def test_mixed_batch_on_prefix_token_and_rope_backbones(family):
    """Register tokens (prefix rows untouched) and Eva's rope kwargs pass through the routes."""
    a = GoptConfig(aux_channels=1, num_classes=3, hidden_dim=8, head_channels=8)
    b = GoptConfig(aux_channels=1, num_classes=4, interval=3, hidden_dim=4, head="linear")
    segmenter = build([a, b], family)
    rgb, aux = torch.randn(3, 3, 42, 56), torch.randn(3, 1, 42, 56)
    names = ["t1", "t0", "t1"]
    with torch.no_grad():
        mixed = segmenter.forward_mixed(rgb, aux, names)  # one aux tensor: the adapters share C
        expected = alone(segmenter, rgb, aux, names)
    for got, want in zip(mixed, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_frozen_blocks_run_once_and_prompts_reach_only_their_samples():
    a = GoptConfig(aux_channels=1, num_classes=3, interval=1, hidden_dim=8, head_channels=8)
    b = GoptConfig(aux_channels=1, num_classes=3, interval=2, hidden_dim=8, head_channels=8)
    segmenter = build([a, b])
    blocks = [wrapped.block for wrapped in segmenter.backbone.blocks]
    calls, seen = [], {}

    def record(index):
        def hook(module, args):
            calls.append(args[0].shape[0])
            seen[f"in{index}"] = args[0]
        return hook

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(record(index))
    blocks[0].register_forward_hook(lambda module, args, output: seen.update(out0=output))
    rgb, aux = torch.randn(4, 3, *SIZE), torch.randn(4, 1, *SIZE)
    with torch.no_grad():
        segmenter.forward_mixed(rgb, aux, ["t0", "t1", "t1", "t0"])
    assert calls == [4] * DEPTH  # each frozen block once, over the whole batch
    # before block 1 only t0 (interval 1) has a prompter: t1's samples enter as block 0 left them
    assert torch.equal(seen["in1"][[1, 2]], seen["out0"][[1, 2]])
    assert not torch.allclose(seen["in1"][[0, 3]], seen["out0"][[0, 3]])
    prefix = segmenter.spec.num_prefix_tokens
    assert torch.equal(seen["in1"][:, :prefix], seen["out0"][:, :prefix])  # prefix tokens never prompted


def test_errors_name_the_sample_and_the_adapter():
    a = GoptConfig(aux_channels=1, num_classes=3, hidden_dim=8, head_channels=8)
    b = GoptConfig(aux_channels=2, num_classes=3, hidden_dim=8, head_channels=8)
    segmenter = build([a, b])
    rgb = torch.randn(2, 3, *SIZE)
    with pytest.raises(KeyError, match=r"sample 1: no adapter named 'nope'"):
        segmenter.forward_mixed(rgb, torch.randn(2, 1, *SIZE), ["t0", "nope"])
    with pytest.raises(ValueError, match=r"3 adapter names for a batch of 2"):
        segmenter.forward_mixed(rgb, torch.randn(2, 1, *SIZE), ["t0", "t0", "t0"])
    with pytest.raises(ValueError, match=r"sample 1: adapter 't1' takes 2 aux channel\(s\), its aux has 1; .*list"):
        segmenter.forward_mixed(rgb, torch.randn(2, 1, *SIZE), ["t0", "t1"])
    with pytest.raises(ValueError, match=r"sample 0: adapter 't0' takes 1 aux channel\(s\), its aux has 2"):
        segmenter.forward_mixed(rgb, [torch.randn(2, *SIZE), torch.randn(2, *SIZE)], ["t0", "t1"])
    with pytest.raises(ValueError, match=r"sample 1 \(adapter 't1'\): expected aux \[2, 32, 48\]"):
        segmenter.forward_mixed(rgb, [torch.randn(1, *SIZE), torch.randn(2, 16, 48)], ["t0", "t1"])
    with pytest.raises(ValueError, match=r"list of B=2 tensors"):
        segmenter.forward_mixed(rgb, [torch.randn(1, *SIZE)], ["t0", "t1"])
    with pytest.raises(ValueError, match=r"list of B adapter names"):
        segmenter.forward_mixed(rgb, torch.randn(2, 1, *SIZE), "t0")
    segmenter.train()
    with pytest.raises(RuntimeError, match=r"inference only.*eval\(\).*BatchNorm"):
        segmenter.forward_mixed(rgb, [torch.randn(1, *SIZE), torch.randn(2, *SIZE)], ["t0", "t1"])


def test_serving_benchmark_quick_writes_its_section(tmp_path):
    from benchmarks import serve

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose stays\n")
    text = serve.main(["--quick", "--doc", str(doc)])
    written = doc.read_text()
    assert written.startswith("# Performance\n\nprose stays\n") and "<!-- serve begin -->" in written
    assert "python -m benchmarks.serve --quick --doc" in written and text.strip() in written
    rows = [line for line in text.splitlines() if "| 64x64 | 4 |" in line]
    assert len(rows) == 2 and "1 of 1 measurements" in text  # batch 4 over 1 and 2 tasks
    ratios = [float(row.rstrip(" |").rsplit("|", 1)[-1]) for row in rows]
    assert all(ratio > 0 for ratio in ratios)
    assert "p50" in text and "set_adapter" in text and "each extra task" in text
