"""Search-space and architecture files: validation, sampling, counting, enqueue round trips."""

import pytest
import yaml

from nas.core.errors import NasError
from nas.space import (
    FixedChoices,
    RandomChoices,
    arch_to_params,
    canonical,
    load_arch,
    load_space,
    mirrored_up_attentions,
    sample_arch,
    space_size,
    spread,
    stock_config,
    unet_config,
)
from tests.fixtures.space import ARCHS, SPACES

SHIPPED_SPACES = ["tiny", "quickstart", "decidiffusion"]


@pytest.mark.parametrize("name", SHIPPED_SPACES)
def test_shipped_spaces_load_and_contain_their_baselines(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.baselines, "every shipped space names a baseline"
    for rel in space.baselines:
        arch = load_arch(SPACES / rel)
        params = arch_to_params(space, arch, rel)
        again = sample_arch(space, FixedChoices(params), name=arch.name)
        assert canonical(again) == canonical(arch)
        assert unet_config(again) == unet_config(arch)


def test_decidiffusion_space_contains_sd15_and_decidiffusion_v1():
    space = load_space(SPACES / "decidiffusion.yaml")
    assert {"archs/sd15.yaml", "archs/decidiffusion_v1.yaml"} <= set(space.baselines)


class _Replay:
    """Chooser for exhaustive enumeration: follows a prefix of choice indices, then takes 0."""

    def __init__(self, prefix):
        self.prefix, self.made, self.options = prefix, [], []

    def _pick(self, n):
        k = len(self.made)
        self.made.append(self.prefix[k] if k < len(self.prefix) else 0)
        self.options.append(n)
        return self.made[-1]

    def suggest_int(self, name, low, high):
        return low + self._pick(high - low + 1)

    def suggest_categorical(self, name, choices):
        return choices[self._pick(len(choices))]


def enumerate_space(space):
    """Every leaf of the define-by-run decision tree, exactly once."""
    stack, archs = [[]], []
    while stack:
        prefix = stack.pop()
        chooser = _Replay(prefix)
        archs.append(sample_arch(space, chooser))
        for k in range(len(prefix), len(chooser.made)):
            stack += [[*chooser.made[:k], j] for j in range(1, chooser.options[k])]
    return archs


def test_tiny_space_size_matches_enumeration(tiny_space):
    archs = enumerate_space(tiny_space)
    distinct = {yaml.safe_dump(canonical(a)) for a in archs}
    assert len(archs) == len(distinct) == space_size(tiny_space) == 480


def test_sampling_is_define_by_run(tiny_space):
    """Parameters of a level exist only if the level does; heads only with attention."""
    params = {
        "depth": 1,
        "l0.channels": 16,
        "l0.resnets": 1,
        "l0.attentions": 0,
        "l0.up_attentions": 0,
        "mid": False,
    }
    chooser = FixedChoices(params)
    arch = sample_arch(tiny_space, chooser)
    assert len(arch.levels) == 1 and arch.mid is None
    assert chooser.used == set(params)  # no head, no level-1 and no mid parameters were asked for


def test_sampling_is_deterministic_from_seed(tiny_space):
    a = [sample_arch(tiny_space, RandomChoices(7)) for _ in range(1)]
    b = [sample_arch(tiny_space, RandomChoices(7)) for _ in range(1)]
    assert a == b


def test_mirrored_up_path():
    assert mirrored_up_attentions(2, 2) == 3  # SD 1.5: one transformer per ResNet on both paths
    assert mirrored_up_attentions(0, 2) == 0
    assert mirrored_up_attentions(1, 2) == 2


@pytest.mark.parametrize(
    ("total", "slots", "expected"),
    [(0, 2, [0, 0]), (1, 2, [1, 0]), (3, 2, [2, 1]), (6, 2, [3, 3]), (2, 4, [1, 1, 0, 0])],
)
def test_spread(total, slots, expected):
    assert spread(total, slots) == expected


def test_sd15_maps_to_the_stock_sd15_config():
    config = stock_config(load_arch(ARCHS / "sd15.yaml"))
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config["layers_per_block"] == 2 and config["attention_head_dim"] == 8
    assert config["transformer_layers_per_block"] == 1
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"


def test_decidiffusion_v1_needs_the_flexible_class():
    assert stock_config(load_arch(ARCHS / "decidiffusion_v1.yaml")) is None


def test_arch_outside_space_is_refused(tiny_space):
    arch = load_arch(ARCHS / "quickstart_baseline.yaml")
    with pytest.raises(NasError, match="3 levels is outside the space"):
        arch_to_params(tiny_space, arch, "quickstart_baseline.yaml")


GOOD_ARCH = """
name: t
settings: {latent_channels: 4, latent_size: 8, cross_attention_dim: 32, text_len: 8, norm_num_groups: 8}
levels:
  - {channels: 16, resnets: 1, attentions: 1, up_attentions: 1, heads: 2}
mid: {resnets: 1, attentions: 0}
"""

# (description, text, substrings the one-line message must contain)
BAD_ARCH = [
    ("malformed", "levels: [\n  - {channels: 16", ["malformed YAML", "line"]),
    ("unknown key", GOOD_ARCH + "extra_key: 1\n", ["extra_key", "unknown key", "allowed:"]),
    (
        "nested unknown",
        GOOD_ARCH.replace("resnets: 1, attentions: 1,", "resnets: 1, attn: 1,"),
        ["levels.0.attn", "allowed:"],
    ),
    ("wrong type", GOOD_ARCH.replace("channels: 16", "channels: many"), ["levels.0.channels", "integer"]),
    (
        "out of range",
        GOOD_ARCH.replace("resnets: 1, attentions: 1", "resnets: 0, attentions: 1"),
        ["levels.0.resnets", "greater than or equal to 1", "got 0"],
    ),
    ("groups", GOOD_ARCH.replace("channels: 16", "channels: 20"), ["norm_num_groups", "20"]),
    ("heads", GOOD_ARCH.replace("heads: 2", "heads: 3"), ["heads=3", "divide"]),
    (
        "size",
        GOOD_ARCH.replace("latent_size: 8", "latent_size: 6").replace(
            "levels:\n", "levels:\n  - {channels: 8, resnets: 1}\n  - {channels: 8, resnets: 1}\n"
        ),
        ["latent_size", "divisible"],
    ),
    (
        "mid heads",
        GOOD_ARCH.replace("mid: {resnets: 1, attentions: 0}", "mid: {resnets: 2, attentions: 1}").replace(
            "attentions: 1, up_attentions: 1, heads: 2", "attentions: 0, up_attentions: 0"
        ),
        ["levels.0", "mid block"],
    ),
    ("not a mapping", "- 1\n- 2\n", ["mapping"]),
    ("empty", "", ["empty"]),
]


@pytest.mark.parametrize(("case", "text", "needles"), BAD_ARCH, ids=[c[0] for c in BAD_ARCH])
def test_bad_architecture_files(write_yaml, case, text, needles):
    path = write_yaml(text)
    with pytest.raises(NasError) as info:
        load_arch(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_missing_file(tmp_path):
    with pytest.raises(NasError, match="file not found"):
        load_arch(tmp_path / "nope.yaml")


def _space_text(**overrides) -> str:
    space = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    for key, value in overrides.items():
        node = space
        *parents, last = key.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value
    return yaml.safe_dump(space)


BAD_SPACE = [
    ("unknown key", {"levels.0.kernel": 3}, ["levels.0.kernel", "unknown key"]),
    ("range order", {"depth": {"min": 2, "max": 1}}, ["depth", "min (2) must be <= max (1)"]),
    ("levels count", {"depth": {"min": 1, "max": 3}}, ["one entry per level"]),
    ("both heads", {"levels.0.heads": [2]}, ["exactly one of heads"]),
    ("head divides", {"levels.0.head_dim": [5]}, ["head_dim", "does not divide"]),
    ("groups", {"levels.0.channels": [12, 16]}, ["norm_num_groups"]),
    ("objective", {"objectives": [{"metric": "fid"}]}, ["objectives.0.metric", "proxy_loss"]),
    ("wrong type", {"budgets": {"params": "lots"}}, ["budgets.params"]),
]


@pytest.mark.parametrize(("case", "overrides", "needles"), BAD_SPACE, ids=[c[0] for c in BAD_SPACE])
def test_bad_space_files(write_yaml, case, overrides, needles):
    assert_space_refused(write_yaml, overrides, needles)


def assert_space_refused(write_yaml, overrides: dict, needles: list[str]) -> None:
    """The space file with these changes is refused in one line naming the file and `needles`."""
    path = write_yaml(_space_text(**overrides))
    with pytest.raises(NasError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("mid", [None, {"resnets": 3, "attentions": 0}])
def test_arch_and_space_round_trip_through_yaml_with_or_without_mid(write_yaml, tiny_space, mid):
    """`mid: null` means "no mid block"; a dump must not drop it (a missing key means the default)."""
    from nas.core.config import dump_yaml
    from nas.space import arch_from_dict
    from nas.space.schema import ArchMid, MidSpace

    arch = load_arch(ARCHS / "tiny_flex.yaml").model_copy(update={"mid": ArchMid(**mid) if mid else None})
    assert load_arch(write_yaml(dump_yaml(arch), "a.yaml")) == arch
    assert arch_from_dict(arch.to_data()) == arch
    space = tiny_space.model_copy(update={"mid": MidSpace() if mid else None})
    assert load_space(write_yaml(dump_yaml(space), "s.yaml")) == space
