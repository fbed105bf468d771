"""Honest speed: figures carry their spread across repeats; the busy-machine flag fires when the spread is large or
the load average exceeds the cores, and not otherwise; --threads; phase lines when stderr is not a terminal."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lowrank_compress.evaluate as ev
import lowrank_compress.threads as th
from lowrank_compress.cli import cli
from lowrank_compress.evaluate import (
    SPREAD_LIMIT,
    all_spreads,
    measure_speed,
    ratio_spread,
    relative_spread,
    speed_verdict,
)
from lowrank_compress.threads import choose_threads, idle_cores, other_busy_cores
from tests.test_calibration import tiny_llama


def test_relative_spread_is_the_range_over_the_median() -> None:
    assert relative_spread([1.0, 1.0, 1.0]) == 0.0
    assert relative_spread([0.9, 1.0, 1.3]) == pytest.approx(0.4)
    assert relative_spread([2.0, 4.0]) == pytest.approx(2.0 / 3.0)


@pytest.mark.parametrize(
    ("spreads", "load", "cores", "cpu", "reliable", "reason"),
    [
        ([0.02, 0.05, 0.1], 0.5, 2, True, True, None),
        ([0.02, SPREAD_LIMIT + 0.01], 0.5, 2, True, False, "repeats differ"),
        ([0.02, 0.05], 2.7, 2, True, False, "load average 2.70 exceeded the 2 cores"),
        ([0.02, 0.05], 2.7, 2, False, True, None),  # a GPU's timing does not wait for CPU cores
        ([0.02], None, 2, True, True, None),  # no load average on this platform
        ([], 0.1, 4, True, True, None),
    ],
)
def test_the_verdict_flags_large_spread_or_an_overloaded_machine(
    spreads, load, cores, cpu, reliable, reason
) -> None:
    v = speed_verdict(spreads, load, cores, cpu=cpu)
    assert v["reliable"] is reliable
    assert (reason is None and v["reasons"] == []) or any(reason in r for r in v["reasons"])
    assert v["max_spread"] == max(spreads, default=0.0) and v["cores"] == cores


def _scripted_speed(monkeypatch: pytest.MonkeyPatch, seconds: list[float], load: float) -> dict:
    """measure_speed of two tiny models whose every timing is taken, in turn, from `seconds`."""
    times = itertools.cycle(seconds)
    monkeypatch.setattr(ev, "_timed", lambda fn, device: next(times))
    monkeypatch.setattr(ev, "load_average", lambda: load)
    models = {"model": tiny_llama(seed=1), "baseline": tiny_llama(seed=2)}
    return measure_speed(models, seq_lens=(16,), decode_tokens=2, repeats=5)


def _verdict(speeds: dict, cores: int = 64) -> dict:
    pair = ratio_spread(speeds["model"], speeds["baseline"])
    return speed_verdict(all_spreads(list(speeds.values()), [pair]), speeds["model"].load_average, cores)


def test_steady_timings_are_reliable_and_noisy_ones_are_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    # each model times prefill then decode per repeat; warm-up takes the first 4 values
    steady = _scripted_speed(monkeypatch, [1.0, 1.02, 0.99, 1.01, 1.0, 1.03], load=0.2)
    m = steady["model"]
    assert len(m.prefill_seconds[16]) == len(m.decode_seconds) == 5
    assert m.spread()["prefill"]["16"] == pytest.approx(relative_spread(m.prefill_seconds[16]))
    assert m.prefill_tokens_per_s[16] == pytest.approx(16 / statistics.median(m.prefill_seconds[16]))
    assert _verdict(steady)["reliable"]

    noisy = _scripted_speed(monkeypatch, [1.0, 2.5, 1.1, 0.6, 1.9, 1.0, 3.0], load=0.2)
    verdict = _verdict(noisy)
    assert not verdict["reliable"] and verdict["max_spread"] > SPREAD_LIMIT

    busy = _scripted_speed(monkeypatch, [1.0, 1.02, 0.99, 1.01, 1.0, 1.03], load=80.0)
    assert not _verdict(busy)["reliable"]


def test_ratio_spread_comes_from_each_repeats_pair() -> None:
    a = ev.Speed({8: 1.0}, 1.0, prefill_seconds={8: [1.0, 1.0, 2.0]}, decode_seconds=[1.0, 1.0, 1.0])
    b = ev.Speed({8: 1.0}, 1.0, prefill_seconds={8: [2.0, 2.0, 4.0]}, decode_seconds=[1.0, 2.0, 1.5])
    spread = ratio_spread(a, b)
    assert spread["prefill"]["8"] == 0.0  # b took twice a's time in every repeat, however slow the repeat
    assert spread["decode"] == pytest.approx((2.0 - 1.0) / 1.5)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_lowered_with_a_warning_only_when_the_machine_is_busy(
    monkeypatch, restore_threads
) -> None:
    torch.set_num_threads(4)
    monkeypatch.setattr(ev, "machine_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    warnings: list[str] = []
    monkeypatch.setattr(th, "other_busy_cores", lambda: 0.3)
    assert choose_threads(None, warnings.append) == 4 and warnings == [] and torch.get_num_threads() == 4
    monkeypatch.setattr(th, "other_busy_cores", lambda: 2.8)
    assert choose_threads(None, warnings.append) == 1 == torch.get_num_threads()
    assert len(warnings) == 1 and "busy" in warnings[0] and "--threads" in warnings[0]
    assert choose_threads(3, warnings.append) == 3 == torch.get_num_threads() and len(warnings) == 1
    # an explicit OMP_NUM_THREADS is the user's choice: kept, busy or not
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, warnings.append) == 3 == torch.get_num_threads() and len(warnings) == 1


def test_busy_cores_count_other_processes_not_this_one() -> None:
    """The measure is what other processes use now: a child spinning on one core is one busy core; this process
    spinning is none (a command's own start-up is not "the machine is busy")."""
    import subprocess
    import sys
    import threading

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        other = other_busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert (
        other is not None and 0.6 <= other <= 1.5 + th.machine_cores_online()
    )  # the rest: whatever else runs
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        own = other_busy_cores(0.5)
    finally:
        stop.set()
        thread.join()
    assert own is not None and own < other - 0.5


def test_idle_cores() -> None:
    assert idle_cores(None, 8) is None
    assert idle_cores(0.1, 8) == 8 and idle_cores(5.8, 8) == 2 and idle_cores(30.0, 8) == 1


def test_threads_option_is_on_every_computing_command_and_checked() -> None:
    for command in ("analyze", "factorize", "evaluate", "sweep", "finetune"):
        res = CliRunner().invoke(cli, [command, "--help"])
        assert "--threads" in res.output, command
    res = CliRunner().invoke(cli, ["evaluate", "--threads", "0"])
    assert res.exit_code == 2


def test_evaluate_json_carries_spreads_and_the_verdict(tmp_path: Path, restore_threads) -> None:
    from tests.fixtures import tiny_llama as saved_llama

    model = saved_llama(tmp_path)
    args = ["evaluate", str(model), "--baseline", str(model), "--max-tokens", "200", "--window", "64"]
    res = CliRunner().invoke(cli, [*args, "--answers", "none", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["speed"]["threads"] == 1 and isinstance(data["speed"]["reliable"], bool)
    for m in data["models"]:
        assert set(m["speed_spread"]["prefill"]) == set(m["prefill_tokens_per_s"])
        assert m["speed_spread"]["decode"] >= 0
    assert set(data["ratios"]["speed_spread"]["prefill"]) == set(data["ratios"]["prefill_tokens_per_s"])


def test_phase_lines_appear_when_stderr_is_not_a_terminal(tmp_path: Path, restore_threads) -> None:
    """CliRunner's stderr is not a terminal: each phase ends with one line naming it, its count and its time."""
    from tests.fixtures import tiny_llama as saved_llama

    model = saved_llama(tmp_path)
    res = CliRunner().invoke(
        cli, ["evaluate", str(model), "--max-tokens", "200", "--window", "64", "--threads", "1"]
    )
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("evaluate: ")]
    phases = [x.split(": ", 1)[1].rsplit(" (", 1)[0] for x in lines]
    assert phases == ["perplexity (model)", "answers (model)", "speed"], res.stderr
    for line in lines:
        assert line.endswith(" s") and float(line.split()[-2]) >= 0
    assert "(1/1)" in lines[-1]


def test_factorize_and_analyze_print_one_line_per_phase_not_per_block(
    tmp_path: Path, restore_threads
) -> None:
    from tests.fixtures import tiny_llama as saved_llama

    model = saved_llama(tmp_path, num_layers=3)
    args = ["--samples", "4", "--seq-len", "64", "--grad-samples", "2", "--self-mix", "0", "--threads", "1"]
    res = CliRunner().invoke(cli, ["factorize", str(model), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("factorize: ")]
    phases = [x.split(": ", 1)[1].rsplit(" (", 1)[0] for x in lines]
    # (the loss-weighted fit: the gradient windows' forward pass and their backward pass first, then pass 1)
    assert phases == ["gradient windows", "gradients", "pass 1", "pass 2"], res.stderr
    assert all(line.endswith(" s") and "(3/3)" in line for line in lines)
    res = CliRunner().invoke(cli, ["analyze", str(model), "--threads", "1"])
    layers = [x for x in res.stderr.splitlines() if x.startswith("analyze: ")]
    assert len(layers) == 1 and layers[0].startswith("analyze: layers (")


def test_phase_lines_time_each_phase_from_the_previous_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase whose first progress report comes only at its end (sampling) still gets its whole time."""
    import time

    from lowrank_compress.cli import PhaseLines

    clock = iter([0.0, 7.0, 10.0, 12.5])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    phases = PhaseLines("factorize", lines.append)  # t = 0
    phases.update("sampling", 1, 1)  # first (and last) report of the phase
    phases.update("pass 1", 1, 3)  # t = 7: sampling ends
    phases.update("pass 1", 3, 3)
    phases.update("", 5, None)  # t = 10: pass 1 ends
    phases.close()  # t = 12.5
    assert lines == ["factorize: sampling (1/1) 7.0 s", "factorize: pass 1 (3/3) 3.0 s", "factorize 2.5 s"]


def test_finetune_prints_its_phases_and_report_renders_its_output(factorized: Path, tmp_path: Path) -> None:
    """A real finetune output: one line per phase (training once, not per step), then `report` on it."""
    from tests.fixtures import training_text

    data = tmp_path / "train.txt"
    data.write_text(training_text(12_000), encoding="utf-8")
    out = tmp_path / "ft"
    args = [
        "--data",
        str(data),
        "-o",
        str(out),
        "--steps",
        "3",
        "--seq-len",
        "64",
        "--rank",
        "2",
        "--threads",
        "1",
    ]
    res = CliRunner().invoke(cli, ["finetune", str(factorized), *args, "--eval-tokens", "512"])
    assert res.exit_code == 0, res.output
    phases = [
        x.split(": ", 1)[1].rsplit(" ", 2)[0] for x in res.stderr.splitlines() if x.startswith("finetune: ")
    ]
    assert phases == ["loading", "perplexity before", "answers before (2/2)", "training (3/3)", "perplexity after",
                      "answers after (2/2)"], res.stderr  # fmt: skip
    res = CliRunner().invoke(cli, ["report", str(out)])
    assert res.exit_code == 0, res.output
    tuned = json.loads((out / "finetune.json").read_text())
    md = (out / "report.md").read_text()
    p = tuned["perplexity"]
    assert f"{p['before']:.3f} -> {p['after']:.3f}" in md and (out / "loss.png").is_file()
