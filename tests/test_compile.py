"""``torch.compile``: no graph break from our code, bounded recompiles, and a compiled engine run.

The engine test compiles with the ``aot_eager`` backend (``train.compile_backend``): Dynamo
capture, AOTAutograd's joint forward/backward graph and its partitioning all run, only
Inductor's code generation is left out. Inductor's C++ build of this tiny model's training
step alone took 241 s on the shared 2-core CI-like machine (89 kernels); on CUDA
``benchmarks.gpu_check`` compiles with Inductor.
"""

import pytest
import torch

from gopt_adapter import GoptSegmenter
from gopt_adapter.baselines import build_variant
from gopt_adapter.train.engine import LOG_NAME, TrainConfig, evaluate
from model_helpers import make_backbone
from test_amp import fixed_batch_trainer
from test_engine import read_log, synthetic_sets


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs Dynamo hands it and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def small(name="gopt", **options):
    return build_variant(name, make_backbone("vit", depth=2), 1, 3, **options)


@pytest.mark.parametrize("name, training, checkpointing", [
    ("gopt", True, False), ("gopt", False, False), ("gopt", True, True), ("gopt_no_cup", True, False),
    ("gopt_no_acp", True, False), ("gopt_soft", False, False), ("vpt_deep", True, False), ("lora", True, False),
])
def test_the_forward_is_one_graph_without_breaks(name, training, checkpointing):
    model = small(name).train(training)
    if checkpointing:
        model.set_grad_checkpointing(True)
    rgb, aux = torch.randn(2, 3, 32, 48), torch.randn(2, 1, 32, 48)
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        explanation = torch._dynamo.explain(model)(rgb, aux)
    reasons = [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_set_adapter_compiles_once_per_adapter_then_reuses_the_graphs():
    """Switching between two adapters compiles each once (Dynamo guards on the active name),
    not once per switch; the same holds in training mode, where requires_grad flips too."""
    model = small("gopt")
    model.add_adapter("other", model.config)
    rgb, aux = torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)
    for training in (False, True):
        model.train(training)
        torch._dynamo.reset()
        backend = CountingBackend()
        compiled = torch.compile(model, backend=backend)
        with torch.set_grad_enabled(training):
            for call in range(8):
                model.set_adapter("other" if call % 2 else "default")
                expected = model(rgb, aux)
                torch.testing.assert_close(compiled(rgb, aux), expected)  # the active adapter's output
        assert backend.graphs == 2, (training, backend.graphs)


def test_each_new_image_size_compiles_once():
    """What docs/performance.md says about sizes: a new size compiles once (the timm
    backbone specialises on it), a size seen before reuses its graph."""
    model = small("gopt").eval()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for size in [(32, 32), (48, 32), (32, 32), (48, 32), (64, 48)]:
            compiled(torch.randn(1, 3, *size), torch.randn(1, 1, *size))
    assert backend.graphs == 3


def test_compiled_training_matches_eager_then_saves_reloads_and_evaluates(tmp_path):
    """Two steps with train.compile=true give eager's losses and weights; the saved adapter
    reloads onto a fresh backbone and evaluates (eager and compiled) as the trained model."""
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        trainer = fixed_batch_trainer(tmp_path / str(compiled), epochs=2, compile=compiled,
                                      compile_backend="aot_eager")
        initial = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
        trainer.fit()
        assert not torch.equal(initial["prompters.0.up.weight"], trainer.model.adapter.prompters[0].up.weight)
        assert (trainer.forward is not trainer.model) == compiled
        runs[compiled] = trainer
    losses = {c: [r["loss"] for r in read_log(tmp_path / str(c) / LOG_NAME) if r["event"] == "train"] for c in runs}
    assert len(losses[True]) == 2
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    eager_state, compiled_state = runs[False].model.adapter.state_dict(), runs[True].model.adapter.state_dict()
    for key, value in eager_state.items():
        if key.endswith(("grouping.k.bias", "head.proj.bias", "head.bn.running_mean", "aux_embed.proj.bias",
                         "cup.grouping.o.bias")):
            # zero gradient in exact arithmetic (a key bias shifts every logit of a softmax row
            # alike; a conv bias before BatchNorm, the aux conv's bias before SceneNorm and CUP's
            # merge bias before the centred hand-on are subtracted again): AdamW turns the
            # rounding noise of either run into full-size steps, so these differ by up to ~lr
            continue
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)

    trained = runs[True].model
    trained.save_pretrained(tmp_path / "adapter")
    reloaded = GoptSegmenter.from_pretrained(make_backbone("vit", depth=2), tmp_path / "adapter").eval()
    _, val = synthetic_sets()
    expected = evaluate(trained, val, len(val.class_names))
    assert evaluate(reloaded, val, len(val.class_names)) == expected
    torch._dynamo.reset()
    compiled_eval = torch.compile(reloaded, backend="aot_eager")
    assert evaluate(compiled_eval, val, len(val.class_names)) == expected


def test_compile_settings_are_validated():
    with pytest.raises(ValueError, match="compile_backend must name"):
        TrainConfig(compile_backend="")
    with pytest.raises(ValueError, match="compile must be a bool"):
        TrainConfig(compile="yes")
