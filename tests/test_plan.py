"""secateur plan: targets, grids, the Pareto front, halving, rank correlation, the KL proxy, the cost
model against a fake engine given as a table, and whole plans on a tiny model whose recipe runs."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import ATTN, COMMON, tiny_text, tiny_tokenizer
from secateur.cli import main
from secateur.errors import ConfigError
from secateur.io import load
from secateur.plan.costs import (ArchShape, TableEngine, Timing, design, llamacpp_alignment, measure, paired, shape_of,
                                 timed_model)
from secateur.plan.proxy import token_kl
from secateur.plan.search import halve, pareto_front, spearman, undominated
from secateur.plan.space import Candidate, block_counts, candidates, depth_counts, parse_grid, parse_splits
from secateur.plan.targets import parse_target


# --- targets and grids ------------------------------------------------------------------------------------


def test_targets_parse_units_and_directions():
    assert parse_target("decode-speedup=1.6").value == 1.6
    assert parse_target("params=80M").value == 80e6
    assert parse_target("file=200MB").value == 200e6
    assert parse_target("file=1GiB").value == 2**30
    speed, size = parse_target("decode-speedup=1.5"), parse_target("params=1k")
    assert speed.met(1.6) and not speed.met(1.5, margin=0.05) and speed.met(1.58, margin=0.05)
    assert size.met(1000) and not size.met(1001)
    for bad in ("speed=2", "params=80Q", "decode-speedup=0.9", "file=", "params"):
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_grids_ranges_lists_and_block_counts():
    assert parse_grid("0:0.5:0.1", "width") == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert parse_grid("0.2,0.1,0.1", "width") == (0.1, 0.2)
    for bad in ("0:1:0.5", "a,b", "0.5:0.1:-1", ""):
        with pytest.raises(ConfigError):
            parse_grid(bad, "width")
    assert block_counts((0.0, 0.1, 0.2, 0.3), 30) == (0, 3, 6, 9)
    assert depth_counts("0:0.5", 30) == tuple(range(16)) and depth_counts("0.1:0.2", 30) == (3, 4, 5, 6)
    assert depth_counts("0,0.1", 30) == (0, 3) and depth_counts("0:0.9", 4) == (0, 1, 2, 3)  # one block stays
    for bad in ("0.5:0.2", "0:1.2", "a:b"):
        with pytest.raises(ConfigError):
            depth_counts(bad, 30)
    grid = candidates((0, 3), (0.0, 0.2), (0.0, 0.125))
    assert Candidate(0, 0.0, 0.0) not in grid and Candidate(3, 0.0, 0.125) not in grid  # dense; hidden needs width
    assert Candidate(3, 0.2, 0.125) in grid and len(grid) == 5  # 2 width-only, 1 depth-only, 2 mixed
    assert Candidate(3, 0.2, 0.125).stages() == [{"method": "angular", "remove_blocks": 3},
                                                  {"method": "width", "remove_fraction": 0.2, "hidden_fraction": 0.125,
                                                   "round_to": 8}]


def test_attention_splits_are_one_more_axis_of_the_width_stages():
    assert parse_splits("default") == (None,) and parse_splits("0:0.5:0.25") == (0.0, 0.25, 0.5)
    assert parse_splits("0.34, default,0") == (None, 0.0, 0.34)
    for bad in ("", "1.5", "default,0:0.5:0.25,0.1", "none"):
        with pytest.raises(ConfigError):
            parse_splits(bad)
    grid = candidates((0, 3), (0.0, 0.2), (0.0,), 8, (None, 0.0, 0.34))
    # a split is a share of some width: depth-only candidates come once, width ones once per split
    assert len(grid) == 1 + 2 * 3 and Candidate(3, 0.0, 0.0, 8, 0.0) not in grid
    assert [c.key for c in sorted(c for c in grid if c.blocks == 3)] == ["d3-w0-h0", "d3-w0.2-h0", "d3-w0.2-h0-a0",
                                                                          "d3-w0.2-h0-a0.34"]
    assert Candidate(3, 0.2, 0.0, 8, 0.34).stages()[1] == {"method": "width", "remove_fraction": 0.2,
                                                           "attention_fraction": 0.34, "round_to": 8}
    assert Candidate(3, 0.2, 0.0, 8, 0.34).width_config().attention_share == 0.34
    assert Candidate(3, 0.2, 0.0, 8).width_config().attention_share == 0.2  # the default rounds the width


# --- pure search parts ------------------------------------------------------------------------------------------


def test_pareto_front_by_hand_and_against_brute_force():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3.5), (4, 1)]
    assert pareto_front(points) == [3, 5, 1, 0]  # (3, 4) and (2, 3.5) are dominated by (2, 3); equal points both stay
    rng = random.Random(0)
    for _ in range(20):
        pts = [(rng.random(), rng.random()) for _ in range(30)]
        truth = {i for i, (a, b) in enumerate(pts) if not any(c <= a and d <= b and (c, d) != (a, b) for c, d in pts)}
        assert set(pareto_front(pts)) == truth


def test_undominated_keeps_the_boundary_per_group():
    points = [("h0", (2, 0.1)), ("h0", (3, 0.1)), ("h0", (1, 0.3)), ("h0", (1, 0.4)), ("h0", (2, 0.1)),
              ("h1", (3, 0.1)), ("h0", (0, 0.5))]  # fmt: skip
    # (3, 0.1) is dominated by (2, 0.1), (1, 0.4) by (1, 0.3); equal points and other groups stay
    assert undominated(points) == [0, 2, 4, 5, 6]
    rng = random.Random(0)
    for _ in range(20):
        pts = [(rng.randint(0, 1), (rng.randint(0, 5), rng.randint(0, 5))) for _ in range(25)]
        truth = [i for i, (g, (a, b)) in enumerate(pts)
                 if not any(h == g and c <= a and d <= b and (c, d) != (a, b) for h, (c, d) in pts)]  # fmt: skip
        assert undominated(pts) == truth


def test_halve_keeps_the_best_share_and_ties():
    scores = {"a": 0.1, "b": 0.4, "c": 0.2, "d": 0.3, "e": 0.2}
    assert halve(scores, 0.5) == ["a", "c", "e"]  # ceil(5/2) = 3
    assert halve(scores, 0.2) == ["a"]
    assert halve({"a": 1.0, "b": 1.0, "c": 2.0}, 0.34) == ["a", "b"]  # the tie at the cut stays
    assert halve({}, 0.5) == []


def test_spearman_uses_mean_ranks_for_ties():
    # Pearson on mean ranks gives 8 / sqrt(95); the no-ties shortcut 1 - 6 sum(d^2) / (n (n^2 - 1)) would give 0.825
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1)


def test_token_kl_is_forward_kl_from_the_teacher():
    teacher = torch.tensor([[0.5, 0.5]]).log()
    student = torch.tensor([[0.0, math.log(3)]])  # q = (0.25, 0.75)
    # KL(p || q) = 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3); the reverse KL(q || p) would be 0.1308
    assert float(token_kl(teacher, student)[0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_an_evicted_depth_level_is_rebuilt_exactly_from_its_patch(deep_model):
    """With room for one level's model, going back to the first level rebuilds it from the dense
    model and the parameters compensation changed: the same candidate, the same KL, no new pass."""
    from secateur.plan.proxy import Proxy

    model, _ = load(deep_model[0], dtype="float32", device="cpu")
    windows = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    proxy = Proxy(model, windows[:4], windows[4:], torch.device("cpu"), max_levels=1)
    candidate = Candidate(1, 0.25, 0.0, 8)
    first = proxy.score(proxy.build(candidate), range(2))
    level = proxy.levels[1]
    assert level.removed and level.patch  # compensation changed the block before the span
    assert all(name.endswith("down_proj.weight") for name in level.patch)
    proxy.build(Candidate(2, 0.25, 0.0, 8))
    assert level.model is None  # evicted
    passes = proxy.seconds["levels"]
    assert proxy.score(proxy.build(candidate), range(2)) == first
    assert proxy.seconds["levels"] == passes  # rebuilt, not recompensated; the statistics were kept
    fresh = dict(load(deep_model[0], dtype="float32", device="cpu")[0].named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())  # the dense model is untouched


def test_levels_start_their_passes_where_they_differ_from_the_dense_model(deep_model):
    """Compensation and width statistics of a depth level start at the block before its removed run,
    on the activations the dense statistics pass kept there, with the dense statistics for the
    blocks before; the fit's target is the kept dense state leaving the run, so the run's blocks do
    not run: the same fitted weights and the same statistics as passes over the whole level model,
    and fewer blocks streamed."""
    from secateur.calibrate import stream
    from secateur.depth import compensate
    from secateur.plan.proxy import Proxy
    from secateur.width.prune import gather_statistics

    model, _ = load(deep_model[0], dtype="float32", device="cpu")
    windows = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    fast, slow = (Proxy(model, windows[:4], windows[4:], torch.device("cpu")) for _ in range(2))
    for proxy in (fast, slow):
        proxy.spans([1, 2])
        proxy._distances = {1: [0.3, 0.2, 0.1, 0.4], 2: [0.5, 0.4, 0.1]}  # runs [2] and [2, 3]: block 1 is fitted
    fast.dense_statistics()
    # entering block 1 (fitted) and leaving run [2]; run [2, 3] ends at the last block, where the pass
    # observes no state: that level's compensation runs the run's blocks
    assert set(fast._states) == {1, 3}
    real = stream.run_block

    def counted(work):
        calls = []
        stream.run_block = compensate.run_block = lambda *a: calls.append(1) or real(*a)
        try:
            return work(), len(calls)
        finally:
            stream.run_block = compensate.run_block = real

    fast_levels, fast_runs = counted(lambda: [(fast.level(n), fast.statistics(fast.level(n))) for n in (1, 2)])
    slow_levels, slow_runs = counted(lambda: [(level := slow.level(n), gather_statistics(
        level.model, windows[:4], moments=True, gradients=False, batch_size=4)) for n in (1, 2)])  # fmt: skip
    # one batch. Level 1: the whole-model compensation runs block 0, block 1 once more than the fit
    # needs and block 2 (3 more); level 2: block 0 (1 more); each statistics pass runs block 0 (2 more)
    assert slow_runs - fast_runs == 6
    for (level, statistics), (other, whole) in zip(fast_levels, slow_levels):
        assert level.patch.keys() == other.patch.keys() and level.patch
        assert all(torch.equal(level.patch[k], other.patch[k]) for k in level.patch)
        assert statistics.moments.keys() == whole.moments.keys()
        for key, moments in whole.moments.items():
            mine = statistics.moments[key]
            assert torch.equal(mine.sum, moments.sum) and torch.equal(mine.sumsq, moments.sumsq), key


# --- the cost model against a fake engine -------------------------------------------------------------------------


def _law(shape: ArchShape) -> Timing:
    """A fake engine: linear per block, with a 3x penalty on one (misaligned) hidden size."""
    slow = 3.0 if shape.hidden == 56 else 1.0
    per_block = 2e-4 + 1.5e-9 * (shape.attention_params + shape.mlp_params)
    return Timing(decode=slow * (1e-3 + shape.layers * per_block), prefill=slow * (5e-3 + 40 * shape.layers * per_block))


def _shapes() -> list[ArchShape]:
    return [ArchShape(hidden, layers, heads, heads // 2, 16, channels) for hidden in (64, 56)
            for layers in (4, 6, 8, 10) for heads in (2, 4) for channels in (96, 128, 192)]  # fmt: skip


def _config(shape: ArchShape) -> LlamaConfig:
    return LlamaConfig(**{**COMMON, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
                          "intermediate_size": shape.channels}, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim)  # fmt: skip


def test_cost_model_reproduces_a_table_engine_on_held_out_shapes(tmp_path):
    shapes = _shapes()
    engine = TableEngine({s: _law(s) for s in shapes})
    model, timings, errors = timed_model(engine, {s: _config(s) for s in shapes}, tmp_path / "c.jsonl", holdout=3,
                                         progress=False)  # fmt: skip
    fit, held = design(shapes, 3)
    assert len(held) == 6 and not set(fit) & set(held) and len(timings) == len(fit) + len(held) < len(shapes)
    assert all(abs(e["decode"]) < 1e-9 and abs(e["prefill"]) < 1e-9 for e in errors)
    for s in shapes:  # every shape, measured or not, is predicted exactly: the law is what the model assumes
        assert model.predict(s).decode == pytest.approx(_law(s).decode, rel=1e-9)
        assert model.predict(s).prefill == pytest.approx(_law(s).prefill, rel=1e-9)
    # the 3x penalty of hidden 56 is reproduced because each hidden size has its own fit
    assert set(model.coefficients) == {56, 64}


def test_cost_model_error_is_reported_when_the_engine_is_not_linear(tmp_path):
    shapes = _shapes()
    table = {s: Timing(_law(s).decode * (1 + 0.3 * (s.channels == 128 and s.heads == 4)), _law(s).prefill)
             for s in shapes}
    _, _, errors = timed_model(TableEngine(table), {s: _config(s) for s in shapes}, None, progress=False)
    assert max(abs(e["decode"]) for e in errors) > 0.05


def test_timings_are_cached_and_resumed(tmp_path):
    shapes = _shapes()[:5]
    cache = tmp_path / "costs.jsonl"
    first = TableEngine({s: _law(s) for s in shapes})
    measure(first, {s: _config(s) for s in shapes[:3]}, cache, progress=False)
    with cache.open("a") as f:
        f.write('{"shape": "cut sh')  # a kill in the middle of a line
    again = TableEngine({s: _law(s) for s in shapes})
    result = measure(again, {s: _config(s) for s in shapes}, cache, progress=False)
    assert again.calls == shapes[3:] and result == {s: _law(s) for s in shapes}


def test_each_hidden_size_screens_with_its_own_fits_error(tmp_path, monkeypatch):
    """A hidden size whose timings are not linear has a large held-out error; the candidates of the
    other hidden size keep a tolerance of their own fit's error (at least 5%)."""
    from secateur.plan.config import PlanConfig
    from secateur.plan.planner import Row, _costs, _feasible

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    shapes = _shapes()
    bent = {s: 1 + 0.3 * (s.hidden == 56 and s.channels == 128 and s.heads == 4) for s in shapes}
    table = {s: Timing(_law(s).decode * bent[s] / (3 if s.hidden == 56 else 1), _law(s).prefill) for s in shapes}
    dense = ArchShape(64, 10, 4, 2, 16, 192)
    blocks = sorted({(s.hidden, s.heads, s.channels) for s in shapes})  # a width fraction per block shape
    candidate = {s: Candidate(10 - s.layers, 0.01 * (1 + blocks.index((s.hidden, s.heads, s.channels))), 0.125)
                 for s in shapes}  # fmt: skip
    rows = {candidate[s].key: Row(candidate[s], s, 0, 0) for s in shapes if s != dense}
    configs = {row.candidate: _config(row.shape) for row in rows.values()}
    target = parse_target("decode-speedup=1.5")
    book, costs = _costs(TableEngine(table), _config(dense), rows, configs, PlanConfig(target=str(target)), target,
                         False)  # fmt: skip
    assert costs["tolerance"][64] == 0.05 and costs["tolerance"][56] > 0.1
    _feasible(rows, target, book, 0.0, costs["tolerance"], {})
    for row in rows.values():  # in where predicted within its own hidden size's tolerance below the target
        predicted = book.speedup(row.shape)[0]
        assert row.feasible == (predicted >= 1.5 * (1 - costs["tolerance"][row.shape.hidden])), row.shape.key
    between = [r for r in rows.values() if 1.5 * (1 - costs["tolerance"][56]) <= book.speedup(r.shape)[0] < 1.5 * 0.95]
    assert {r.shape.hidden for r in between} == {56, 64}  # one tolerance for both would let these 64s in
    assert {r.feasible for r in between if r.shape.hidden == 64} == {False}
    assert {r.feasible for r in between if r.shape.hidden == 56} == {True}


class _Spells(TableEngine):
    """The table, with slow spells: the n-th run is slowed by `slowdowns[n % len(slowdowns)]`; counts
    what it prepares and releases."""

    def __init__(self, table, slowdowns, keeps=True):
        super().__init__(table)
        self.slowdowns, self.keeps, self.prepared, self.released = slowdowns, keeps, [], []

    def prepare(self, config):
        self.prepared.append(shape_of(config))
        return super().prepare(config)

    def release(self, prepared):
        self.released.append(prepared)

    def run(self, prepared: ArchShape, only=None) -> Timing:
        slow = self.slowdowns[len(self.calls) % len(self.slowdowns)]
        timing = super().run(prepared)
        return Timing(timing.decode * slow, timing.prefill * slow)


def test_timing_rounds_pass_over_the_shapes_in_turn_and_keep_the_fastest(tmp_path):
    """Slow spells that catch one pass of a shape: the fastest of three passes is the table's value
    (a mean or a median of the passes would not be), and the held-out error that single timings show
    goes away."""
    shapes = _shapes()
    configs = {s: _config(s) for s in shapes}
    fit, held = design(shapes, 3)
    measured = len(fit) + len(held)
    # runs of the first pass alternate between slowed by 30% and not; later passes are clean
    slowdowns = [1.3, 1.0] * (measured // 2) + [1.0] * (measured % 2) + [1.0] * (2 * measured)
    engine = _Spells({s: _law(s) for s in shapes}, slowdowns)
    _, timings, errors = timed_model(engine, configs, tmp_path / "c.jsonl", rounds=3, progress=False)
    assert all(timings[s] == _law(s) for s in timings)
    assert max(abs(e["decode"]) for e in errors) < 1e-9
    assert engine.calls == [*engine.calls[:measured]] * 3  # pass after pass, same order
    assert sorted(engine.prepared) == sorted(timings) and sorted(engine.released) == sorted(timings)  # kept for all passes
    single = _Spells({s: _law(s) for s in shapes}, slowdowns)
    _, _, errors = timed_model(single, configs, None, rounds=1, progress=False)
    assert max(abs(e["decode"]) for e in errors) > 0.05


def test_timing_rounds_resume_from_the_cache_and_add_passes(tmp_path):
    shapes = _shapes()[:4]
    configs = {s: _config(s) for s in shapes}
    cache = tmp_path / "c.jsonl"
    first = _Spells({s: _law(s) for s in shapes}, [2.0])  # one slow pass of every shape
    assert measure(first, configs, cache, rounds=1, progress=False) == {s: Timing(2 * _law(s).decode, 2 * _law(s).prefill)
                                                                       for s in shapes}  # fmt: skip
    again = _Spells({s: _law(s) for s in shapes}, [1.0], keeps=False)
    assert measure(again, configs, cache, rounds=3, progress=False) == {s: _law(s) for s in shapes}
    assert again.calls == shapes * 2  # only the two passes the cache lacked
    assert len(again.prepared) == len(again.released) == 8  # not kept: made again for every run
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted((r["shape"], r["round"]) for r in rows) == sorted((s.key, r) for s in shapes for r in range(3))
    with pytest.raises(ConfigError):
        measure(again, configs, cache, rounds=0, progress=False)


class _Drifting(TableEngine):
    """The table, with the machine slowing down by half of its speed after every two timings."""

    def run(self, prepared: ArchShape, only=None) -> Timing:
        slow = 1 + 0.5 * (len(self.calls) // 2)
        timing = super().run(prepared)
        return Timing(timing.decode * slow, timing.prefill * slow)


def test_paired_timing_cancels_a_machine_that_slows_between_rounds():
    big, small = ArchShape(64, 8, 4, 2, 16, 192), ArchShape(64, 4, 2, 1, 16, 96)
    truth = _law(big).decode / _law(small).decode
    engine = _Drifting({s: _law(s) for s in (big, small)})
    (decode, prefill), ran = paired(engine, engine.prepare(_config(small)), engine.prepare(_config(big)), rounds=3)
    assert ran == 3
    assert decode == pytest.approx(truth, rel=1e-12) and prefill == pytest.approx(
        _law(big).prefill / _law(small).prefill, rel=1e-12)
    assert len(engine.calls) == 6 and engine.calls[:4] == [small, big, big, small]  # the order swaps every round
    # timed one after the other instead, the slowdown shows as a speedup that is not there
    engine = _Drifting({s: _law(s) for s in (big, small)})
    engine.calls.append(big)  # (so that the two timings fall into different spells)
    alone = engine.run(engine.prepare(_config(big))).decode / engine.run(engine.prepare(_config(small))).decode
    assert alone == pytest.approx(truth / 1.5)


def test_paired_timing_stops_once_the_rounds_decide_the_side_of_the_threshold():
    """Three rounds, the second slowed on the candidate's side: two rounds above a low threshold
    decide (the median of three is above it whatever the third says); against a threshold the slow
    round falls under, the third round decides, and the speedup is the median of the three."""
    big, small = ArchShape(64, 8, 4, 2, 16, 192), ArchShape(64, 4, 2, 1, 16, 96)
    truth = _law(big).decode / _law(small).decode
    table = {s: _law(s) for s in (big, small)}

    def run(threshold):
        engine = _Spells(table, [1.0, 1.0, 1.0, 1.5, 1.0, 1.0])  # round 2 runs the dense model first, then the shape
        result = paired(engine, small, big, rounds=3, only="decode", threshold=threshold * truth)
        return result, len(engine.calls)

    ((decode, _), ran), calls = run(0.5)
    assert (ran, calls) == (2, 4) and decode == pytest.approx(truth * (1 + 1 / 1.5) / 2)
    ((decode, _), ran), calls = run(0.9)
    assert (ran, calls) == (3, 6) and decode == pytest.approx(truth)
    ((decode, _), ran), calls = run(1.1)  # all under: decided after two
    assert (ran, calls) == (2, 4)


def test_one_check_corrects_a_shared_error_of_the_predictions(tmp_path):
    """A slow single timing of the dense model biases every predicted speedup; one paired check of
    any shape corrects the others, and the check is cached."""
    from secateur.plan.costs import CostBook

    shapes = [s for s in _shapes() if s.hidden == 64]
    dense, checked, other = ArchShape(64, 10, 4, 2, 16, 192), ArchShape(64, 6, 2, 1, 16, 128), ArchShape(64, 4, 4, 2, 16, 96)
    timings = {s: _law(s) for s in shapes}
    timings[dense] = Timing(timings[dense].decode * 1.1, timings[dense].prefill * 1.1)
    truth = _law(dense).decode / _law(other).decode
    engine = TableEngine({s: _law(s) for s in shapes})
    book = CostBook(engine, _config(dense), timings, tmp_path / "paired.jsonl", rounds=2)
    assert book.speedup(other)[0] / truth > 1.07  # the bias, before any check
    assert book.check(_config(checked))[0] == pytest.approx(_law(dense).decode / _law(checked).decode)
    assert book.speedup(other)[0] == pytest.approx(truth, rel=0.01)
    assert book.held_out_error(0) is None  # one check says nothing of the others' error
    again = CostBook(TableEngine({}), _config(dense), timings, tmp_path / "paired.jsonl", rounds=2)
    assert again.check(_config(checked)) == book.checked[checked]  # from the cache: the empty table is not asked
    book.close()


def test_widths_align_to_the_f16_step_of_llama_cpp_kernels():
    assert llamacpp_alignment({"avx2", "avx512f", "avx512fp16"}) == 128
    assert llamacpp_alignment({"avx2", "avx512f", "avx512_bf16"}) == 64
    assert llamacpp_alignment({"avx2", "fma"}) == 32 and llamacpp_alignment(set()) == 32


def test_checks_error_is_left_one_out_and_the_dense_model_is_prepared_once(tmp_path):
    """Three checked shapes whose measured speedups are 1.0, 1.1 and 1.2 times the predictions: the
    correction is the median, 1.1, and the error an unchecked shape may have is the worst of each
    check predicted from the other two: |1.2 / median(1.0, 1.1) - 1| = 1/7 (in-sample it would be
    1/11). The dense model is prepared once for all checks and freed by close()."""
    from secateur.plan.costs import CostBook

    shapes = [s for s in _shapes() if s.hidden == 64]
    dense = ArchShape(64, 10, 4, 2, 16, 192)
    checked = [ArchShape(64, 6, 2, 1, 16, 128), ArchShape(64, 4, 4, 2, 16, 96), ArchShape(64, 8, 2, 1, 16, 96)]
    table = {s: _law(s) for s in shapes}
    for shape, factor in zip(checked, (1.0, 1.1, 1.2)):  # a shape `factor` times faster than the law says
        table[shape] = Timing(_law(shape).decode / factor, _law(shape).prefill / factor)
    engine = _Spells(table, [1.0])
    book = CostBook(engine, _config(dense), {s: _law(s) for s in shapes}, None, rounds=1, metric=0)
    for shape, factor in zip(checked, (1.0, 1.1, 1.2)):
        assert book.check(_config(shape))[0] == pytest.approx(factor * book.predicted(shape)[0])
    assert book.correction[0] == pytest.approx(1.1)
    assert book.held_out_error(0) == pytest.approx(1 / 7)
    assert engine.prepared.count(dense) == 1 and dense not in engine.released
    book.close()
    assert engine.released.count(dense) == 1 and sorted(engine.released) == sorted([dense, *checked])


# --- whole plans on a tiny model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-block tiny Llama (the shared tiny models have 2 blocks: too few to plan depth) and its text."""
    root = tmp_path_factory.mktemp("plan")
    config = LlamaConfig(**{**COMMON, "num_hidden_layers": 4, "intermediate_size": 256}, **ATTN)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(tiny_text(12000))
    return root / "model", root / "text.txt"


def _table_for(model: Path, round_to: int = 8) -> TableEngine:
    """Every shape a tiny plan can produce, timed by the fake law (the proxy builds real models)."""
    from secateur.io import load_config
    from secateur.plan.costs import with_layers
    from secateur.plan.planner import block_shapes

    base = load_config(model)
    shapes = block_shapes(base, [Candidate(0, w, h, round_to, a) for w in (0.0, 0.25, 0.5) for h in (0.0, 0.25)
                                 for a in (None, 0.0, 0.5)])  # fmt: skip
    table = {}
    for cfg in shapes.values():
        if isinstance(cfg, str):
            continue
        for layers in range(1, 5):
            s = shape_of(with_layers(cfg, layers))
            table[s] = _law(s)
    return TableEngine(table)


def _flags(text: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4",
            "--eval-windows", "4", "--eval-seq-len", "32", "--depth", "0,0.25,0.5", "--width", "0:0.5:0.25",
            "--hidden", "0,0.25", *extra]  # fmt: skip


def _settings(text: Path, **extra: object) -> dict:
    return {"target": "decode-speedup=1.4", "calib": str(text), "calib_seq_len": 32, "calib_samples": 4,
            "eval_windows": 4, "eval_seq_len": 32, "depth": "0,0.25,0.5", "width": "0:0.5:0.25",
            "hidden": "0,0.25", "engine": "hf", "margin": 0.02, **extra}  # fmt: skip


def test_plan_meets_a_speed_target_and_its_recipe_runs(deep_model, tmp_path, monkeypatch):
    from secateur.plan import PlanConfig, plan
    from secateur.plan.planner import Row, boundary
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    engine = _table_for(model)
    record = plan(model, fill(PlanConfig, _settings(text)), tmp_path / "plan", engine=engine, progress=False)
    chosen = record["chosen"]
    dense = _law(shape_of(load(model)[0].config))
    truth = dense.decode / _law(ArchShape(**chosen["shape"])).decode
    # the winner was timed against dense in pairs, and meets the target with the margin
    assert chosen["measured"] and chosen["decode_speedup"] == pytest.approx(truth)
    assert truth >= 1.4 * 1.02 and record["costs"]["checks"][-1]["key"] == chosen["key"]
    rows = {r["key"]: r for r in record["candidates"]}
    scored = [r for r in rows.values() if r["kl"] is not None]
    assert 0 < len(scored) < len(rows)  # only the boundary of what meets the target is searched
    # the boundary: no feasible candidate of the same hidden fraction removes less of both kinds
    feasible = {k: Row(Candidate(r["blocks"], r["width"], r["hidden"], r["round_to"], r["attention"]), None, 0, 0,
                       feasible=True)
                for k, r in rows.items() if r["feasible"]}  # fmt: skip
    assert chosen["key"] in boundary(feasible)
    assert all(r["kl"] >= chosen["kl"] for r in scored if r["feasible"] and r["windows"] == chosen["windows"])
    for name in ("plan.toml", "front.md", "pareto.png", "plan.json"):
        assert (tmp_path / "plan" / name).stat().st_size > 0
    # the recipe runs as is, and the output has the chosen shape, so it meets the target in the engine
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(tmp_path / "pruned"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    pruned, _ = load(tmp_path / "pruned")
    assert shape_of(pruned.config) == ArchShape(**chosen["shape"])
    assert sum(p.numel() for p in pruned.parameters()) == chosen["params"]
    # a second plan reuses every cached score and timing: nothing is built or timed again
    calls = len(engine.calls)
    again = plan(model, fill(PlanConfig, _settings(text)), tmp_path / "again", engine=engine, progress=False)
    assert again["evaluations"] == 0 and again["chosen"]["key"] == chosen["key"] and len(engine.calls) == calls


def test_a_winner_that_misses_when_timed_is_replaced(deep_model, tmp_path, monkeypatch):
    """The cost model predicts the first winner's shape well above the target, but the engine runs
    it slower: the paired check rejects it and the plan goes on to one that meets the target."""
    from secateur.plan import PlanConfig, plan
    from secateur.schema import fill

    model, text = deep_model
    settings = fill(PlanConfig, _settings(text, holdout=0, tolerance=0.5))  # no held-out shape: only checks time it
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "first"))
    first = plan(model, settings, tmp_path / "p1", engine=_table_for(model), progress=False)
    winner = ArchShape(**first["chosen"]["shape"])
    engine = _table_for(model)
    engine.table[winner] = Timing(engine.table[winner].decode * 1.6, engine.table[winner].prefill)
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "second"))
    record = plan(model, settings, tmp_path / "p2", engine=engine, progress=False)
    dense = engine.table[shape_of(load(model)[0].config)]
    chosen = ArchShape(**record["chosen"]["shape"])
    assert chosen != winner and dense.decode / engine.table[chosen].decode >= 1.4 * 1.02
    rejected = [c for c in record["costs"]["checks"] if c["shape"] == winner.key]
    assert rejected and rejected[0]["measured"][0] < 1.4 < rejected[0]["predicted"][0] * 1.5
    assert not next(r for r in record["candidates"] if r["key"] == first["chosen"]["key"])["feasible"]


def test_an_exhaustive_plan_scores_every_candidate_and_draws_the_front(deep_model, tmp_path, monkeypatch):
    from secateur.plan import PlanConfig, plan
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    record = plan(model, fill(PlanConfig, _settings(text, exhaustive=True)), tmp_path / "plan",
                  engine=_table_for(model), progress=False)  # fmt: skip
    scored = [r for r in record["candidates"] if r["kl"] is not None]
    assert len(scored) == len(record["candidates"])  # rung 0 scores every candidate
    points = [(r["kl"], 1 / r["decode_speedup"]) for r in scored]
    assert sorted(record["front"]) == sorted(scored[i]["key"] for i in pareto_front(points))


def test_plan_for_a_parameter_target_from_the_command_line(deep_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    dense = sum(p.numel() for p in load(model)[0].parameters())
    target = int(dense * 0.7)
    assert main(["plan", str(model), "--target", f"params={target}", *_flags(text, tmp_path / "plan")]) == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert record["chosen"]["params"] <= target and record["costs"]["engine"] is None
    # widths aligned for llama.cpp's kernels on this machine by default (misaligned sizes run far slower)
    step = llamacpp_alignment()
    assert all(stage.get("round_to", step) == step for stage in record["stages"])
    assert record["chosen"]["shape"]["channels"] % step == 0 and record["chosen"]["shape"]["hidden"] % step == 0
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(tmp_path / "p"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    assert sum(p.numel() for p in load(tmp_path / "p")[0].parameters()) <= target
    assert "plan for --target params" in capsys.readouterr().out


@pytest.mark.parametrize("target, extra, message", [
    ("params=1", (), "no candidate of the grid meets"),
    ("params=1G", (), "already meets"),
    ("params=50%", (), "the value must be a number"),
    ("params=1k", ("--engine", "hf"), "--engine applies only with a speed, file or draft target"),
    ("params=1k", ("--threads", "2"), "--threads applies only with a speed or draft target timed in llama.cpp"),
    ("params=1k", ("--checks", "3"), "--checks applies only with --target draft"),
    ("draft", ("--exhaustive",), "--exhaustive applies only with a target to meet"),
    ("draft", ("--margin", "0.1"), "--margin applies only with a speed target"),
    ("draft", ("--draft-tokens", "0:2"), "every k (proposals per round) must be at least 1"),
    ("draft=2", (), "the draft target takes no value"),
    ("params=1k", ("--margin", "0.1"), "--margin applies only with a speed target"),
    ("params=1k", ("--timing-rounds", "2"), "--timing-rounds applies only with a speed target"),
    ("decode-speedup=1.5", ("--timing-rounds", "0"), "--timing-rounds must be at least 1"),
    ("decode-speedup=1.5", ("--engine", "hf", "--llama-cpp", "/nowhere"), "--llama-cpp applies only with a speed or draft target timed in llama.cpp"),
    ("decode-speedup=1.5", ("--llama-cpp", "/nowhere"), "llama-bench not found"),
    ("params=10k", ("--width", "0:1.5:0.5"), "every fraction must be in"),
    ("params=10k", ("--keep", "1"), "--keep must be in (0, 1)"),
    ("params=10k", ("--attention", "1.5"), "every fraction must be in"),
])  # fmt: skip
def test_bad_plans_fail_with_one_line_and_write_nothing(deep_model, tmp_path, monkeypatch, capsys, target, extra,
                                                       message):  # fmt: skip
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    refuses(["plan", str(model), "--target", target, *_flags(text, tmp_path / "plan"), *extra], capsys,
            tmp_path / "plan", message)  # fmt: skip


def refuses(argv: list[str], capsys, out: Path, message: str) -> None:
    """The command exits 2 with one error line, `message` in it (a progress bar of the model's loading
    may come first), and writes nothing at `out`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and err.count("secateur: error") == 1
    assert not out.exists()


def test_an_existing_output_is_refused_before_any_work(deep_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    (tmp_path / "plan").mkdir()
    assert main(["plan", str(model), "--target", "params=10k", *_flags(text, tmp_path / "plan")]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_candidates_that_prune_to_the_same_model_are_searched_once():
    """A hidden fraction that rounding takes back, and two widths rounded to the same multiple, give
    the same model at the same depth: the candidate asking to remove the least stays."""
    from secateur.plan.planner import _distinct

    full, narrow = ArchShape(64, 4, 4, 2, 16, 192), ArchShape(64, 4, 4, 2, 16, 128)
    configs = {Candidate(2, 0.3, 0.0, 64): _config(narrow), Candidate(2, 0.3, 0.125, 64): _config(narrow),
               Candidate(2, 0.32, 0.0, 64): _config(narrow), Candidate(1, 0.3, 0.0, 64): _config(narrow),
               Candidate(2, 0.1, 0.0, 64): _config(full)}  # fmt: skip
    kept, same = _distinct(configs)
    assert [c.key for c in kept] == ["d2-w0.3-h0", "d1-w0.3-h0", "d2-w0.1-h0"]
    assert same == {"d2-w0.3-h0.125": "d2-w0.3-h0", "d2-w0.32-h0": "d2-w0.3-h0"}


def test_a_plan_whose_grid_rounds_to_the_same_models_runs_each_once(deep_model, tmp_path, monkeypatch):
    """Aligned to 64 channels, the tiny model's hidden size (64) cannot shrink: every candidate with a
    hidden fraction is a model the grid already has. Size and speed targets plan without them."""
    from secateur.plan import PlanConfig, plan
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    target = int(sum(p.numel() for p in load(model)[0].parameters()) * 0.8)
    assert main(["plan", str(model), "--target", f"params={target}", "--round-to", "64",
                 *_flags(text, tmp_path / "plan")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    speed = plan(model, fill(PlanConfig, _settings(text, round_to=64, target="decode-speedup=1.2")), tmp_path / "speed",
                 engine=_table_for(model, round_to=64), progress=False)  # fmt: skip
    for record in (record, speed):
        assert record["same_shape"] and all(k.endswith("-h0.25") and v.endswith("-h0") for k, v in record["same_shape"].items())
        assert not set(record["same_shape"]) & {c["key"] for c in record["candidates"]}


def test_a_plan_searches_the_attention_split_and_its_recipe_keeps_it(deep_model, tmp_path, monkeypatch):
    """The tiny Llama has 2 key/value groups of 6,144 of a block's 61,440 parameters (an MLP channel:
    192). The default removes round(width x 2) groups, half up: one at widths 0.25 and 0.5, the same
    model as split 0.5; split 0 keeps both and takes 80 (0.25) or 160 (0.5) MLP channels instead of 48
    or 128: one new model per width and depth, with the same weight parameters."""
    from secateur.plan import PlanConfig, plan
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    target = int(sum(p.numel() for p in load(model)[0].parameters()) * 0.8)
    settings = _settings(text, target=f"params={target}", engine=None, margin=None, hidden="0", exhaustive=True,
                         attention="default,0,0.5", round_to=8)  # fmt: skip
    record = plan(model, fill(PlanConfig, settings), tmp_path / "plan", progress=False)
    rows = {r["key"]: r for r in record["candidates"]}
    for blocks, width in itertools.product((0, 1, 2), (0.25, 0.5)):
        default, split = f"d{blocks}-w{width}-h0", f"d{blocks}-w{width}-h0-a0"
        assert record["same_shape"][f"{default}-a0.5"] == default
        assert (rows[default]["shape"]["kv_heads"], rows[split]["shape"]["kv_heads"]) == (1, 2)
        assert rows[default]["shape"]["channels"] - rows[split]["shape"]["channels"] == {0.25: 32, 0.5: 32}[width]
        # the same weights; the biases that compensation adds differ: the default's attention biases
        # (q, k, v of one group and o: 128) and 32 more channels of gate and up biases
        assert rows[default]["params"] - rows[split]["params"] == (4 - blocks) * (128 + 2 * 32)
        assert rows[split]["kl"] is not None
    chosen = next(r for r in record["candidates"] if r["attention"] is not None and r["feasible"])
    (tmp_path / "split.toml").write_text(
        "\n".join(f"[[stage]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items())
                  for t in Candidate(chosen["blocks"], chosen["width"], chosen["hidden"], chosen["round_to"],
                                     chosen["attention"]).stages()))  # fmt: skip
    assert main(["prune", str(model), "--recipe", str(tmp_path / "split.toml"), "--out", str(tmp_path / "pruned"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    pruned, _ = load(tmp_path / "pruned")
    assert shape_of(pruned.config) == ArchShape(**chosen["shape"])


def test_a_split_search_is_refused_where_heads_are_not_pruned(model_dir, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    flags = ["--out", str(tmp_path / "plan"), "--calib", str(text_file), "--calib-seq-len", "32", "--calib-samples",
             "4", "--eval-windows", "4", "--eval-seq-len", "32", "--depth", "0", "--width", "0.25"]  # fmt: skip
    elsewhere = ["--out", str(tmp_path / "g"), *flags[2:]]
    neox = model_dir("gpt_neox")
    assert main(["plan", str(neox), "--target", "params=10k", *flags, "--attention", "default,0"]) == 2
    assert "heads are not pruned" in capsys.readouterr().err and not (tmp_path / "plan").exists()
    # without --attention (the default split only) it plans: MLP channels are the whole width
    target = int(sum(p.numel() for p in load(neox)[0].parameters()) * 0.95)
    assert main(["plan", str(neox), "--target", f"params={target}", *flags, "--round-to", "8"]) == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [c["key"] for c in record["candidates"]] == ["d0-w0.25-h0"]
    capsys.readouterr()
    # a family whose MLP width is not intermediate_size is refused in one line, not a traceback
    assert main(["plan", str(model_dir("gpt2")), "--target", "params=10k", *elsewhere]) == 2
    assert "describes decoders whose config gives intermediate_size" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_reconstructing_plan_scores_refitted_candidates_and_its_recipe_refits(deep_model, tmp_path, monkeypatch):
    from secateur.plan.proxy import Proxy
    from secateur.plan.space import Candidate

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model_path, text = deep_model
    dense = sum(p.numel() for p in load(model_path)[0].parameters())
    flags = _flags(text, tmp_path / "plan", "--hidden", "0", "--exhaustive", "--reconstruct")
    assert main(["plan", str(model_path), "--target", f"params={int(dense * 0.8)}", *flags]) == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    width_stages = [s for s in record["stages"] if s["method"] == "width"]
    assert width_stages and all(s["reconstruct"] is True for s in width_stages)
    assert record["seconds"]["builds"] > 0  # candidate builds are timed apart from their scoring
    scores = list((tmp_path / "cache" / "plan").glob("scores-*.jsonl"))
    assert len(scores) == 1  # a cache of its own: refitted scores are not those of plain slicing
    out = tmp_path / "p"
    assert main(["prune", str(model_path), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(out),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    manifest = json.loads((out / "secateur.json").read_text())
    refits = [r for h in manifest["history"] if h["kind"] == "width" for r in h["result"]["reconstruction"]]
    assert refits and all(r["error_after"] <= r["error_before"] for r in refits)
    # the proxy builds a refitted candidate: the same shapes as plain slicing, other weights
    model, tokenizer = load(model_path)
    ids = torch.randint(4, 100, (6, 32), generator=torch.Generator().manual_seed(0))
    proxy = Proxy(model, ids[:4], ids[4:], torch.device("cpu"))
    plain, refit = proxy.build(Candidate(0, 0.5, round_to=8)), proxy.build(Candidate(0, 0.5, round_to=8, reconstruct=True))
    assert plain.config.intermediate_size == refit.config.intermediate_size
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(plain.get_parameter(down), refit.get_parameter(down))


# --- mixtures of experts: depth x expert count -------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-block tiny Qwen3-MoE (8 routed experts, top-2) and its text."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("plan-moe")
    tiny_model("qwen3_moe", num_hidden_layers=4).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(tiny_text(12000))
    return root / "model", root / "text.txt"


def _moe_flags(text: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4",
            "--eval-windows", "4", "--eval-seq-len", "32", "--depth", "0,0.25,0.5", "--experts", "0:0.75:0.25",
            *extra]  # fmt: skip


def test_a_mixture_of_experts_is_planned_along_depth_and_expert_count_and_its_recipe_runs(moe_model, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = moe_model
    dense = sum(p.numel() for p in load(model)[0].parameters())
    target = int(dense * 0.75)
    assert main(["plan", str(model), "--target", f"params={target}", *_moe_flags(text, tmp_path / "plan")]) == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    keys = {r["key"] for r in record["candidates"]}
    # 8 experts: 0.25 and 0.5 remove 2 and 4; 0.75 removes 6, leaving the 2 of the top-2 (allowed)
    assert {"d0-w0-h0-e0.25", "d0-w0-h0-e0.5", "d0-w0-h0-e0.75", "d1-w0-h0", "d2-w0-h0-e0.5"} <= keys
    by_key = {r["key"]: r for r in record["candidates"]}
    assert by_key["d0-w0-h0-e0.5"]["kind"] == "experts" and by_key["d1-w0-h0-e0.25"]["kind"] == "depth + experts"
    assert by_key["d0-w0-h0-e0.5"]["shape"]["experts"] == 4 and by_key["d1-w0-h0"]["shape"]["experts"] == 8
    chosen = record["chosen"]
    assert chosen["params"] <= target and record["costs"]["engine"] is None
    assert [s["method"] for s in record["stages"]] == (["angular"] if chosen["blocks"] else []) + \
        (["experts"] if chosen["experts"] else [])
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(tmp_path / "p"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    assert sum(p.numel() for p in load(tmp_path / "p")[0].parameters()) == chosen["params"]  # counted exactly


@pytest.mark.parametrize("target, extra, message", [
    ("params=10k", ("--width", "0,0.5"), "--width applies to dense decoders; a mixture of experts (qwen3_moe) is "
                                         "planned along --depth and --experts"),
    ("params=10k", ("--hidden", "0", "--no-reconstruct"), "--hidden, --reconstruct apply to dense decoders"),
    ("decode-speedup=1.2", (), "secateur plan times dense decoders only"),
    ("params=10k", ("--experts", "0:1.5:0.5"), "every fraction must be in"),
])  # fmt: skip
def test_what_a_mixture_of_experts_plan_cannot_take_is_refused(moe_model, tmp_path, monkeypatch, capsys, target,
                                                              extra, message):  # fmt: skip
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = moe_model
    refuses(["plan", str(model), "--target", target, *_moe_flags(text, tmp_path / "plan"), *extra], capsys,
            tmp_path / "plan", message)  # fmt: skip


def test_experts_on_a_dense_model_is_refused(deep_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    assert main(["plan", str(model), "--target", "params=10k", *_flags(text, tmp_path / "plan"), "--experts", "0.5"]) == 2
    assert "--experts applies to mixtures of experts; llama has no routed experts" in capsys.readouterr().err


# --- --target draft ----------------------------------------------------------------------------------------------


def test_rounds_replay_greedy_speculative_decoding_by_hand():
    from secateur.plan.draft import best_round, rounds

    # k = 2 over 1101 1 0: [11 + own token] [1 + own token (past the end: the last one)]
    assert rounds("1101", 2) == 2
    assert rounds("0000", 4) == 4  # every proposal rejected: one token per round, as plain decoding
    assert rounds("1111", 4) == 1 and rounds("11111", 4) == 1  # 4 accepted + the original's own token
    assert rounds("111111", 2) == 2 and rounds("1110111", 3) == 2
    # 8 tokens, k = 1: 11|0|11|0|1 ... by hand: rounds 1 1 | 0 | 1 1 | 0 | 1 -> [1+t] [0->t] [1+t] [0->t] [1+t]
    assert rounds("11011011", 1) == 5
    # tokens / (rounds x (k c + v)): k = 1: 8 / (5 x 1.5); k = 2: "11011011" -> [11+t][11+t][1+t] = 3 rounds
    k, speedup = best_round(["11011011"], 0.5, {1: 1.0, 2: 1.0})
    assert rounds("11011011", 2) == 3 and (k, speedup) == (2, pytest.approx(8 / (3 * 2.0)))
    assert best_round(["0000"], 0.5, {1: 1.0, 3: 1.0})[0] == 1  # a draft that is always wrong proposes little


def test_round_costs_smooth_the_verification_and_learn_the_loops_overhead():
    from secateur.plan.draft import RoundCosts, line

    assert line({1: 1.0, 2: 2.0, 3: 3.0}) == pytest.approx({1: 1.0, 2: 2.0, 3: 3.0})
    assert line({1: 1.3, 2: 1.1, 3: 1.2}) == pytest.approx({1: 1.2, 2: 1.2, 3: 1.2})  # falling: flat, the mean
    assert line({1: 1.0, 3: 2.0, 5: 3.0}) == pytest.approx({1: 1.0, 3: 2.0, 5: 3.0}) and line({2: 1.5}) == {2: 1.5}
    costs = RoundCosts({1: 1.0, 2: 1.0})
    # a draft of cost 0.5 run with k = 1 gave 1.5 tokens per round at 0.5x: a round took 3 steps, 1.5 modelled
    costs.correct(1, 0.5, 1.5, 0.5)
    assert costs.overhead == pytest.approx(1.5) and costs.per_round == pytest.approx({1: 2.5, 2: 2.5})
    costs.correct(2, 0.5, 2.0, 2.0)  # faster than modelled: no negative overhead; the median of 1.5 and 0
    assert costs.implied == pytest.approx([1.5, 0.0]) and costs.overhead == pytest.approx(0.75)
    # with the overhead, longer rounds pay: "11111111" at cost 0.5: k = 1 -> 4 rounds, k = 2 -> 3 rounds
    assert costs.best(["11111111"], 0.5) == (2, pytest.approx(8 / (3 * (1.0 + 1.75))))


def test_speculative_speedup_by_hand():
    from secateur.plan.draft import parse_tokens, speculative_speedup

    # a = 0.5, k = 2: (1 - 0.125) / 0.5 = 1.75 tokens per round, for 2 x 0.25 + 1 = 1.5 steps
    assert speculative_speedup(0.5, 0.25, 2) == pytest.approx(1.75 / 1.5)
    assert speculative_speedup(0.5, 0.25, 2, verify=1.25) == pytest.approx(1.75 / 1.75)
    assert speculative_speedup(1.0, 0.1, 3) == pytest.approx(4 / 1.3)  # every proposal accepted: k + 1 tokens
    assert speculative_speedup(0.0, 0.0, 4) == pytest.approx(1.0)  # a free draft that is always wrong: plain decoding
    assert parse_tokens("1:3") == (1, 2, 3) and parse_tokens("4,2,2") == (2, 4)
    with pytest.raises(ValueError):
        speculative_speedup(1.2, 0.1, 1)
    assert parse_target("draft").draft and str(parse_target("draft")) == "draft"


def test_verification_costs_are_timed_on_the_dense_shape_per_k():
    from dataclasses import dataclass

    from secateur.plan.draft import verification_costs

    @dataclass
    class Probe:
        prompt: int = 128
        name: str = "probe"
        seen: tuple = ()

        def prepare(self, config):
            return self.prompt

        def run(self, prepared, only=None):
            return Timing(decode=float("nan"), prefill=0.01 * (1 + 0.25 * prepared))

        def release(self, prepared):
            pass

    assert verification_costs(Probe(), None, (1, 3), 0.01) == pytest.approx({1: 1.5, 3: 2.0})


def _draft_engine(model: Path):
    """The table's timings, with a prefill that grows with the prompt (what the verification costs
    read), named hf so that the chosen drafts run for real in transformers."""
    from dataclasses import dataclass

    @dataclass
    class DraftTable(TableEngine):
        name: str = "hf"
        prompt: int = 12
        new_tokens: int = 10
        repeats: int = 1

        def run(self, prepared, only=None):
            self.calls.append(prepared)
            decode = self.table[prepared].decode
            return Timing(decode=decode, prefill=decode * (1 + 0.1 * self.prompt))

    return DraftTable(_table_for(model).table)


def test_plan_finds_the_fastest_draft_and_runs_the_best_for_real(deep_model, tmp_path, monkeypatch, capsys):
    from secateur.plan import PlanConfig, plan
    from secateur.plan.draft import RoundCosts
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    settings = {k: v for k, v in _settings(text).items() if k != "margin"}
    config = fill(PlanConfig, {**settings, "target": "draft", "draft_tokens": "1:4", "checks": 2})
    engine = _draft_engine(model)
    record = plan(model, config, tmp_path / "plan", engine=engine, progress=False)
    verify = {int(k): v for k, v in record["costs"]["verify"].items()}
    assert verify == pytest.approx({k: 1 + 0.1 * (k + 1) for k in range(1, 5)})
    rows = [r for r in record["candidates"] if r.get("agree") is not None]
    assert rows and all(r["blocks"] or r["width"] for r in rows)  # the dense model is no draft
    checks = record["costs"]["checks"]
    assert len(checks) == 2 and checks[0]["overhead"] == 0  # the first pick: before any run corrected it
    top = max(r["windows"] for r in rows)
    first = RoundCosts(verify)
    best = max((r for r in rows if r["windows"] == top),
               key=lambda r: first.best(r["accept"], 1 / r["decode_speedup"])[1])  # fmt: skip
    assert checks[0]["key"] == best["key"] and checks[0]["draft_tokens"] == first.best(best["accept"], 1 / best["decode_speedup"])[0]
    final = RoundCosts(verify, overhead=record["costs"]["overhead"])
    for r in rows:  # every figure is the replay's, from the row's accepted proposals, its cost, the corrected rounds
        assert all(len(a) == 16 for a in r["accept"])  # half of each 32-token window: the dense continuation
        k, speedup = final.best(r["accept"], 1 / r["decode_speedup"])
        assert (r["draft_tokens"], r["draft_speedup"]) == (k, pytest.approx(speedup))
    assert all(c["identical"] and 0 <= c["acceptance"] <= 1 for c in checks)  # lossless, in transformers
    chosen = record["chosen"]
    assert chosen["check"]["speedup"] == max(c["speedup"] for c in checks)
    assert "as the speculative draft" in (tmp_path / "plan" / "plan.toml").read_text()
    assert "measured x" in (tmp_path / "plan" / "front.md").read_text()
    assert (tmp_path / "plan" / "pareto.png").stat().st_size > 0
    # the recipe prunes the chosen draft
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(tmp_path / "d"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    assert shape_of(load(tmp_path / "d")[0].config) == ArchShape(**chosen["shape"])


def test_the_replay_counts_the_rounds_of_the_real_speculative_loop(deep_model):
    """On the dense model's own greedy continuation, the draft's accepted proposals replayed give the
    number of verification forwards that `generate.speculative` makes, for every k."""
    import copy

    from secateur.depth.structure import remove_blocks
    from secateur.generate import speculative
    from secateur.models import adapter_for
    from secateur.plan.draft import accepted, continued, rounds

    model, _ = deep_model
    dense = load(model)[0].eval()
    draft = copy.deepcopy(dense)
    remove_blocks(draft, adapter_for(draft), [1, 2])
    prompt = torch.randint(4, 128, (20,), generator=torch.Generator().manual_seed(1))
    window = continued(dense, torch.cat([prompt, torch.zeros(24, dtype=torch.long)]), 24, torch.device("cpu"))
    with torch.no_grad():
        teacher = torch.log_softmax(dense(window[None]).logits[0], -1)
        student = draft(window[None]).logits[0]
    accepts = accepted(teacher[-25:-1], student[-25:-1])
    assert 0 < accepts.count("1") < 24  # the draft is right sometimes, wrong sometimes
    for k in (1, 2, 3, 5):
        real = speculative(dense, draft, prompt[None], 24, k)
        assert real.tokens == window[-24:].tolist()
        assert rounds(accepts[1:], k) == real.target_calls, k  # the first token comes from the prefill


def test_a_draft_plan_from_the_command_line_says_what_it_measured(deep_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = deep_model
    code = main(["plan", str(model), "--target", "draft", *_flags(text, tmp_path / "plan"), "--engine", "hf",
                 "--prompt", "12", "--new-tokens", "8", "--repeats", "1", "--timing-rounds", "1", "--holdout", "0",
                 "--draft-tokens", "1:2", "--checks", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    check = record["chosen"]["check"]
    assert f"measured {check['speedup']:.2f}x with {check['draft_tokens']} proposals per round" in out
    assert "output identical" in out and len(record["costs"]["checks"]) == 1
