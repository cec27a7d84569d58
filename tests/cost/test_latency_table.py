"""Latency lookup tables: block keys against the real model, space coverage against full
enumeration, the table format, build/resume with a fake clock, prediction, and the checks a search
runs before any trial. No test asserts a timing figure (the CPU is shared)."""

import json
import warnings

import pytest
import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

import nas.cost.table as lt
import nas.cost.table_build as lb
from nas.core.errors import NasError
from nas.cost.blocks import arch_blocks, block_module, parse_key, space_blocks
from nas.cost.measure import LoadWarning
from nas.space import build_unet, load_space, sample_arch
from tests.fixtures.search import QuietLoad
from tests.fixtures.space import SPACES, distinct_tiny_archs


class _Replay:
    """Chooser that follows a prefix of choice indices, then takes the first option of each."""

    def __init__(self, prefix):
        self.prefix, self.made = prefix, []

    def _pick(self, n):
        value = self.prefix[len(self.made)] if len(self.made) < len(self.prefix) else 0
        self.made.append((value, n))
        return value

    def suggest_int(self, name, low, high):
        return low + self._pick(high - low + 1)

    def suggest_categorical(self, name, choices):
        return list(choices)[self._pick(len(choices))]


def all_archs(space):
    stack, out = [[]], []
    while stack:
        prefix = stack.pop()
        chooser = _Replay(prefix)
        out.append(sample_arch(space, chooser))
        for t in range(len(prefix), len(chooser.made)):
            stack += [[v for v, _ in chooser.made[:t]] + [alt] for alt in range(1, chooser.made[t][1])]
    return out


def test_space_blocks_equal_union_over_every_point(tiny_space):
    archs = all_archs(tiny_space)
    assert len(archs) == 480  # tiny.yaml's size: the enumeration is complete
    union = set().union(*(arch_blocks(a) for a in archs))
    assert union == space_blocks(tiny_space)


def _observed(model) -> list[tuple]:
    """(kind, channels in, channels out, side) of every block module, in forward order."""
    seen: list[tuple] = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(module, ResnetBlock2D):
            seen.append(
                ("resnet", x.shape[1], module.out_channels, x.shape[-1], module.time_emb_proj.in_features)
            )
        elif isinstance(module, Transformer2DModel):
            depth = len(module.transformer_blocks)
            seen.append(("transformer", x.shape[1], module.config.num_attention_heads, x.shape[-1], depth))
        elif isinstance(module, Downsample2D | Upsample2D):
            seen.append(("down" if isinstance(module, Downsample2D) else "up", x.shape[1], x.shape[-1]))

    for m in model.modules():
        if isinstance(m, ResnetBlock2D | Transformer2DModel | Downsample2D | Upsample2D):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _expected(arch) -> list[tuple]:
    out = []
    for b in arch_blocks(arch):
        p = dict(b.params)
        if b.kind == "resnet":
            out.append(("resnet", p["cin"] + p["skip"], p["cout"], p["size"], p["temb"]))
        elif b.kind == "transformer":
            out.append(("transformer", p["c"], p["heads"], p["size"], p["depth"]))
        elif b.kind in ("down", "up"):
            out.append((b.kind, p["c"], p["size"]))
    return out


@pytest.mark.parametrize("index", [0, 3, 7, -2, -1])
def test_arch_blocks_match_the_model_forward(index):
    """The keys, derived from the Arch alone, are the blocks the built model runs, in order,
    for stock and flexible models; and the block modules hold exactly the model's parameters."""
    arch = distinct_tiny_archs()[index]
    model = build_unet(arch, device="meta")
    seen = _observed(model)
    from nas.cost.measure import example_inputs

    with torch.no_grad():
        model(*example_inputs(arch, 2, device="meta"))
    assert seen == _expected(arch)
    params = sum(
        sum(p.numel() for p in block_module(b, 1, "cpu", torch.float32)[0].parameters())
        for b in arch_blocks(arch)
    )
    assert params == sum(p.numel() for p in model.parameters())


def test_block_keys_round_trip(tiny_space):
    for b in space_blocks(tiny_space):
        assert parse_key(b.key) == b
    with pytest.raises(ValueError, match="unknown block kind"):
        parse_key("attention:c=3")


def _fake_clock(monkeypatch):
    """Every block sample reads 1 ms; a whole network reads 10 ms + 3 ms per block."""
    monkeypatch.setattr(lt, "_sample_ms", lambda run, inputs, calls, cuda, dev: 1.0)

    monkeypatch.setattr(lt, "OtherLoad", QuietLoad)

    def whole(arch, setup, device, iters, model=None):
        ms = 10.0 + 3.0 * len(arch_blocks(arch))
        return lt.FitPoint(arch=arch.name, blocks_ms=0.0, measured_ms=ms, measured_p90_ms=1.5 * ms)

    monkeypatch.setattr(lb, "measure_whole", whole)


SETUP = lt.TableSetup(dtype="fp32", batch=1, warmup=0, rounds=3)


def test_build_predict_and_resume(tiny_space, tmp_path, monkeypatch):
    _fake_clock(monkeypatch)
    out = tmp_path / "tiny.json"
    lines = []

    def interrupt(line):
        lines.append(line)
        if "round 2/3" in line:  # round 2's blocks are saved, its pass over the networks not begun
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lb.build_table(tiny_space, out, "cpu", SETUP, fit_count=4, log=interrupt)
    assert not out.exists() and lb.partial_path(out).exists()  # nothing half-written
    assert "whole networks" in lines[-2]  # round 1's blocks and then its networks were measured
    lines.clear()
    whole = lb.measure_whole
    measured: list[str] = []

    def count(arch, *a, **k):
        measured.append(arch.name)
        if len(measured) == 3:  # round 3's blocks run first, then this: the 3rd network of round 3
            raise KeyboardInterrupt
        return whole(arch, *a, **k)

    monkeypatch.setattr(lb, "measure_whole", count)
    with pytest.raises(KeyboardInterrupt):
        lb.build_table(tiny_space, out, "cpu", SETUP, fit_count=4, log=lines.append)
    assert any(line.startswith("resuming") for line in lines)
    assert not any("round 1/3" in line or "round 2/3" in line for line in lines)  # done rounds stay done
    lines.clear()
    measured.clear()
    monkeypatch.setattr(
        lb, "measure_whole", lambda arch, *a, **k: measured.append(arch.name) or whole(arch, *a, **k)
    )
    table = lb.build_table(tiny_space, out, "cpu", SETUP, fit_count=4, log=lines.append, correction="line")
    assert len(measured) == 4 + 2  # round 2's four networks, then networks 3 and 4 of round 3
    assert sum("whole networks" in line for line in lines) == 2
    assert not lb.partial_path(out).exists()
    loaded = lt.load_table(out)
    assert loaded == table
    assert set(table.blocks) == {b.key for b in space_blocks(tiny_space)}
    assert all(len(t.rounds_ms) == 3 for t in table.blocks.values())
    assert table.device.device == "cpu" and table.device.threads >= 1 and table.device.torch
    assert table.fit.model == "line"
    assert (table.fit.slope, table.fit.intercept_ms) == pytest.approx((3.0, 10.0))
    assert table.fit.p90_ratio == pytest.approx(1.5) and len(table.fit.points) == 4
    for arch in distinct_tiny_archs()[:5]:
        predicted = lt.predict(table, arch)
        assert predicted["latency_ms_p50"] == pytest.approx(10 + 3 * len(arch_blocks(arch)))
        assert predicted["blocks_ms"] == pytest.approx(len(arch_blocks(arch)))


@pytest.fixture
def tiny_table(tiny_space, tmp_path, monkeypatch):
    _fake_clock(monkeypatch)
    out = tmp_path / "tables" / "tiny.json"
    # the fake whole networks are 10 ms + 3 ms per block: a line, which the line correction recovers
    lb.build_table(tiny_space, out, "cpu", SETUP, fit_count=2, log=lambda line: None, correction="line")
    return out


def test_load_table_rejects_bad_files(tiny_table, tmp_path):
    with pytest.raises(NasError, match="not found"):
        lt.load_table(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(NasError, match="not a JSON latency table"):
        lt.load_table(bad)
    data = json.loads(tiny_table.read_text())
    bad.write_text(json.dumps({**data, "format": "other/9"}))
    with pytest.raises(NasError, match="format"):
        lt.load_table(bad)
    broken = {**data, "setup": {**data["setup"], "batch": 0}}
    bad.write_text(json.dumps(broken))
    with pytest.raises(NasError, match="batch"):
        lt.load_table(bad)
    bad.write_text(
        json.dumps({**data, "blocks": {"resnet:cin=x": data["blocks"][next(iter(data["blocks"]))]}})
    )
    with pytest.raises(NasError, match="bad key"):
        lt.load_table(bad)


def _with_latency(space, **latency):
    return space.model_copy(update={"latency": space.latency.model_copy(update=latency)})


def test_check_table_device_dtype_batch_coverage_load(tiny_space, tiny_table):
    table = lt.load_table(tiny_table)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)
        lt.check_table(table, tiny_space, tiny_table)
    for latency, message in (
        ({"device": "cuda"}, "device=cpu"),
        ({"dtype": "fp16"}, "dtype=fp32"),
        ({"batch": 2}, "batch=1"),
        ({"device_name": "NVIDIA A10G"}, "device_name"),
    ):
        with pytest.raises(NasError, match=message):
            lt.check_table(table, _with_latency(tiny_space, **latency), tiny_table)
    lacking = table.model_copy(update={"blocks": {k: v for k, v in table.blocks.items() if "heads" not in k}})
    with pytest.raises(NasError, match=r"lacks 4 block\(s\) of space tiny, e.g. transformer"):
        lt.check_table(lacking, tiny_space, tiny_table)
    wider = tiny_space.model_copy(
        update={
            "levels": [tiny_space.levels[0].model_copy(update={"head_dim": [4, 8]}), tiny_space.levels[1]]
        }
    )
    with pytest.raises(NasError, match="lacks"):  # a head size the table never timed
        lt.check_table(table, wider, tiny_table)
    with pytest.warns(LoadWarning, match="cores busy"):
        lt.check_table(table.model_copy(update={"other_cores_busy": 1.5}), tiny_space, tiny_table)


def test_search_reads_the_table(tiny_table, write_yaml, monkeypatch):
    """`source: table`: the table is resolved beside the space file and checked before any
    trial; measure_cost predicts (no forward pass) and says where the figure came from."""
    import nas.cost.measure
    from nas.search.objective import measure_cost

    text = (
        (SPACES / "tiny.yaml")
        .read_text()
        .replace(
            "latency: {device: cpu, batch: 1, warmup: 1, iters: 3}",
            "latency: {source: table, table: tables/tiny.json, device: cpu, batch: 1}",
        )
    )
    path = write_yaml(
        text.replace("archs/tiny_stock.yaml", str(SPACES / "archs/tiny_stock.yaml")), "space.yaml"
    )
    space = lt.prepare_latency(load_space(path), path)
    monkeypatch.setattr(
        nas.cost.measure, "measure_latency", lambda *a, **k: pytest.fail("measured a forward")
    )
    arch = distinct_tiny_archs()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)
        cost = measure_cost(space, arch)
    assert cost["latency_source"] == "table" and cost["latency_device"]
    assert cost["latency_ms_p50"] == pytest.approx(10 + 3 * len(arch_blocks(arch)))
    with pytest.raises(NasError, match="not found"):
        lt.prepare_latency(load_space(path), tiny_table.parent.parent / "elsewhere" / "space.yaml")


def test_space_latency_schema(write_yaml):
    text = (SPACES / "tiny.yaml").read_text()
    for latency, message in (
        ("{source: table}", "needs table"),
        ("{source: measure, table: t.json}", "only to source: table"),
    ):
        path = write_yaml(
            text.replace("latency: {device: cpu, batch: 1, warmup: 1, iters: 3}", f"latency: {latency}")
        )
        with pytest.raises(NasError, match=message):
            load_space(path)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from nas.cli import main

    assert (
        main(["latency-table", str(SPACES / "tiny.yaml"), "--out", str(tmp_path / "t.json"), "--rounds", "0"])
        == 2
    )
    assert "--rounds: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert (
        main(["inspect", str(SPACES / "archs/tiny_stock.yaml"), "--latency-table", str(tmp_path / "no.json")])
        == 2
    )
    assert "latency table not found" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_recalibrate_refits_the_correction_keeps_the_blocks(tiny_space, tiny_table, monkeypatch, capsys):
    """The machine now runs whole networks at twice the time: the refitted line doubles, the blocks
    stay, the fit networks are those of the build (its seed), and the table says when."""
    before = lt.load_table(tiny_table)
    assert before.fit_seed == 0 and not before.recalibrated
    slower = lb.measure_whole

    def twice(arch, *a, **k):
        point = slower(arch, *a, **k)
        return point.model_copy(update={"measured_ms": 2 * point.measured_ms})

    monkeypatch.setattr(lb, "measure_whole", twice)
    lines: list[str] = []
    after = lb.recalibrate(tiny_space, tiny_table, "cpu", passes=2, iters=1, log=lines.append)
    assert (after.fit.slope, after.fit.intercept_ms) == pytest.approx((6.0, 20.0))
    assert after.blocks == before.blocks and after.recalibrated
    assert [p.arch for p in after.fit.points] == [p.arch for p in before.fit.points]
    assert lt.load_table(tiny_table) == after
    assert sum("whole networks" in line for line in lines) == 2 and "3.000 -> 6.000" in lines[-1]


def test_recalibrate_refuses_another_device_or_space(tiny_space, tiny_table, tmp_path, capsys):
    from nas.cli import main

    table = lt.load_table(tiny_table)
    other = tmp_path / "other.json"
    lt.write_table(
        other, table.model_copy(update={"device": table.device.model_copy(update={"name": "NVIDIA A10G"})})
    )
    with pytest.raises(NasError, match=r"measured on cpu 'NVIDIA A10G'.*recalibrate a table on the device"):
        lb.recalibrate(tiny_space, other, "cpu")
    renamed = [table.fit.points[0].model_copy(update={"arch": "elsewhere"}), *table.fit.points[1:]]
    lt.write_table(other, table.model_copy(update={"fit": table.fit.model_copy(update={"points": renamed})}))
    with pytest.raises(NasError, match="fit networks are not those of space tiny"):
        lb.recalibrate(tiny_space, other, "cpu", passes=1, iters=1)
    before = other.read_bytes()
    missing = tmp_path / "missing.json"
    args = ["latency-table", str(SPACES / "tiny.yaml"), "--recalibrate", "--rounds", "1"]
    assert main([*args, "--out", str(missing)]) == 2
    assert "latency table not found" in capsys.readouterr().err and not missing.exists()
    assert other.read_bytes() == before  # nothing half-written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_table_ranks_like_whole_networks(tmp_path):
    """On CUDA: a table of quickstart predicts 10 random networks measured whole (rank and error)."""
    from experiments.studies.latency_model import validate_space

    result = validate_space(SPACES / "quickstart.yaml", "cuda", tmp_path, count=10, rounds=5)
    print(json.dumps(result["predictor"]))
    assert result["predictor"]["spearman"] >= 0.8
    assert result["predictor"]["mape_pct"] <= 20


def test_search_with_table_source_and_card(search_cache, space_file, tiny_table, tmp_path, capsys):
    """A search with `source: table`: trials record the predicted figure and its source, budgets use
    it, the exported card names the source and device; a table for another dtype stops the search
    before any trial."""
    from optuna.trial import TrialState

    from nas.cli import main
    from nas.search.study import SearchSettings, run_search

    latency = {"source": "table", "table": str(tiny_table), "device": "cpu", "batch": 1}
    space = space_file("tabled", latency=latency, budgets={"latency_ms": 10 + 3 * 18})
    settings = SearchSettings(
        space=str(space), study="tb", trials=3, cache=str(search_cache), results=str(tmp_path / "results")
    )
    study = run_search(settings, quiet=True)
    for t in study.get_trials():
        a = t.user_attrs
        assert a["latency_source"] == "table" and a["latency_table"] == str(tiny_table.resolve())
        if a["latency_ms_p50"] > 10 + 3 * 18:
            assert t.state == TrialState.PRUNED and "latency_ms" in a["reason"]
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert done
    out = tmp_path / "export"
    assert main(["export", "--study", "tb", "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["latency_source"] == "table" and card["latency_device"]
    assert "predicted from latency table `tiny.json`" in (out / "card.md").read_text()
    wrong = space_file("wrongdtype", latency={**latency, "dtype": "bf16"})
    code = main(
        [
            "search",
            str(wrong),
            "--study",
            "w",
            "--cache",
            str(search_cache),
            "--results",
            str(tmp_path / "r2"),
        ]
    )
    assert code == 2 and "dtype=fp32" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "w" / "study.db").exists()


@pytest.mark.parametrize("name", ["quickstart", "decidiffusion_small"])
def test_committed_tables_cover_their_spaces(name, repo_root):
    """results/latency_model/table_*.json load, cover their space and match its latency setup (a
    space edit that adds a block makes this fail: rebuild the table)."""
    path = repo_root / "results" / "latency_model" / f"table_{name}.json"
    table = lt.load_table(path)
    space = load_space(SPACES / f"{name}.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)  # measured on a loaded machine (its README says so)
        lt.check_table(table, space, path)
    assert len(table.fit.points) == 6 and table.device.threads >= 1


def test_inspect_prints_the_prediction(tiny_table, capsys):
    from nas.cli import main

    arch = SPACES / "archs" / "tiny_stock.yaml"
    assert main(["inspect", str(arch), "--latency-table", str(tiny_table)]) == 0
    assert "predicted       p50" in capsys.readouterr().out
    assert main(["inspect", str(arch), "--latency-table", str(tiny_table), "--batch", "2"]) == 2
    assert "differs from" in capsys.readouterr().err
