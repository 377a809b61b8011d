"""GoptConfig validation: every invalid value is refused with a message naming it."""

import pytest

from gopt_adapter import GoptConfig, apply_gopt
from model_helpers import make_backbone, snapshot, assert_bitwise_equal


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(aux_channels=0), "aux_channels"),
        (dict(num_classes=-3), "num_classes"),
        (dict(interval=1.5), "interval"),
        (dict(hidden_dim=True), "hidden_dim"),
        (dict(num_groups=0), "num_groups"),
        (dict(assignment="sparse"), "assignment"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(head="fpn"), "head"),
        (dict(use_cup="yes"), "use_cup"),
        (dict(use_cup=False, use_acp=False), "use_cup and use_acp"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        GoptConfig(**{"aux_channels": 1, "num_classes": 5, **changes})


def test_dict_round_trip_and_unknown_keys():
    config = GoptConfig(aux_channels=3, num_classes=9, interval=2, assignment="soft", num_groups=4)
    assert GoptConfig.from_dict(config.to_dict()) == config
    assert config.groups == 4 and GoptConfig(1, 9).groups == 9
    with pytest.raises(ValueError, match="unknown GoPT option.*'hiden_dim'"):
        GoptConfig.from_dict({**config.to_dict(), "hiden_dim": 8})


def test_prompter_blocks_follow_interval():
    assert GoptConfig(1, 2, interval=1).prompter_blocks(12) == tuple(range(12))
    assert GoptConfig(1, 2, interval=4).prompter_blocks(12) == (0, 4, 8)
    assert GoptConfig(1, 2, interval=12).prompter_blocks(12) == (0,)
    with pytest.raises(ValueError, match="interval=13 exceeds the backbone depth 12"):
        GoptConfig(1, 2, interval=13).prompter_blocks(12)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(aux_channels=1, num_classes=5, interval=3), ValueError, "exceeds the backbone depth 2"),
        (dict(aux_channels=1, num_classes=5, hiden_dim=3), ValueError, "unknown GoPT option"),
        (dict(aux_channels=0, num_classes=5), ValueError, "aux_channels"),
    ],
)
def test_apply_gopt_rejects_bad_options_without_touching_the_model(kwargs, error, fragment):
    model = make_backbone("vit")
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=fragment):
        apply_gopt(model, **kwargs)
    assert type(model.blocks[0]).__name__ == "Block"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_bitwise_equal(before, snapshot(model))
