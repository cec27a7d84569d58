"""Messages about architecture and space files that give the answer: the key a typo meant, and the
up-path attention count a space whose up path mirrors the down path expects."""

import pytest
import yaml

from nas.core.errors import NasError
from nas.space import arch_to_params, load_arch, load_space
from nas.space.sample import mirrored_up_attentions
from tests.fixtures.space import ARCHS, SPACES

THREE_LEVELS = """
name: own
settings: {latent_channels: 4, latent_size: 16, cross_attention_dim: 32, text_len: 8, norm_num_groups: 8}
levels:
  - {channels: 16, resnets: 1}
  - {channels: 32, resnets: 2, attentions: 1, heads: 2}
  - {channels: 32, resnet: 2, attentions: 1, heads: 2}
"""


def refusal(load, path) -> str:
    with pytest.raises(NasError) as info:
        load(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    return text.removeprefix(f"{path}: ")


def test_arch_typo_names_the_key_it_meant_not_the_missing_one(write_yaml):
    """The user's arch file: `resnet:` at levels.2 made `resnets` missing; the typo is the answer."""
    assert (
        refusal(load_arch, write_yaml(THREE_LEVELS))
        == "levels.2.resnet: unknown key; did you mean `resnets`?"
    )


def test_space_typo_names_the_key_it_meant(write_yaml):
    space = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    space["levels"][1]["up_attention"] = space["levels"][1].pop("attentions")
    space["baselines"] = []
    text = refusal(load_space, write_yaml(yaml.safe_dump(space)))
    assert text.startswith("levels.1.up_attention: unknown key; did you mean `up_attentions`?"), text


def test_space_setting_typo_without_a_close_key_lists_the_allowed(write_yaml):
    space = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    space["latency"]["where"] = "cpu"
    text = refusal(load_space, write_yaml(yaml.safe_dump(space)))
    assert text.startswith("latency.where: unknown key (allowed: batch, device, device_name, dtype,"), text


STOCK_LEVEL_1 = "{channels: 32, resnets: 1, attentions: 0, up_attentions: 0, head_dim: 8}"
# tiny.yaml's level 1 mirrors (no up_attentions range) with resnets 1: twice the down count
MIRROR = [  # (the arch's level 1, attentions, the message's `got` part)
    ("{channels: 32, resnets: 1, attentions: 1, up_attentions: 1, head_dim: 8}", 1, "got 1 ("),
    (
        "{channels: 32, resnets: 1, attentions: 2, head_dim: 8}",
        2,
        "got 0, the default when the key is left out (",
    ),
]


@pytest.mark.parametrize(("level", "attentions", "got"), MIRROR, ids=["given", "left out"])
def test_mirror_rule_states_the_value_it_expects(write_yaml, tiny_space, level, attentions, got):
    stock = (ARCHS / "tiny_stock.yaml").read_text()
    path = write_yaml(stock.replace(STOCK_LEVEL_1, level))
    with pytest.raises(NasError) as info:
        arch_to_params(tiny_space, load_arch(path), str(path))
    message = str(info.value)
    expected = 2 * attentions
    assert message.startswith(
        f"{path}: levels.1.up_attentions must mirror the down path in space tiny: expected {expected}, {got}"
    ), message
    assert (
        f"ceil({attentions} * 2 / 1) = {expected}" in message
        and "levels.1.up_attentions {min, max}" in message
    )
    # the value the message states is the one the space takes
    fixed = f"{{channels: 32, resnets: 1, attentions: {attentions}, up_attentions: {expected}, head_dim: 8}}"
    params = arch_to_params(tiny_space, load_arch(write_yaml(stock.replace(STOCK_LEVEL_1, fixed), "ok.yaml")))
    assert params["l1.attentions"] == attentions and mirrored_up_attentions(attentions, 1) == expected
