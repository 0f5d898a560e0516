"""Planning: make_plans on made-up fingerprints, plans.json round trip and validation, planners by name or
file, and ``autoseg plan`` end to end on the synthetic tasks.

Most tests replace the measurement of training steps (autoseg.plan.compute.measure_step) with a
deterministic model computed from FLOPs (approximated from the network's numbers in the unit tests, counted
on the meta device end to end), so the plans do not depend on how loaded the machine is;
``test_real_measurement_plans_a_tiny_dataset`` measures for real (and so does tests/test_cli.py).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_plan_rules import ANISO_Z, anisotropic, isotropic, make_fingerprint, planar

from autoseg.cli import run
from autoseg.device import DeviceInfo, detect_device
from autoseg.errors import UserError
from autoseg.nets import build_network, count_parameters
from autoseg.plan import budget as budget_module
from autoseg.plan import compute
from autoseg.plan import make as make_module
from autoseg.plan.budget import parse_duration, target_steps
from autoseg.plan.compute import MiB, StepMeasurement
from autoseg.plan.fit import JUDGE_DEPTH_MARGIN
from autoseg.plan.make import get_planner, make_plans
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans
from autoseg.workdir import PLANS_FILE

FLOPS_PER_S = 50e9
BYTES_PER_UNIT = 48  # per voxel x sample x base feature: memory proportional to the patch voxels
TEST_CPU = DeviceInfo("cpu", "test CPU", 8 << 30, 2, False)


def approximate_flops(cfg, in_ch, n_classes, ndim, patch, batch) -> float:
    """Conv FLOPs of a U-Net-like spec, forward + backward, from its numbers alone: a fast, deterministic
    stand-in for compute.count_step_flops (which runs the network on the meta device)."""
    voxels, channels, total = float(np.prod(patch)) * batch, in_ch, 0.0
    blocks = cfg.blocks_per_stage or [2] * cfg.n_stages
    for f, k, s, b in zip(cfg.features, cfg.kernel_sizes, cfg.strides, blocks):
        voxels /= float(np.prod(s))
        per_voxel = 2 * float(np.prod(k)) * (channels * f + (b - 1) * f * f + 2 * f * f)  # encoder + decoder
        total += per_voxel * voxels
        channels = f
    return 3 * total


def fake_measure(bf16_speedup: float = 1.0, bf16_noise: float = 0.1) -> Callable:
    """A stand-in for compute.measure_step: step time from exact FLOPs; memory: activations proportional to
    voxels plus weights, gradients and momentum (fp32), as the real measurement counts them."""

    def measure(cfg, in_ch, n_classes, ndim, patch, batch, device="cpu", precision="fp32", channels_last=False,
                steps=1, reference_grad=None, seed=0, second_batch=False, give_up_s=None):
        flops = compute.count_step_flops(cfg, in_ch, n_classes, ndim, patch, batch)
        seconds = flops / FLOPS_PER_S / (bf16_speedup if precision == "bf16" else 1.0) + 0.01
        with torch.device("meta"):
            params = count_parameters(build_network(cfg, in_ch, n_classes, ndim))
        memory = int(np.prod(patch)) * batch * cfg.features[0] * BYTES_PER_UNIT + 12 * params
        error = bf16_noise if precision == "bf16" else 0.0  # in units of the batch spread, which is 1
        return (StepMeasurement(seconds, memory, flops, precision, channels_last, 1.0, error, float(second_batch)),
                torch.ones(8))

    return measure


@pytest.fixture
def fake_compute(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Deterministic compute on a fixed 8 GiB CPU without bf16, FLOPs from the network's numbers; call it to
    change the device or the model."""

    def use(device: DeviceInfo = TEST_CPU, **measure_kw) -> None:
        monkeypatch.setattr(compute, "measure_step", fake_measure(**measure_kw))
        monkeypatch.setattr(compute, "count_step_flops", approximate_flops)
        monkeypatch.setattr(make_module, "detect_device", lambda requested=None: device)

    use()
    return use


def run_seconds(plans: Plans, name: str) -> float:
    runs = [r["seconds"] for r in plans.train_runs if r["configuration"] == name]
    return runs[0] if runs else plans.train_runs[0]["seconds"]


def voxels(cfg) -> int:
    return int(np.prod(cfg.patch_size)) * cfg.batch_size


# --- make_plans with deterministic compute ------------------------------------------------------------


def test_a_bigger_budget_buys_a_bigger_model_and_more_steps(fake_compute):
    """Every run gets at least MIN_STEPS (small classes are learned late); up to runs of ~47 minutes more time
    buys a bigger model, beyond that more steps too."""
    fp = isotropic((128, 128, 128))
    short, long = make_plans(fp, budget="10m", device="cpu"), make_plans(fp, budget="8h", device="cpu")
    longer = make_plans(fp, budget="40h", device="cpu")  # 10 runs of 3.6 h: past the floor
    assert len(short.train_runs) == 1 and len(long.train_runs) == 10
    for name in ("3d_fullres", "2d"):
        s, g = short.configurations[name], long.configurations[name]
        assert min(s.schedule.steps, g.schedule.steps) >= budget_module.MIN_STEPS
        assert longer.configurations[name].schedule.steps > 1.5 * budget_module.MIN_STEPS
        assert g.measured.gflops_per_step > s.measured.gflops_per_step
        assert g.network.features[0] >= s.network.features[0]
        assert g.network.features[0] > s.network.features[0] or voxels(g) > voxels(s)


def test_steps_times_step_time_fill_each_run(fake_compute):
    for budget in ("10m", "8h"):
        plans = make_plans(anisotropic(), budget=budget, device="cpu")
        for name, cfg in plans.configurations.items():
            planned = cfg.schedule.steps * cfg.measured.step_time_s
            assert planned == pytest.approx(run_seconds(plans, name), rel=0.02), (budget, name)
        assert sum(r["seconds"] for r in plans.train_runs) < parse_duration(budget)


def test_the_checkpoint_interval_is_a_share_of_each_run_within_bounds(fake_compute):
    """A kill loses at most 5 % of a run (12 s of a 4-minute run, 45 s of 15 minutes), at least 5 s apart and
    never more than 5 minutes (an 8-hour run)."""
    assert [budget_module.checkpoint_interval(s) for s in (30, 240, 900, 3600, 8 * 3600)] == [5.0, 12.0, 45.0,
                                                                                           180.0, 300.0]
    for budget in ("10m", "8h"):
        plans = make_plans(anisotropic(), budget=budget, device="cpu")
        for name, cfg in plans.configurations.items():
            assert cfg.schedule.checkpoint_every_s == budget_module.checkpoint_interval(run_seconds(plans, name))


def test_the_device_memory_limit_is_respected(fake_compute):
    fp = isotropic((128, 128, 128))
    roomy = make_plans(fp, budget="8h", device="cpu")
    fake_compute(DeviceInfo("cpu", "small", 64 * MiB, 2, False))
    tight = make_plans(fp, budget="8h", device="cpu")
    for name, cfg in tight.configurations.items():
        assert cfg.measured.peak_memory_mb * MiB <= 64 * MiB, name
        big = roomy.configurations[name]
        assert cfg.network.features[0] * voxels(cfg) < big.network.features[0] * voxels(big)


def test_anisotropic_plan_puts_the_coarse_axis_first_with_kernel_1_and_separate_z(fake_compute):
    plans = make_plans(anisotropic(coarse_axis=2), budget="10m", device="cpu")
    assert plans.axis_order == [2, 0, 1]
    full = plans.configurations["3d_fullres"]
    assert full.spacing[0] == pytest.approx(np.percentile(ANISO_Z, 10)) and full.spacing[1:] == [0.8, 0.8]
    assert full.network.kernel_sizes[0] == [1, 3, 3]
    assert full.resampling.separate_z and full.resampling.z_axis == 0
    assert plans.configurations["2d"].spacing == [0.8, 0.8]


def test_2d_data_gets_only_a_2d_configuration(fake_compute):
    plans = make_plans(planar(), budget="10m", device="cpu")
    assert list(plans.configurations) == ["2d"] and plans.axis_order == [0, 1]
    cfg = plans.configurations["2d"]
    assert cfg.ndim == 2 and len(cfg.patch_size) == 2 and all(len(k) == 2 for k in cfg.network.kernel_sizes)
    assert {r["configuration"] for r in plans.train_runs} == {"2d"}


def test_tiny_images_get_a_patch_clipped_to_the_image_and_a_bottleneck_of_4(fake_compute):
    plans = make_plans(isotropic((10, 12, 9)), budget="10m", device="cpu")
    for cfg in plans.configurations.values():
        divisor = np.prod(np.array(cfg.network.strides), axis=0)
        image = cfg.median_shape
        assert all(p <= -(-m // d) * d for p, m, d in zip(cfg.patch_size, image, divisor))  # image, rounded up
        assert all(p / d >= 4 or d == 1 for p, d in zip(cfg.patch_size, divisor))


def test_very_large_ct_plans_3d_lowres_with_ct_normalization(fake_compute):
    fp = make_fingerprint([(1.0, 0.8, 0.8)] * 5, [(400, 512, 512)] * 5, channels=("CT",))
    plans = make_plans(fp, budget="10m", device="cpu")
    assert set(plans.configurations) == {"3d_fullres", "3d_lowres", "2d"}
    full, low = plans.configurations["3d_fullres"], plans.configurations["3d_lowres"]
    assert low.lowres_of == "3d_fullres" and all(a > b for a, b in zip(low.spacing, full.spacing))
    assert np.prod(low.median_shape) < np.prod(full.median_shape)
    assert all(c.normalization[0].scheme == "ct" for c in plans.configurations.values())
    assert full.normalization[0].clip_high == fp.channels[0].percentile_99_5


def test_a_large_budget_trains_3d_lowres_too(fake_compute):
    fp = make_fingerprint([(1.0, 0.8, 0.8)] * 5, [(400, 512, 512)] * 5, channels=("CT",))
    small = {r["configuration"] for r in make_plans(fp, budget="10m", device="cpu").train_runs}
    large = {r["configuration"] for r in make_plans(fp, budget="8h", device="cpu").train_runs}
    assert small == {"3d_fullres"} and large == {"3d_fullres", "3d_lowres", "2d"}


@pytest.fixture
def measured_calls(fake_compute, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int], int]]:
    """The fake measurement, recording (ndim, patch, batch) of every step measured."""
    calls: list[tuple[int, list[int], int]] = []
    fake = fake_measure()

    def recording(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw):
        calls.append((ndim, list(patch), batch))
        return fake(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw)

    monkeypatch.setattr(compute, "measure_step", recording)
    return calls


def test_only_trained_configurations_are_measured_for_real(measured_calls):
    """Proxies predict the configurations the budget does not train; the trained one is measured as is, and
    the predicted memory counts the weights once, not per voxel."""
    plans = make_plans(isotropic((96, 96, 96)), budget="10m", device="cpu")
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert not full.measured.extrapolated and flat.measured.extrapolated
    assert [c[0] for c in measured_calls].count(2) == 1  # the 2d proxy only
    truth, _ = fake_measure()(flat.network, 1, 2, 2, flat.patch_size, flat.batch_size)
    assert flat.measured.peak_memory_mb == pytest.approx(truth.peak_memory_bytes / MiB, rel=0.02)


def test_a_second_plan_on_this_machine_reuses_its_step_measurements(measured_calls, monkeypatch, tmp_path):
    """Step times depend on the machine and the setup, not the data: a re-plan reads them back (same plans,
    no step run), ``remeasure`` runs them again, and a busy machine's measurements are not kept."""
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    fp = isotropic((96, 96, 96))
    first = make_plans(fp, budget="10m", device="cpu", measurements_dir=tmp_path)
    n = len(measured_calls)
    assert n >= 2 and first.measurements == {"reused": 0, "measured": n}
    assert (tmp_path / "measurements.json").is_file()
    again = make_plans(fp, budget="10m", device="cpu", measurements_dir=tmp_path)
    assert len(measured_calls) == n and again.measurements == {"reused": n, "measured": 0}
    assert again.configurations == first.configurations
    assert make_plans(fp, budget="10m", device="cpu", remeasure=True,
                      measurements_dir=tmp_path).measurements["measured"] == n
    assert len(measured_calls) == 2 * n
    from autoseg.plan import measurements

    monkeypatch.setattr(measurements, "_code_digest", lambda: "the networks' code changed")
    assert make_plans(fp, budget="10m", device="cpu",
                      measurements_dir=tmp_path).measurements == {"reused": 0, "measured": n}

    # other processes busy while each setup is timed (Linux: /proc/stat less this process's own CPU time):
    # used for this plan, not kept, said in the notes
    busy = iter(range(0, 10**9, 1000))
    monkeypatch.setattr(measurements, "_busy_seconds", lambda: float(next(busy)))
    loaded = make_plans(fp, budget="10m", device="cpu", measurements_dir=tmp_path / "busy")
    assert not (tmp_path / "busy" / "measurements.json").exists()
    assert loaded.notes[0].startswith("busy machine: other processes used")

    # where that cannot be read, the load average before and after the plan decides
    monkeypatch.setattr(measurements.os.path, "isfile", lambda path: False)
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    make_plans(fp, budget="10m", device="cpu", measurements_dir=tmp_path / "loadavg")
    assert not (tmp_path / "loadavg" / "measurements.json").exists()


def test_others_cpu_is_the_busy_time_less_this_process_own(monkeypatch):
    """2 CPUs, 1 s of wall clock: 1.5 CPU-seconds busy of which 1.2 this process's -> others used 15 %."""
    from autoseg.plan import measurements

    if not measurements.OthersCpu("cpu").on:
        pytest.skip("no /proc/stat here")
    clock = iter([10.0, 11.0])
    busy, own = iter([100.0, 101.5]), iter([5.0, 6.2])
    monkeypatch.setattr(measurements.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(measurements, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(measurements, "_own_seconds", lambda: next(own))
    monkeypatch.setattr(measurements.os, "cpu_count", lambda: 2)
    with measurements.OthersCpu("cpu") as probe:
        pass
    assert probe.share == pytest.approx(0.15)
    assert measurements.OthersCpu("cuda").on is False  # a GPU step's time is not the CPUs' to judge


def test_an_unreadable_measurement_store_only_means_measuring(measured_calls, monkeypatch, tmp_path):
    (tmp_path / "measurements.json").write_text("{not json")
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    plans = make_plans(isotropic((96, 96, 96)), budget="10m", device="cpu", measurements_dir=tmp_path)
    assert plans.measurements["reused"] == 0 and json.loads((tmp_path / "measurements.json").read_text())


def test_the_largest_setup_fitting_with_room_is_not_measured_for_real(measured_calls):
    """On a CPU a real step of the widest network at the ideal patch costs seconds and could only grow the
    batch: when the proxies predict it fits the time and half the memory, the planner keeps the prediction."""
    plans = make_plans(isotropic((24, 24, 24)), budget="8h", device="cpu")
    cfg = plans.configurations["3d_fullres"]
    assert cfg.network.features[0] == 32 and cfg.measured.extrapolated
    assert [c[0] for c in measured_calls].count(3) == 1  # the one proxy, no real step
    assert any("not measured for real" in n for n in plans.notes)


def test_the_choice_is_measured_at_half_a_batch_of_four_or_more_on_a_cpu(measured_calls):
    """Step time and activations grow linearly with the batch from 2 samples: half a batch of 4 or more is
    measured and scaled; a batch of 2 is measured as it is (batch 1 runs other, sometimes slower, kernels)."""
    plans = make_plans(isotropic((128, 128, 128)), budget="20m", device="cpu")
    cfg = plans.configurations["3d_fullres"]
    assert not cfg.measured.extrapolated
    real = [b for _, p, b in measured_calls if p == cfg.patch_size]
    assert real and real[-1] == (cfg.batch_size // 2 if cfg.batch_size >= 4 else cfg.batch_size)
    truth, _ = fake_measure()(cfg.network, 1, 2, 3, cfg.patch_size, cfg.batch_size)
    assert cfg.measured.step_time_s == pytest.approx(truth.step_time_s, rel=0.1)


def test_a_pessimistic_proxy_is_corrected_by_the_real_measurement(fake_compute, monkeypatch: pytest.MonkeyPatch):
    """Proxies 4x slower than the real steps (a busy moment, fixed overheads) would plan a setup far below
    what the device affords; the real measurement finds out and the search runs again for a bigger one."""
    from autoseg.plan import fit as fit_module

    fp = isotropic((128, 128, 128))
    honest = make_plans(fp, budget="20m", device="cpu").configurations["3d_fullres"]
    measure = fit_module.Throughput.measure

    def slow(self, *args, **kw):
        fps, per_unit, m = measure(self, *args, **kw)
        return fps / 4, per_unit, m

    monkeypatch.setattr(fit_module.Throughput, "measure", slow)
    plans = make_plans(fp, budget="20m", device="cpu")
    corrected = plans.configurations["3d_fullres"]
    assert any("searching again" in n for n in plans.notes)
    assert voxels(corrected) * corrected.network.features[0] >= 0.5 * voxels(honest) * honest.network.features[0]
    run_s = run_seconds(plans, "3d_fullres")
    assert corrected.measured.step_time_s <= 1.25 * run_s / target_steps(run_s)  # within the limit
    truth, _ = fake_measure()(corrected.network, 1, 2, 3, corrected.patch_size, corrected.batch_size)
    assert corrected.measured.step_time_s == pytest.approx(truth.step_time_s, rel=0.25)  # the correction holds
    monkeypatch.setattr(fit_module, "MAX_REAL_MEASUREMENTS", 1)
    uncorrected = make_plans(fp, budget="20m", device="cpu").configurations["3d_fullres"]
    assert voxels(uncorrected) * uncorrected.network.features[0] < voxels(corrected) * corrected.network.features[0]


def _slow_proxies(monkeypatch: pytest.MonkeyPatch, factor: float = 4.0) -> None:
    """Proxy steps ``factor`` x slower than the real ones (small patches are overhead-bound on a CPU)."""
    from autoseg.plan import fit as fit_module

    measure = fit_module.Throughput.measure

    def slow(self, *args, **kw):
        fps, per_unit, m = measure(self, *args, **kw)
        return fps / factor, per_unit, m

    monkeypatch.setattr(fit_module.Throughput, "measure", slow)


def test_a_narrow_choice_measured_fast_tries_a_wider_network_for_real(fake_compute, monkeypatch):
    """The square root of a pessimistic correction can keep the search narrow; carried in full, the wider
    network it chooses is measured before it is kept."""
    _slow_proxies(monkeypatch)
    plans = make_plans(isotropic((128, 128, 128)), budget="16m", device="cpu")
    c = plans.configurations["3d_fullres"]
    assert any("carried in full" in n for n in plans.notes)
    assert c.network.features[0] == 32 and not c.measured.extrapolated
    run_s = run_seconds(plans, "3d_fullres")
    assert c.measured.step_time_s <= 1.25 * run_s / target_steps(run_s)


def test_a_wider_network_that_overshoots_leaves_the_setup_measured_first(fake_compute, monkeypatch):
    _slow_proxies(monkeypatch)
    fake = fake_measure()

    def wide_is_slow(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw):
        m, g = fake(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw)
        if cfg.features[0] == 32 and np.prod(patch) > 24 ** 3:  # real steps, not proxies
            m.step_time_s *= 3
        return m, g

    monkeypatch.setattr(compute, "measure_step", wide_is_slow)
    plans = make_plans(isotropic((128, 128, 128)), budget="5m", device="cpu")
    c = plans.configurations["3d_fullres"]
    assert any("carried in full" in n for n in plans.notes)
    assert c.network.features[0] < 32 and not c.measured.extrapolated
    run_s = run_seconds(plans, "3d_fullres")
    assert c.measured.step_time_s <= 1.25 * run_s / target_steps(run_s)


def test_a_wider_network_whose_warm_up_is_over_the_limit_is_not_timed_further(fake_compute, monkeypatch):
    """With a measured setup to fall back on, the bold re-search's choice is measured with a bound: a warm-up
    over it (here every one) ends its measurement, and the setup measured first stands."""
    _slow_proxies(monkeypatch)
    fake, bounds = fake_measure(), []

    def over_the_bound(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw):
        m, g = fake(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw)
        if kw.get("give_up_s") is not None:
            bounds.append(kw["give_up_s"])
            m.step_time_s = 2 * kw["give_up_s"]
        return m, g

    monkeypatch.setattr(compute, "measure_step", over_the_bound)
    plans = make_plans(isotropic((128, 128, 128)), budget="5m", device="cpu")
    c = plans.configurations["3d_fullres"]
    run_s = run_seconds(plans, "3d_fullres")
    assert len(bounds) == 1 and bounds[0] > 1.25 * run_s / target_steps(run_s)  # only ever beyond the limit
    assert any("not timed further" in n for n in plans.notes)
    assert not c.measured.extrapolated and c.measured.step_time_s <= 1.25 * run_s / target_steps(run_s)


def test_a_measurement_gives_up_after_a_warm_up_over_its_bound_and_is_not_stored(monkeypatch, tmp_path):
    """Real steps of a tiny network: a warm-up slower than ``give_up_s`` ends the measurement (one step run,
    its time returned), and the store keeps only complete measurements."""
    from autoseg.plan import measurements
    from autoseg.schema.plans import Network

    net = Network("unet", [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], decoder_convs=1)
    steps: list[int] = []
    real = compute.build_network

    def counted(*args, **kw):
        model = real(*args, **kw)
        model.register_forward_hook(lambda *_: steps.append(1))
        return model

    monkeypatch.setattr(compute, "build_network", counted)
    m, _ = compute.measure_step(net, 1, 2, 3, [8, 8, 8], 2, steps=2, give_up_s=0.0)
    assert len(steps) == 1 and m.step_time_s > 0
    steps.clear()
    compute.measure_step(net, 1, 2, 3, [8, 8, 8], 2, steps=2, give_up_s=60.0)
    assert len(steps) >= 3  # warm-up and two timed steps
    store = measurements.Store(DeviceInfo("cpu", "test CPU", 8 << 30, 1, False), tmp_path)
    measurements.measure(store, net, 1, 2, 3, [8, 8, 8], 2, "cpu", "fp32", False, give_up_s=0.0)
    assert not store.new
    measurements.measure(store, net, 1, 2, 3, [8, 8, 8], 2, "cpu", "fp32", False)
    assert len(store.new) == 1


def test_a_busy_machine_is_named_in_the_plan_notes(fake_compute, monkeypatch: pytest.MonkeyPatch):
    from autoseg.plan import measurements

    assert not any(n.startswith("busy") for n in make_plans(planar(), budget="10m", device="cpu").notes)
    busy = iter(range(0, 10**9, 1000))  # other processes' CPU time piling up while each setup is timed
    monkeypatch.setattr(measurements, "_busy_seconds", lambda: float(next(busy)))
    assert make_plans(planar(), budget="10m", device="cpu").notes[0].startswith("busy machine: other processes")
    monkeypatch.setattr(measurements.os.path, "isfile", lambda path: False)  # no /proc/stat: the load average
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    notes = make_plans(planar(), budget="10m", device="cpu").notes
    assert any(n.startswith("busy machine: load average 64.0") for n in notes)
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not any(n.startswith("busy") for n in make_plans(planar(), budget="10m", device="cpu").notes)


def test_multichannel_plan_normalizes_each_channel(fake_compute):
    plans = make_plans(isotropic((64, 64, 64), channels=("CT", "T2")), budget="10m", device="cpu")
    assert plans.channel_names == ["CT", "T2"]
    for cfg in plans.configurations.values():
        assert [n.scheme for n in cfg.normalization] == ["ct", "zscore"]


def test_bf16_is_planned_only_when_measured_faster_and_accurate(fake_compute):
    bf16_cpu = DeviceInfo("cpu", "bf16 CPU", 8 << 30, 2, True)
    fake_compute(bf16_cpu, bf16_speedup=2.0)
    assert make_plans(planar(), budget="10m").configurations["2d"].precision == "bf16"
    fake_compute(bf16_cpu, bf16_speedup=2.0, bf16_noise=0.8)
    assert make_plans(planar(), budget="10m").configurations["2d"].precision == "fp32"
    fake_compute(bf16_cpu, bf16_speedup=1.05)
    assert make_plans(planar(), budget="10m").configurations["2d"].precision == "fp32"


@pytest.mark.parametrize("speedup, retimed", [(2.0, False), (1.15, True), (0.95, True), (0.8, False)])
def test_precisions_are_timed_again_only_when_close_to_the_deciding_speedup(fake_compute, monkeypatch, speedup,
                                                                            retimed):
    """One step each decides between fp32 and bf16 when bf16's speed-up is far from the one the choice hinges on
    (a second step costs 0.5-1.2 s a plan); near it, a noisy step could decide, so both are timed once more."""
    from autoseg.plan.fit import BF16_MIN_SPEEDUP
    from autoseg.plan.measurements import CLOSE_CALL

    bf16_cpu = DeviceInfo("cpu", "bf16 CPU", 8 << 30, 2, True)
    fake_compute(bf16_cpu)
    fake, calls = fake_measure(bf16_speedup=speedup), []

    def measure(cfg, in_ch, n_classes, ndim, patch, batch, device="cpu", precision="fp32", *args, **kw):
        calls.append((precision, kw.get("steps", 1), list(patch)))
        return fake(cfg, in_ch, n_classes, ndim, patch, batch, device, precision, *args, **kw)

    monkeypatch.setattr(compute, "measure_step", measure)
    plans = make_plans(planar(), budget="10m")
    assert plans.configurations["2d"].precision == ("bf16" if speedup > BF16_MIN_SPEEDUP else "fp32")
    assert (abs(np.log(speedup / BF16_MIN_SPEEDUP)) < np.log(CLOSE_CALL)) == retimed
    proxy = calls[0][2]
    timed = [c for c in calls if c[2] == proxy and c[1]]  # a judge of bf16 on the same patch is untimed
    assert timed == [("fp32", 1, proxy), ("bf16", 1, proxy)] * (2 if retimed else 1)


def test_bf16_is_judged_on_a_network_whose_bottleneck_is_not_degenerate(fake_compute, monkeypatch):
    """On the small proxy of a deep network the bottleneck holds 1-2 voxels, where instance norm makes any two
    precisions disagree (measured: cosine 0.32): the precision is judged on the shallower network the rules
    build for the proxy patch (3+ bottleneck voxels an axis), its error scaled up by the stage ratio, and bf16
    is planned when it agrees there."""
    bf16_cpu = DeviceInfo("cpu", "bf16 CPU", 8 << 30, 2, True)
    fake_compute(bf16_cpu, bf16_speedup=2.0)
    checked: list[int] = []  # bottleneck voxels of the patches the gradients are compared on
    fewest: list[int] = []  # fewest bottleneck voxels on an axis, of the patches compared
    stages: list[int] = []  # ... and the stages of the networks compared
    how: list[tuple[int, bool]] = []  # (timed steps, second batch) of each fp32 gradient comparison
    fake, noisy = fake_measure(bf16_speedup=2.0), fake_measure(bf16_speedup=2.0, bf16_noise=1.0)

    def measure(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw):
        divisor = np.prod(cfg.strides, axis=0)
        bottleneck = int(np.prod([p // d for p, d in zip(patch, divisor)]))
        if "second_batch" in kw:
            how.append((kw.get("steps", 1), kw["second_batch"]))
        if kw.get("reference_grad") is not None:
            checked.append(bottleneck)
            fewest.append(min(p // d for p, d in zip(patch, divisor)))
            stages.append(len(cfg.strides))
        return (noisy if bottleneck < 8 else fake)(cfg, in_ch, n_classes, ndim, patch, batch, *args, **kw)

    monkeypatch.setattr(compute, "measure_step", measure)
    plans = make_plans(isotropic((160, 160, 160)), budget="20m", device="cpu")
    assert plans.configurations["3d_fullres"].precision == "bf16"
    assert checked[0] < 8 and checked[1] >= 8  # the proxy's, then the judging network's
    assert fewest[1] >= 3  # 2 an axis still gave overflowing bf16 gradients on a real network
    assert stages[1] < stages[0]
    # the proxy is timed, without the second batch it cannot judge by; the judge is not timed
    assert how[0] == (1, False) and how[1] == (0, True)
    note = next(n for n in plans.notes if "the proxy's bottleneck is too small" in n)
    scale = JUDGE_DEPTH_MARGIN * stages[0] / stages[1]
    assert f"{0.1 * scale:.2f}x the batch-to-batch spread" in note and f"x{scale:.2f} for {stages[0]}" in note
    # an error that passes on the shallow network but not once scaled to the deep one refuses bf16
    fake_compute(bf16_cpu, bf16_speedup=2.0, bf16_noise=0.45)
    assert make_plans(isotropic((160, 160, 160)), budget="20m", device="cpu").configurations["3d_fullres"].precision \
        == "fp32"


def test_a_bf16_gradient_that_is_not_finite_refuses_bf16(fake_compute):
    bf16_cpu = DeviceInfo("cpu", "bf16 CPU", 8 << 30, 2, True)
    fake_compute(bf16_cpu, bf16_speedup=2.0, bf16_noise=float("nan"))
    plans = make_plans(planar(), budget="10m")
    assert plans.configurations["2d"].precision == "fp32"
    assert any("gradient error infx" in n for n in plans.notes)


def test_resenc_planner_uses_the_residual_encoder(fake_compute):
    plans = make_plans(isotropic((64, 64, 64)), planner="resenc", budget="10m", device="cpu")
    net = plans.configurations["3d_fullres"].network
    assert net.family == "resenc_unet" and net.blocks_per_stage[:3] == [1, 3, 4] and plans.planner == "resenc"


def test_non_positive_budget_is_a_user_error(fake_compute):
    for bad in (0, -60, "0m"):
        with pytest.raises(UserError, match="budget"):
            make_plans(planar(), budget=bad)


def test_timing_proxy_keeps_the_shape_of_an_anisotropic_patch():
    from autoseg.plan.fit import PROXY_VOXELS, FitRequest, Throughput

    req = FitRequest("unet", 3, [3.0, 0.8, 0.8], [30, 64, 64], [28, 64, 64], [16, 16, 16], 1, 2, 600.0, 900, 320)
    proxy = Throughput(TEST_CPU, req).proxy([28, 64, 64], [4, 16, 16])
    # every axis shrunk in turn (not 28x16x16: in-plane maps that small run at a fraction of the FLOP/s)
    assert proxy[0] < 28 and min(proxy[1:]) >= 32 and np.prod(proxy) <= PROXY_VOXELS[3]
    deep = Throughput(TEST_CPU, req).proxy([16, 128, 128], [8, 32, 32])
    assert np.prod([p // d for p, d in zip(deep, [8, 32, 32])]) >= 2  # 8x32x32 would leave 1x1x1: norm fails


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin against each other and a tiny
    step takes seconds instead of milliseconds (the path measured is the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_measurement_plans_a_tiny_dataset(one_thread):
    """The real path: training steps measured on this CPU, the plan fitted to what was measured."""
    fp = planar((32, 32))
    plans = make_plans(fp, budget="5m", device="cpu")
    cfg = plans.configurations["2d"]
    m = cfg.measured
    assert m.step_time_s > 0 and m.peak_memory_mb > 0 and m.parameters > 0 and m.gflops_per_step > 0
    assert cfg.schedule.steps * m.step_time_s == pytest.approx(run_seconds(plans, "2d"), rel=0.02)
    assert 0 < plans.planning_time_s < 60
    assert plans.device["type"] == "cpu" and plans.device["name"] == detect_device("cpu").name


# --- plans.json ------------------------------------------------------------------------------------------


@pytest.fixture
def plans_file(fake_compute, tmp_path: Path) -> Path:
    plans = make_plans(anisotropic(channels=("CT",)), budget="10m", device="cpu")
    plans.save(tmp_path / PLANS_FILE)
    return tmp_path / PLANS_FILE


def test_plans_json_round_trip_gives_an_equal_object(fake_compute, tmp_path: Path):
    for fp in (anisotropic(channels=("CT",)), planar(), isotropic((400, 256, 256), channels=("T1", "T2"))):
        plans = make_plans(fp, budget="1h", device="cpu")
        plans.save(tmp_path / PLANS_FILE)
        loaded = Plans.load(tmp_path / PLANS_FILE)
        assert loaded == plans
        assert loaded.to_dict() == plans.to_dict() == json.loads((tmp_path / PLANS_FILE).read_text())


def _cfg(d: dict) -> dict:
    return d["configurations"]["3d_fullres"]


BAD_EDITS: list[tuple[str, Callable[[dict], None], str]] = [
    ("unknown key", lambda d: _cfg(d).update(batchsize=4), r"configurations\.3d_fullres: unknown key\(s\) batchsize"),
    ("unknown nested key", lambda d: _cfg(d)["schedule"].update(epochs=5), r"3d_fullres\.schedule: unknown key\(s\) epochs"),
    ("unknown top-level key", lambda d: d.update(budget="8h"), r"unknown key\(s\) budget"),
    ("wrong type", lambda d: _cfg(d).update(batch_size="4"), r"3d_fullres\.batch_size: expected int"),
    ("wrong type float for int", lambda d: _cfg(d)["schedule"].update(steps=10.5), r"3d_fullres\.schedule\.steps: expected int"),
    ("wrong element type", lambda d: _cfg(d).update(patch_size=[8, "32", 32]), r"3d_fullres\.patch_size: expected list\[int\]"),
    ("wrong nested element", lambda d: _cfg(d)["network"].update(features=[32, "64"]), r"network\.features: expected list\[int\]"),
    ("object for a list", lambda d: _cfg(d).update(normalization=_cfg(d)["normalization"][0]), r"3d_fullres\.normalization: expected a list"),
    ("patch not divisible", lambda d: _cfg(d).update(patch_size=[p + 1 for p in _cfg(d)["patch_size"]]),
     r"3d_fullres\.patch_size: .* must be divisible by"),
    ("unknown family", lambda d: _cfg(d)["network"].update(family="transformer9000"), r"3d_fullres\.network\.family: unknown 'transformer9000'"),
    ("unknown normalization", lambda d: _cfg(d)["normalization"][0].update(scheme="minmax"), r"normalization\[0\]\.scheme: unknown 'minmax'"),
    ("unknown loss", lambda d: _cfg(d)["loss"].update(name="dice_cee"), r"3d_fullres\.loss\.name: unknown 'dice_cee'"),
    ("one norm per channel", lambda d: _cfg(d)["normalization"].append({"scheme": "zscore"}), r"normalization: expected one entry per input channel"),
    ("kernel length", lambda d: _cfg(d)["network"]["kernel_sizes"][0].append(3), r"network\.kernel_sizes: expected"),
    ("ndim mismatch", lambda d: _cfg(d).update(spacing=[1.0, 1.0]), r"3d_fullres\.spacing: expected 3 positive numbers"),
    ("batch below 1", lambda d: _cfg(d).update(batch_size=0), r"3d_fullres\.batch_size: must be >= 1"),
    ("unknown precision", lambda d: _cfg(d).update(precision="fp8"), r"3d_fullres\.precision"),
    ("missing key", lambda d: _cfg(d).pop("network"), r"3d_fullres: .*network"),
    ("wrong format_version", lambda d: d.update(format_version=99), r"format_version 99 is not supported"),
    ("not a plans file", lambda d: d.pop("artifact"), r"not a plans file"),
    ("no configurations", lambda d: d.update(configurations={}), r"'configurations' must be a non-empty object"),
]


@pytest.mark.parametrize("what, edit, message", BAD_EDITS, ids=[b[0] for b in BAD_EDITS])
def test_loading_rejects_a_bad_edit_naming_the_key(plans_file: Path, what: str, edit, message: str):
    d = json.loads(plans_file.read_text())
    edited = copy.deepcopy(d)
    edit(edited)
    plans_file.write_text(json.dumps(edited))
    with pytest.raises(UserError, match=message) as e:
        Plans.load(plans_file)
    assert str(e.value).startswith(str(plans_file)) and "\n" not in str(e.value)


def test_loading_accepts_a_sensible_edit(plans_file: Path):
    d = json.loads(plans_file.read_text())
    _cfg(d).update(batch_size=7)
    _cfg(d)["schedule"]["steps"] = 1234
    _cfg(d)["loss"]["name"] = "dice"
    plans_file.write_text(json.dumps(d, indent=1))
    cfg = Plans.load(plans_file).configurations["3d_fullres"]
    assert (cfg.batch_size, cfg.schedule.steps, cfg.loss.name) == (7, 1234, "dice")


def test_loading_a_missing_or_broken_file_says_what_to_do(tmp_path: Path):
    with pytest.raises(UserError, match="no plans here; run `autoseg plan"):
        Plans.load(tmp_path / PLANS_FILE)
    (tmp_path / PLANS_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Plans.load(tmp_path / PLANS_FILE)


# --- planners by name or file ------------------------------------------------------------------------------

USER_PLANNER = '''
"""A user's planner: the default rules, then a smaller learning rate."""
from autoseg.plan.registry import register_planner
from autoseg.planners.default import plan as default_plan


@register_planner("careful")
def careful(fingerprint, context):
    plans = default_plan(fingerprint, context)
    for cfg in plans.configurations.values():
        cfg.optimizer.lr = 1e-3
    plans.notes.append("planned by careful.py")
    return plans
'''


def test_a_planner_file_wraps_the_default_planner(fake_compute, tmp_path: Path):
    path = tmp_path / "careful.py"
    path.write_text(USER_PLANNER)
    for _ in range(2):  # loading the same file again (a second make_plans in one session) works too
        plans = make_plans(planar(), planner=str(path), budget="10m")
        assert plans.planner == str(path) and "planned by careful.py" in plans.notes
        assert plans.configurations["2d"].optimizer.lr == 1e-3


def test_a_planner_file_may_define_a_function_named_plan(fake_compute, tmp_path: Path):
    path = tmp_path / "plain.py"
    path.write_text("from autoseg.planners.resenc import plan as _resenc\n\n"
                    "def plan(fp, ctx):\n    return _resenc(fp, ctx)\n")
    plans = make_plans(planar(), planner=str(path), budget="10m")
    assert plans.configurations["2d"].network.family == "resenc_unet"


def test_planner_errors_name_the_planner(tmp_path: Path):
    with pytest.raises(UserError, match=r"unknown planner 'fancy' \(known: .*default.*resenc"):
        get_planner("fancy")
    with pytest.raises(UserError, match="planner file not found"):
        get_planner(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"empty\.py: defines no planner"):
        get_planner(str(tmp_path / "empty.py"))
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(UserError, match=r"broken\.py: the planner file failed to load \(ModuleNotFoundError"):
        get_planner(str(tmp_path / "broken.py"))


# --- `autoseg plan` end to end on the synthetic tasks ----------------------------------------------------

TASKS = ("ct-aniso", "mri-nested", "mr-2ch", "png-2d", "brats-like")
CASES = 3
PLAN_ARGS = ["--budget", "5m", "--device", "cpu", "-j", "1"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each synthetic task at tiny size, planned once by ``autoseg plan``: task -> (dataset, workdir).

    Steps are timed by the FLOPs model, not measured: on a loaded machine real measurement makes these
    tests slow and the rules they check do not depend on it (test_real_measurement_* and test_cli do)."""
    from autoseg.synth import generate

    root = tmp_path_factory.mktemp("tasks")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compute, "measure_step", fake_measure())
        for task in TASKS:
            data = generate(task, root / task, cases=CASES, size="tiny", seed=1)
            work = root / f"work_{task}"
            assert run(["-q", "plan", str(data), "-w", str(work), *PLAN_ARGS]) == 0
            out[task] = (data, work)
    return out


def copy_planned(planned, task: str, tmp_path: Path) -> tuple[Path, Path]:
    """The task's dataset and a copy of its planned workdir, to change without touching the shared one."""
    data, original = planned[task]
    shutil.copytree(original, tmp_path / "work")
    return data, tmp_path / "work"


def _plans(planned, task: str) -> Plans:
    return Plans.load(planned[task][1] / PLANS_FILE)


@pytest.mark.parametrize("task", TASKS)
def test_plan_writes_plans_and_the_preprocessed_cache(planned, task: str):
    data, work = planned[task]
    plans = _plans(planned, task)
    assert (work / "fingerprint.json").is_file() and plans.budget_s == 300 and plans.device["type"] == "cpu"
    case_ids = sorted(p.name[: -len("_0000" + plans.file_ending)] for p in (data / "imagesTr").glob("*_0000*"))
    assert len(case_ids) == CASES
    trained = {r["configuration"] for r in plans.train_runs}
    for name, cfg in plans.configurations.items():
        folder = work / "preprocessed" / name
        for case in case_ids:  # only what the budget trains; the others wait for `autoseg train --config`
            cached = (folder / f"{case}.npy").is_file() and (folder / f"{case}.json").is_file()
            assert cached == (name in trained), (name, case)
        assert cfg.schedule.steps * cfg.measured.step_time_s <= plans.budget_s
    assert plans.planning_time_s > 0


def test_ct_task_is_normalized_as_ct_with_the_fingerprint_percentiles(planned):
    plans = _plans(planned, "ct-aniso")
    fp = Fingerprint.load(planned["ct-aniso"][1] / "fingerprint.json")
    for cfg in plans.configurations.values():
        (n,) = cfg.normalization
        assert n.scheme == "ct" and (n.clip_low, n.clip_high) == (fp.channels[0].percentile_00_5,
                                                                   fp.channels[0].percentile_99_5)


def test_mri_tasks_are_zscored_per_channel(planned):
    assert [n.scheme for n in _plans(planned, "mri-nested").configurations["3d_fullres"].normalization] == ["zscore"]
    assert [n.scheme for n in _plans(planned, "mr-2ch").configurations["3d_fullres"].normalization] == ["zscore"] * 2


def test_anisotropic_ct_gets_kernel_1_on_the_coarse_axis(planned):
    plans = _plans(planned, "ct-aniso")
    full = plans.configurations["3d_fullres"]
    assert plans.axis_order[0] == int(np.argmax(Fingerprint.load(planned["ct-aniso"][1] / "fingerprint.json")
                                                .median_spacing))
    assert full.spacing[0] > 3 * full.spacing[1]
    assert full.network.kernel_sizes[0][0] == 1 and full.network.kernel_sizes[0][1:] == [3, 3]
    assert full.resampling.separate_z


def test_png_task_gets_a_2d_configuration_and_no_3d(planned):
    plans = _plans(planned, "png-2d")
    assert list(plans.configurations) == ["2d"] and plans.configurations["2d"].normalization[0].scheme == "rescale"


def test_rerun_keeps_an_edited_plans_json_and_replan_replaces_it(planned, tmp_path: Path, capsys,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compute, "measure_step", fake_measure())
    data, work = copy_planned(planned, "png-2d", tmp_path)
    d = json.loads((work / PLANS_FILE).read_text())
    d["configurations"]["2d"]["batch_size"] = 3
    d["configurations"]["2d"]["schedule"]["steps"] = 12345
    (work / PLANS_FILE).write_text(json.dumps(d, indent=2))
    args = ["plan", str(data), "-w", str(work), *PLAN_ARGS]
    capsys.readouterr()
    assert run(["-q", *args]) == 0
    assert "kept existing plans.json" in capsys.readouterr().out
    kept = Plans.load(work / PLANS_FILE).configurations["2d"]
    assert (kept.batch_size, kept.schedule.steps) == (3, 12345)
    assert run(["-q", *args, "--replan"]) == 0
    assert "kept existing" not in capsys.readouterr().out
    assert Plans.load(work / PLANS_FILE).configurations["2d"].schedule.steps != 12345


def test_a_new_number_of_folds_replans_and_none_keeps_the_plan(planned, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compute, "measure_step", fake_measure())
    data, work = copy_planned(planned, "png-2d", tmp_path)
    args = ["-q", "plan", str(data), "-w", str(work), *PLAN_ARGS]
    assert run([*args, "--folds", "3"]) == 0
    assert Plans.load(work / PLANS_FILE).folds == 3
    capsys.readouterr()
    assert run(args) == 0
    assert "kept existing plans.json" in capsys.readouterr().out and Plans.load(work / PLANS_FILE).folds == 3


def test_rerun_with_a_broken_edit_is_one_clear_error(planned, tmp_path: Path, capsys):
    data, work = copy_planned(planned, "png-2d", tmp_path)
    d = json.loads((work / PLANS_FILE).read_text())
    d["configurations"]["2d"]["patch_size"] = [63, 64]
    (work / PLANS_FILE).write_text(json.dumps(d))
    assert run(["-q", "plan", str(data), "-w", str(work), *PLAN_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoseg: error: ") and "configurations.2d.patch_size" in err and len(err.splitlines()) == 1


def test_train_preprocesses_a_configuration_plan_left_for_later(planned, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    from autoseg.workflow import ensure_preprocessed

    data, work = copy_planned(planned, "mri-nested", tmp_path)
    plans = _plans(planned, "mri-nested")
    assert not (work / "preprocessed" / "2d").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the ranks must not preprocess into one folder
    with pytest.raises(UserError, match="--preprocess 2d"):
        ensure_preprocessed(data, work, plans, ["2d"])
    monkeypatch.delenv("WORLD_SIZE")
    assert ensure_preprocessed(data, work, plans, ["2d"]) == {"2d": CASES}
    assert len(list((work / "preprocessed" / "2d").glob("*.json"))) == CASES
    assert ensure_preprocessed(data, work, plans, ["2d", "3d_fullres"]) == {"2d": 0, "3d_fullres": 0}


def test_a_region_dataset_plans_one_sigmoid_output_per_region(planned):
    """dataset.json's regions decide, no flag: dice_bce, no background output, the paint order in plans.json,
    oversampling weights for every label value (so the smallest region's voxels are centred on too)."""
    plans = _plans(planned, "brats-like")
    assert plans.regions == [(1, 2, 3), (2, 3), (3,)] and plans.num_classes == 3
    assert plans.regions_class_order == [1, 2, 3]
    assert list(plans.scored_classes.values()) == ["whole tumour", "tumour core", "enhancing tumour"]
    for cfg in plans.configurations.values():
        assert cfg.loss.name == "dice_bce" and cfg.optimizer.name == "sgd"  # sigmoid outputs: not AdamW
        assert set(cfg.sampling.class_weights) == {"1", "2", "3"}
    assert any(n.startswith("regions: one sigmoid output per region") for n in plans.notes)
    assert Plans.load(planned["brats-like"][1] / PLANS_FILE) == plans  # it reads back


@pytest.fixture(scope="module")
def store_setting_at_module_setup() -> str | None:
    return os.environ.get("AUTOSEG_CACHE_DIR")


def test_fixtures_of_any_scope_plan_without_the_users_measurement_store(store_setting_at_module_setup):
    """A module-scoped fixture runs before function-scoped ones: it too must find the store switched off, or
    the stand-in measurements of the tests end up in ~/.cache/autoseg for real plans to read back."""
    assert store_setting_at_module_setup == "off"
