"""Engine threads chosen by measurement (engine/threads.py): the candidates, the choice, the cache,
and a real calibration of the tiny model through the Batcher."""

from __future__ import annotations

import json
import os

import pytest

from engine import threads
from engine.threads import ChoiceCache, ThreadChoice, Workload


def test_candidates_use_half_the_cores_to_all_of_them_and_the_full_sweep_adds_the_rest():
    assert threads.candidates(2, "cpu", 16) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert threads.candidates(2, "cpu", 16, full=True) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert (4, 1) in threads.candidates(4, "cpu", 16) and (1, 1) not in threads.candidates(4, "cpu", 16)
    assert (1, 1) in threads.candidates(4, "cpu", 16, full=True)
    assert all(inter <= 2 for _intra, inter in threads.candidates(8, "cpu", 2))  # no more replicas than a batch
    assert threads.candidates(8, "cuda", 64) == [(0, 1), (0, 2)]


def test_the_choice_is_the_candidate_whose_worse_ratio_to_the_best_is_highest():
    measured = {
        "2x1": {"1": 30.0, "16": 80.0},  # best alone, poor at 16
        "1x2": {"1": 20.0, "16": 150.0},  # best at 16, poor alone
        "1x1": {"1": 29.0, "16": 145.0},  # close to the best at both
    }
    assert threads.best(measured) == "1x1"
    close = {"1x1": {"1": 29.0, "16": 140.0}, "1x2": {"1": 29.0, "16": 145.0}, "0x1": {"1": 29.5, "16": 146.0}}
    assert threads.best(close) == "0x1"
    assert threads.best(close, tie=0.05) == "1x1", "within 5%: the fewest threads and replicas"
    assert threads.ratios(measured, "1x1") == pytest.approx({"1": 29 / 30, "16": 145 / 150})


def test_explicit_settings_win_and_either_one_skips_the_measurement(tmp_path):
    cache = ChoiceCache(tmp_path)

    def never() -> ThreadChoice:
        raise AssertionError("measured although the settings name the threads")

    assert threads.resolve(2, 3, "k", cache, never) == ThreadChoice(2, 3, "settings")
    assert threads.resolve(1, None, "k", cache, never) == ThreadChoice(1, 1, "settings")
    assert threads.resolve(None, 2, "k", cache, never) == ThreadChoice(0, 2, "settings")
    assert threads.resolve(None, None, "k", cache, None) == ThreadChoice(0, 1, "default")  # tuning off, none cached


def test_a_calibration_is_cached_per_key_and_a_tuned_choice_is_read_back(tmp_path):
    cache = ChoiceCache(tmp_path)
    calls = []

    def calibrate() -> ThreadChoice:
        calls.append(1)
        return ThreadChoice(1, 2, "calibrated", {"1x2": {"1": 1.0}})

    assert threads.resolve(None, None, "machine A", cache, calibrate).inter_threads == 2
    assert threads.resolve(None, None, "machine A", cache, calibrate).source == "calibrated"
    assert len(calls) == 1, "the second worker read the cached choice"
    threads.resolve(None, None, "machine B", cache, calibrate)
    assert len(calls) == 2, "another key is measured again"
    cache.put("machine A", ThreadChoice(2, 1, "tuned"))  # what genqueue tune writes
    assert threads.resolve(None, None, "machine A", cache, calibrate) == ThreadChoice(2, 1, "tuned")
    assert threads.resolve(None, None, "machine A", cache, None).source == "tuned"  # read even with tuning off
    assert set(json.loads((tmp_path / "threads.json").read_text())) == {"machine A", "machine B"}


def test_an_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "threads.json").write_text("{not json")
    choice = threads.resolve(None, None, "k", ChoiceCache(tmp_path), lambda: ThreadChoice(1, 1, "calibrated"))
    assert choice.source == "calibrated"


def test_the_cache_key_names_the_weights_batch_size_and_device(tiny_dir):
    key = threads.cache_key(tiny_dir, "cpu", "int8", 16)
    assert key != threads.cache_key(tiny_dir, "cpu", "int8", 64)
    assert key != threads.cache_key(tiny_dir, "cpu", "float32", 16)
    weights = tiny_dir / "model.bin"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the model was prepared again
    try:
        assert threads.cache_key(tiny_dir, "cpu", "int8", 16) != key
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_worker_calibrates_the_real_model_once_and_then_reads_its_choice(tiny_dir, tmp_path, monkeypatch):
    workload = Workload(loads=(1, 4), tokens=8, max_batch_size=4)
    choice = threads.for_worker(tiny_dir, "cpu", None, workload, tmp_path)
    configs = threads.candidates(threads.available_cores(), "cpu", 4)
    assert choice.source == "calibrated"
    assert set(choice.measured) == {threads.label(c) for c in configs}
    assert all(rates["1"] > 0 and rates["4"] > 0 for rates in choice.measured.values())
    assert threads.label((choice.intra_threads, choice.inter_threads)) == threads.best(choice.measured, threads.TIE)

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("measured again although the choice is cached")

    monkeypatch.setattr(threads, "measure", no_measuring)
    assert threads.for_worker(tiny_dir, "cpu", None, workload, tmp_path) == choice
    assert threads.for_worker(tiny_dir, "cpu", None, workload, tmp_path, intra_threads=1).source == "settings"


def test_a_sweep_measures_again_only_the_candidates_near_the_best_and_keeps_the_fastest_run(monkeypatch):
    rates = {(1, 1): [30.0, 28.0], (1, 2): [29.0, 31.0], (2, 1): [10.0, 40.0]}  # per round, both loads alike
    measured: list[tuple] = []

    def fake_measure(_factory, config, workload):
        measured.append((config, workload.loads))
        value = rates[config][sum(1 for c, _ in measured if c == config) - 1]
        return {str(load): value * load for load in workload.loads}

    monkeypatch.setattr(threads, "measure", fake_measure)
    result = threads.sweep(None, list(rates), Workload(loads=(1, 16)), rounds=2, keep=0.8)
    assert [c for c, _ in measured].count((2, 1)) == 1, "a third of the best after round 1: not measured again"
    assert result["1x2"]["16"] == 31.0 * 16 and result["1x1"]["16"] == 30.0 * 16  # the faster of the runs
    alone = [c for c, loads in measured if 1 in loads]
    assert len(alone) == 3, "one job alone runs once per intra_threads value and round (2, then 1)"
    assert result["1x1"]["1"] == result["1x2"]["1"] == 31.0  # shared by the replica counts of intra 1
