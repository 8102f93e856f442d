"""The pick (analysis/pick.py): hand-checked ladders, and an independent brute-force Pareto frontier and pick
on random records; `ggml-probe pick` on the demo ladder, its JSON checked by the same brute force."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from ggml_probe.analysis.pick import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    Budget,
    LevelRecord,
    available_memory,
    context_allowance,
    parse_size,
    pareto_frontier,
    pick,
    records_from_dicts,
)
from ggml_probe.errors import ProbeError

MB = 1_000_000


def _ladder(**overrides):
    """A hand-made ladder shaped like llama.cpp's LLaMA 3 8B scoreboard, scaled down."""
    rows = [
        LevelRecord("F16", 270 * MB, 16.0, kld_mean=0.0, kld_p99=0.0, accuracy_delta=0.0, tg_tokens_per_s=20.0),
        LevelRecord("Q8_0", 145 * MB, 8.5, kld_mean=0.004, kld_p99=0.05, accuracy_delta=-0.5,
                    accuracy_delta_ci=(-2.0, 1.0), tg_tokens_per_s=48.0),
        LevelRecord("Q4_K_M", 105 * MB, 5.0, kld_mean=0.05, kld_p99=0.6, accuracy_delta=-3.0,
                    accuracy_delta_ci=(-10.0, 4.0), tg_tokens_per_s=45.0),
        LevelRecord("Q4_1", 95 * MB, 5.0, kld_mean=0.35, kld_p99=3.0, accuracy_delta=-8.0, tg_tokens_per_s=52.0),
        LevelRecord("Q4_0", 85 * MB, 4.5, kld_mean=0.3, kld_p99=2.5, accuracy_delta=-6.0, tg_tokens_per_s=55.0),
    ]
    return [LevelRecord(**{**r.__dict__, **overrides.get(r.name, {})}) for r in rows]


# ------------------------------------------------------------------ hand-checked


def test_default_budget_picks_the_smallest_level_under_mean_kld_0_1():
    res = pick(_ladder(), Budget(memory_bytes=8 << 30))
    assert res.pick == "Q4_K_M"
    assert res.budget["max_kld"] == 0.1 and res.budget["memory_source"] == "given"
    # pp is measured nowhere: size × mean KLD × tg, and the dropped one says why
    assert res.objectives == ["size_bytes", "kld_mean", "tg_tokens_per_s"]
    assert res.dropped_objectives == {"pp_tokens_per_s": "not measured"}
    # Q4_1 is larger, worse and slower than Q4_0; every other level trades something
    assert res.frontier == ["F16", "Q8_0", "Q4_K_M", "Q4_0"]
    assert res.levels["Q4_1"].dominated_by == ["Q4_0"] and not res.levels["Q4_1"].on_frontier
    assert [f.budget for f in res.levels["Q4_0"].failures] == ["max_kld"]
    assert res.levels["Q4_0"].failures[0].excess == pytest.approx(3.0)
    assert res.reasons[0].startswith("Q4_K_M: the smallest level within the budget (mean KLD ≤ 0.1")
    assert "on the Pareto frontier of size × mean KLD × tg tokens/s" in res.reasons[0]
    assert "Q4_1: excluded: mean KLD 0.35 > 0.1; dominated by Q4_0." in res.reasons
    assert "Q8_0: meets the budget; ranks after Q4_K_M by size." in res.reasons
    assert res.nearest_miss is None


def test_prefer_speed_takes_the_fastest_within_the_budget():
    assert pick(_ladder(), Budget(memory_bytes=8 << 30), prefer="speed").pick == "Q8_0"  # 48 > 45 tokens/s
    assert pick(_ladder(), Budget(max_kld=0.5, memory_bytes=8 << 30), prefer="speed").pick == "Q4_0"
    no_speed = [LevelRecord(r.name, r.size_bytes, kld_mean=r.kld_mean) for r in _ladder()]
    with pytest.raises(ProbeError, match="needs speed figures"):
        pick(no_speed, Budget(memory_bytes=8 << 30), prefer="speed")


def test_p99_and_accuracy_budgets():
    assert pick(_ladder(), Budget(max_p99_kld=0.5, memory_bytes=8 << 30)).pick == "Q8_0"
    res = pick(_ladder(), Budget(max_accuracy_drop=5, memory_bytes=8 << 30))
    # -3.0 points is within 5, but its interval reaches a 10-point drop: picked, with the note
    assert res.pick == "Q4_K_M" and "reaches a drop of 10.0 points" in res.levels["Q4_K_M"].notes[0]
    assert pick(_ladder(), Budget(max_accuracy_drop=2, memory_bytes=8 << 30)).pick == "Q8_0"
    # no kld budget at all: only accuracy counts
    assert pick(_ladder(), Budget(max_kld=None, max_accuracy_drop=6, memory_bytes=8 << 30)).pick == "Q4_0"
    # a budget on a figure a level lacks: that level is not shown to meet it
    res = pick(_ladder(Q4_K_M={"accuracy_delta": None, "accuracy_delta_ci": None}),
               Budget(max_accuracy_drop=5, memory_bytes=8 << 30))
    assert res.pick == "Q8_0" and res.levels["Q4_K_M"].failures[0].text == "accuracy drop not measured"


def test_memory_counts_the_context_allowance_and_none_fits_names_the_nearest_miss():
    ladder = _ladder(**{n: {"context_bytes": 10 * MB} for n in ("F16", "Q8_0", "Q4_K_M", "Q4_1", "Q4_0")})
    assert pick(ladder, Budget(memory_bytes=115 * MB)).pick == "Q4_K_M"  # 105 + 10 fits exactly
    res = pick(ladder, Budget(memory_bytes=110 * MB))
    assert res.pick is None
    # one failure each for Q8_0 (memory 155/110), Q4_K_M (memory 115/110), Q4_0 (KLD 3×): the smallest excess
    assert res.nearest_miss == "Q4_K_M"
    assert res.reasons[0] == ("none fits the budget (mean KLD ≤ 0.1, memory 104.9 MiB); nearest miss: Q4_K_M "
                              "(needs 109.7 MiB > 104.9 MiB of memory).")
    assert res.levels["Q4_K_M"].memory_need_bytes == 115 * MB


def test_equal_levels_share_the_frontier_and_dominate_nothing():
    a, b = LevelRecord("A", 100, kld_mean=0.1), LevelRecord("B", 100, kld_mean=0.1)
    frontier, by = pareto_frontier([a, b, LevelRecord("C", 100, kld_mean=0.2)], ["size_bytes", "kld_mean"])
    assert frontier == ["A", "B"] and by == {"A": [], "B": [], "C": ["A", "B"]}
    assert pick([a, b], Budget(memory_bytes=1000)).pick == "A"  # a tie keeps the ladder's order


def test_bad_budgets_and_objectives():
    with pytest.raises(ProbeError, match="--max-kld must be"):
        pick(_ladder(), Budget(max_kld=-1, memory_bytes=1))
    with pytest.raises(ValueError, match="not measured for F16"):
        pick(_ladder(F16={"same_top_p": None}, Q8_0={"same_top_p": 0.9}), Budget(memory_bytes=1),
             objectives=["size_bytes", "same_top_p"])
    with pytest.raises(ValueError, match="unknown objective"):
        pick(_ladder(), Budget(memory_bytes=1), objectives=["beauty"])


def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("8 GB") == 8_000_000_000
    assert parse_size("8G") == parse_size("8g") == 8 << 30
    assert parse_size("1.5MiB") == 1_572_864
    assert parse_size("512kB") == 512_000
    assert parse_size("1000000") == 1_000_000
    for bad in ("lots", "8 XB", "-1GiB", "8iB", "", "0", "GiB"):
        with pytest.raises(ProbeError, match="--memory"):
            parse_size(bad)


def test_available_memory_and_the_context_allowance():
    n, source = available_memory()
    assert n > 0 and source
    # the demo (SmolLM2-135M) at n_ctx 4096: llama.cpp reports KV 90.00 MiB (exact) and compute 99.38 MiB
    a = context_allowance(n_layers=30, n_kv_heads=3, head_dim_k=64, n_heads=9, hidden_size=576, ffn_size=1536,
                          n_vocab=49152, n_ctx=4096)
    assert a["kv_cache_bytes"] == 90 * 2**20
    assert a["compute_bytes"] / 2**20 == pytest.approx(99.38, rel=0.02)


# ------------------------------------------------------------------ brute force


def brute_frontier(levels: dict[str, dict], objectives: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Every ordered pair compared objective by objective, in plain Python."""
    def better_or_equal(a, b, o):
        return a[o] <= b[o] if OBJECTIVES[o] == "min" else a[o] >= b[o]

    def strictly_better(a, b, o):
        return a[o] < b[o] if OBJECTIVES[o] == "min" else a[o] > b[o]

    by = {n: [] for n in levels}
    for x, y in itertools.permutations(levels, 2):
        a, b = levels[x], levels[y]
        if all(better_or_equal(a, b, o) for o in objectives) and any(strictly_better(a, b, o) for o in objectives):
            by[y].append(x)
    by = {n: sorted(v, key=list(levels).index) for n, v in by.items()}
    return [n for n in levels if not by[n]], by


def brute_objectives(levels: dict[str, dict]) -> list[str]:
    return [o for o in DEFAULT_OBJECTIVES if all(d.get(o) is not None for d in levels.values())]


def brute_pick(levels: dict[str, dict], budget: dict, prefer: str) -> str | None:
    def ok(d):
        if d["size_bytes"] + d.get("context_bytes", 0) > budget["memory_bytes"]:
            return False
        if budget.get("max_kld") is not None and (d.get("kld_mean") is None or d["kld_mean"] > budget["max_kld"]):
            return False
        if budget.get("max_p99_kld") is not None and (d.get("kld_p99") is None or d["kld_p99"] > budget["max_p99_kld"]):
            return False
        drop = budget.get("max_accuracy_drop")
        if drop is not None and (d.get("accuracy_delta") is None or -d["accuracy_delta"] > drop):
            return False
        return True

    fits = [n for n, d in levels.items() if ok(d)]
    if not fits:
        return None
    if prefer == "size":
        return min(fits, key=lambda n: (levels[n]["size_bytes"], levels[n].get("kld_mean", math.inf)
                                        if levels[n].get("kld_mean") is not None else math.inf, list(levels).index(n)))
    for key, other in (("tg_tokens_per_s", "pp_tokens_per_s"), ("pp_tokens_per_s", "tg_tokens_per_s")):
        if all(levels[n].get(key) is not None for n in fits):
            return min(fits, key=lambda n: (-levels[n][key], -(levels[n].get(other) or 0.0), levels[n]["size_bytes"],
                                            list(levels).index(n)))
    return "no speed"


def _random_levels(rng: random.Random) -> dict[str, dict]:
    out = {}
    coarse = rng.random() < 0.5  # few distinct values: ties and equal rows happen
    for i in range(rng.randint(1, 9)):
        def val(lo, hi):
            return round(rng.uniform(lo, hi), 1 if coarse else 6)
        d = {"size_bytes": rng.choice([50, 80, 100, 150]) * MB if coarse else rng.randint(10, 300) * MB,
             "kld_mean": val(0, 0.3), "kld_p99": val(0, 3), "accuracy_delta": val(-10, 2),
             "pp_tokens_per_s": val(100, 900), "tg_tokens_per_s": val(5, 60), "context_bytes": rng.randint(0, 20) * MB}
        for k in ("kld_mean", "kld_p99", "accuracy_delta", "pp_tokens_per_s", "tg_tokens_per_s"):
            if rng.random() < 0.15:
                d[k] = None
        out[f"L{i}"] = d
    return out


def test_frontier_and_pick_equal_an_independent_brute_force_on_random_records():
    rng = random.Random(12)
    picked = none_fits = dominated = 0
    for _ in range(600):
        levels = _random_levels(rng)
        objectives = brute_objectives(levels)
        records = records_from_dicts(levels)
        frontier, by = pareto_frontier(records, objectives)
        assert (frontier, by) == brute_frontier(levels, objectives)
        budget = {"memory_bytes": rng.randint(50, 320) * MB, "max_kld": rng.choice([None, 0.05, 0.1, 0.2]),
                  "max_p99_kld": rng.choice([None, 1.0, 2.0]), "max_accuracy_drop": rng.choice([None, 2.0, 5.0])}
        prefer = rng.choice(["size", "speed"])
        expected = brute_pick(levels, budget, prefer)
        if expected == "no speed":  # prefer="speed" where a level within the budget has neither tg nor pp
            with pytest.raises(ProbeError, match="needs speed figures"):
                pick(records, Budget(**budget), prefer=prefer)
            continue
        res = pick(records, Budget(**budget), prefer=prefer)
        assert res.pick == expected, (levels, budget, prefer)
        assert res.objectives == objectives and res.frontier == frontier
        assert {n: v.dominated_by for n, v in res.levels.items()} == by
        picked += res.pick is not None
        none_fits += res.pick is None
        dominated += sum(bool(v) for v in by.values())
        if res.pick is None:
            assert res.nearest_miss in levels and res.reasons[0].startswith("none fits the budget")
    assert picked > 100 and none_fits > 50 and dominated > 100  # every branch was exercised


# ------------------------------------------------------------------ the command, on the demo ladder


def _boolq_text(path, n):
    with open(path) as f:
        return "\n\n".join(json.loads(line)["passage"] for _, line in zip(range(n), f))


@pytest.mark.slow
def test_pick_command_on_the_demo_ladder(demo_ladder, boolq_path, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    text = tmp_path / "text.txt"
    text.write_text(_boolq_text(boolq_path, 12))
    common = ["--ctx", "64", "--chunks", "4", "--batch", "128", "--threads", "2", "--gpu-layers", "0",
              "-o", str(tmp_path / "pick")]
    runner = CliRunner()
    res = runner.invoke(cli, ["pick", "demo", "--quants", "F16,Q8_0,Q4_K_M,Q4_0", "--text", str(text), "--json",
                              "--memory", "8GiB", *common])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["reference"] == "F16" and doc["requantized_from"] == "Q4_1"
    assert doc["text"]["source"] == "file" and doc["kld"]["chunks"] == 4 and doc["kld"]["ctx"] == 64
    levels = doc["levels"]
    assert list(levels) == ["F16", "Q8_0", "Q4_K_M", "Q4_0"]
    for name, d in levels.items():
        # the record carries the KLD run's own figures and the file's size
        if name != "F16":
            assert d["kld_mean"] == doc["kld"]["models"][name]["kld_mean"]
            assert d["kld_p99"] == doc["kld"]["models"][name]["kld_p99"]
        assert d["size_bytes"] == Path(d["path"]).stat().st_size
        assert d["context_bytes"] > 0
    assert levels["F16"]["kld_mean"] == 0.0 and levels["F16"]["same_top_p"] == 1.0
    assert levels["F16"]["kld_mean"] < levels["Q8_0"]["kld_mean"] < levels["Q4_0"]["kld_mean"]
    # recomputed from the JSON's own per-level figures by the brute force
    objectives = brute_objectives(levels)
    assert doc["pick"]["objectives"] == objectives == ["size_bytes", "kld_mean"]
    frontier, by = brute_frontier(levels, objectives)
    assert doc["pick"]["frontier"] == frontier
    assert {n: v["dominated_by"] for n, v in doc["pick"]["levels"].items()} == by
    assert doc["pick"]["pick"] == brute_pick(levels, doc["pick"]["budget"], "size") is not None
    assert doc["pick"]["budget"]["memory_bytes"] == 8 << 30

    # the terminal table says what the ladder is, the pick and why (the KLD is reused, not recomputed)
    out = runner.invoke(cli, ["pick", "demo", "--quants", "F16,Q8_0,Q4_K_M,Q4_0", "--text", str(text),
                              "--memory", "8GiB", "-q", *common])
    assert out.exit_code == 0, out.output
    assert "requantized from Q4_1" in out.output and f"pick: {doc['pick']['pick']}" in out.output

    # a budget nothing fits: a clear answer, exit 0 (it is an answer, not bad input)
    none = runner.invoke(cli, ["pick", "demo", "--quants", "F16,Q8_0,Q4_K_M,Q4_0", "--text", str(text),
                               "--memory", "1MiB", "--json", *common])
    assert none.exit_code == 0, none.output
    nd = json.loads(none.output)["pick"]
    assert nd["pick"] is None and nd["nearest_miss"] in levels and nd["reasons"][0].startswith("none fits")
    plain = runner.invoke(cli, ["pick", "demo", "--quants", "F16,Q8_0,Q4_K_M,Q4_0", "--text", str(text),
                                "--memory", "1MiB", "-q", *common])
    assert plain.exit_code == 0 and "none fits" in plain.output


def test_pick_command_bad_input(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    monkeypatch.setenv("GGML_PROBE_MODELS", str(tmp_path / "store"))
    text = tmp_path / "t.txt"
    text.write_text("some text")
    runner = CliRunner()
    for args, message in [
        (["--quants", "F16,Q9_9", "--text", str(text)], "Q9_9"),
        (["--quants", "F16,Q4_0", "--text", str(text), "--memory", "eight gigs"], "--memory"),
        (["--quants", "F16,Q4_0", "--text", str(text), "--max-kld", "-1"], "--max-kld"),
        (["--quants", "F16,Q4_0"], "--text"),
        (["--quants", "F16", "--text", str(text)], "two levels"),
        (["--quants", "F16,Q4_0", "--text", str(text), "--prefer", "speed"], "speed"),
    ]:
        res = runner.invoke(cli, ["pick", "demo", *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, (args, res.output)


@pytest.mark.slow
def test_pick_levels_with_measured_speed_prefers_the_fastest(demo_ladder, boolq_path, tmp_path, monkeypatch):
    """pick_levels with a speed measurement (pipeline.speed, tiny pp/tg): the figures come from the bench, the
    task's own text (BoolQ passages) feeds the KLD, and the speed pick is the brute force's on the result."""
    from ggml_probe.pipeline.kld import KLDSettings
    from ggml_probe.pipeline.pick import pick_levels

    speed = pytest.importorskip("ggml_probe.pipeline.speed")  # the bench measurement (issue 12)
    bench = speed.BenchSettings(n_prompt=32, n_gen=8, reps=1, threads=2, gpu_layers=0)

    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    res = pick_levels("demo", ["F16", "Q8_0", "Q4_0"], task="boolq", data_path=boolq_path,
                      budget=Budget(max_kld=10.0, memory_bytes=8 << 30), prefer="speed", out=tmp_path,
                      kld_settings=KLDSettings(ctx=64, chunks=2, batch=128, threads=2, gpu_layers=0),
                      measure_speed=lambda files: speed.bench_files(files, bench).speed(), speed_source="bench pp32/tg8")
    doc = json.loads(json.dumps(res.to_dict(), default=str))
    assert doc["text"]["source"] == "task" and doc["text"]["fields"] == ["passage"]
    assert doc["speed_source"] == "bench pp32/tg8"
    levels = doc["levels"]
    assert all(d["pp_tokens_per_s"] > 0 and d["tg_tokens_per_s"] > 0 for d in levels.values())
    objectives = brute_objectives(levels)
    assert objectives == doc["pick"]["objectives"] == list(DEFAULT_OBJECTIVES)
    assert (doc["pick"]["frontier"], {n: v["dominated_by"] for n, v in doc["pick"]["levels"].items()}) == \
        brute_frontier(levels, objectives)
    assert doc["pick"]["pick"] == brute_pick(levels, doc["pick"]["budget"], "speed")
    assert (tmp_path / "pick.json").exists()
