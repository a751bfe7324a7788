"""Smoke tests of the scripts in benchmarks/: each runs in-process on tiny models."""

import importlib.util
import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
)


# Slow (about 100 s): the ordinary step's lack of conditionals is also checked by
# tests/test_schedule.py.
@pytest.mark.slow
def test_step_cost_smoke(tmp_path):
  results = _run_smoke(
      "step_cost", tmp_path, "--models", "resnet20", "--rounds", "2"
  )
  res = results["models"]["resnet20"]
  arms = res["arms"]
  assert set(arms) == {"dense_sgd", "static", "rigl", "rigl_update"}
  for name, row in arms.items():
    assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"]), name
    assert row["median_s"] > 0 and row["ratio_to_dense"] > 0, name
    assert row["opt_state_bytes_per_weight"] > 0, name
  # Only the update arm updates masks (every step after the first).
  assert arms["rigl_update"]["mask_updates_done"] >= 2
  assert arms["rigl"]["mask_updates_done"] == 0
  for name in ("static", "rigl", "rigl_update"):
    row = arms[name]
    # One byte per weight for the bool masks, one bit for the exploration record
    # (packbits rounds each leaf up to whole bytes).
    assert row["mask_bytes_per_sparse_weight"] <= 1.0, name
    assert row["mask_dtype"] == "bool", name
    padding = row["sparse_leaves"] / row["sparse_weights"]
    assert (
        row["mask_and_exploration_bytes_per_sparse_weight"] <= 1.125 + padding
    ), name
    assert abs(row["realised_sparsity"] - 0.9) < 0.01, name
  # Dense SGD keeps one momentum per weight; SparseOpt adds masks, exploration bits and
  # one cached float32 factor per neuron.
  dense = arms["dense_sgd"]["opt_state_bytes_per_weight"]
  assert 4.0 <= dense < 4.01
  static = arms["static"]
  assert static["opt_state_bytes_per_weight"] <= (
      dense + 1.125 + static["density_factor_bytes_per_weight"] + 0.01
  )
  # The host-scheduled ordinary step holds no conditional (the update variant, compiled
  # apart, has one per leaf and selection, to rank exact ties only where some must lose).
  for name in ("dense_sgd", "static", "rigl"):
    assert arms[name]["step_hlo"]["conditionals"] == 0, name
  summary = res["summary"]
  for key in (
      "static_ordinary_ratio",
      "rigl_ordinary_ratio",
      "rigl_update_ratio",
      "rigl_amortised_ratio",
      "tx_init_over_model_init",
      "compile_ratio_ordinary",
      "compile_ratio_update_variant",
  ):
    assert summary[key] > 0, key


def _load_benchmark_script(name):
  """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", os.path.join(BENCHMARKS, f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = (
      module  # dataclasses look their module up in sys.modules
  )
  try:
    spec.loader.exec_module(module)
  finally:
    sys.modules.pop(spec.name, None)
  return module


def _run_smoke(name, tmp_path, *extra):
  """Run benchmarks/<name>.py --smoke into tmp_path; check its PNG and machine record."""
  _load_benchmark_script(name).main([*extra, "--smoke", "--out", str(tmp_path)])
  with open(tmp_path / f"{name}.json") as f:
    results = json.load(f)
  assert (tmp_path / f"{name}.png").stat().st_size > 0
  for key in ("date", "platform", "cpu_count", "backend", "devices"):
    assert results["machine"][key]
  return results


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


# Slow (about 40 s): the correction's +0.5 slope is also checked by
# tests/test_train.py (the corrected skew metric) and tests/test_skew.py.
@pytest.mark.slow
def test_skew_benchmark_smoke(tmp_path):
  results = _run_smoke("skew", tmp_path)
  assert (
      results["config"]["model"] == "resnet20"
      and results["config"]["skew"] is None
  )
  assert (
      results["config"]["topology"] == "rigl"
      and results["config"]["sparsity"] == 0.9
  )
  layers = results["layers"]
  assert len(layers) >= 10 and set(layers) == set(results["sparse_layers"])
  assert not set(layers) & set(results["dense_leaves"])
  for path, row in layers.items():
    assert 0 < row["sparsity"] < 1, path
    for when in ("init", "trained"):
      for kind in ("raw", "corrected"):
        assert _finite(row[when][kind]), (path, when, kind)
        # The density correction adds exactly 0.5 to the slope.
        assert abs(row[when]["corrected"] - row[when]["raw"] - 0.5) < 1e-3, (
            path,
            when,
        )
      assert (
          len(row[when]["log_density"]) == len(row[when]["log_rms_raw"]) > 1
      ), path
  for key in ("init_raw", "init_corrected", "trained_raw", "trained_corrected"):
    assert _finite(results["mean"][key]), key
  assert (
      results["mean"]["init_raw"] < 0
  )  # BatchNorm after sparse convs skews the raw gradient
  assert set(results["stages"]) == {"stage1", "stage2", "stage3"}
  for stage in results["stages"].values():
    assert _finite(stage["init_raw"]) and _finite(stage["trained_corrected"])
  assert results["checks"]["corrected_minus_raw_minus_half_max_abs"] < 1e-3
  assert [t["step"] for t in results["trace"]] == [0, 2, 4]
  assert results[
      "mask_update_steps"
  ]  # the smoke run updates the masks at least once
  assert 0 < results["exploration"] <= 1 and _finite(
      results["train"]["final_loss"]
  )


# Slow (about 80 s): multi-device agreement is also checked by
# tests/test_train.py and tests/test_sharding.py.
@pytest.mark.slow
@pytest.mark.multi_device
def test_scaling_benchmark_smoke(tmp_path):
  results = _run_smoke("scaling", tmp_path)
  rows = results["rows"]
  assert [r["devices"] for r in rows] == [1, 2]
  for r in rows:
    assert r["global_batch"] == 2 * r["devices"]
    for key in ("step_s_median", "steps_per_s", "images_per_s", "compile_s"):
      assert _finite(r[key]) and r[key] > 0, (r["devices"], key)
  assert rows[0]["agreement"] is None
  agreement = rows[1]["agreement"]
  assert len(agreement["per_step"]) == results["args"]["check_steps"]
  first = agreement["first_step"]
  assert first["allclose"] and first["mask_entries_differing"] == 0
  assert (
      first["params_max_abs_diff"] < 1e-5
      and first["batch_stats_max_abs_diff"] < 1e-5
  )
  for st in agreement["per_step"]:
    for key in (
        "params_max_abs_diff",
        "batch_stats_max_abs_diff",
        "floor_params_max_abs_diff",
        "floor_batch_stats_max_abs_diff",
    ):
      assert _finite(st[key]), key
  assert results["agreement"] is True
  assert results["tolerance"] == {"rtol": 1e-4, "atol": 1e-5}
  # Rounding gives ~1e-4 of the step's update; per-shard BatchNorm statistics would give > 1.
  assert (
      first["params_update_rel_diff"] < 0.1
      and results["sharding_consistent"] is True
  )


# Slow (about 190 s): its arms run through the training program, which
# tests/test_train.py runs end to end.
@pytest.mark.slow
def test_convergence_smoke(tmp_path):
  convergence = _load_benchmark_script("convergence")
  result = convergence.main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "convergence_fashion_mnist_steps6.png").stat().st_size > 0
  saved = json.load(open(tmp_path / "convergence_fashion_mnist_steps6.json"))
  assert saved["rows"] == result["rows"]
  rows = {r["arm"]: r for r in result["rows"]}
  assert set(rows) == {"rigl90_base", "rigl90_density"}
  for row in rows.values():
    assert (
        row["seeds"] == 2
        and 0 <= row["acc_mean"] <= 100
        and _finite(row["acc_std"])
    )
    assert 0 < row["exploration"] <= 1
  corrected = rows["rigl90_density"]
  assert (
      _finite(corrected["delta_vs_base"])
      and "steps_to_base_final_ratio" in corrected
  )
  # A finished sweep is not run again: the second call only aggregates.
  done = (
      tmp_path
      / "convergence_runs"
      / "fashion_mnist_steps6"
      / "rigl90_base_seed0"
      / "done.json"
  )
  before = os.path.getmtime(done)
  convergence.main(["--smoke", "--out", str(tmp_path)])
  assert os.path.getmtime(done) == before


def test_premise_smoke(tmp_path):
  results = _run_smoke("premise", tmp_path)
  rows = results["rows"]
  assert [(r["batch_norm"], r["sparsity"]) for r in rows] == [
      (bn, s) for bn in (True, False) for s in (0.3, 0.5, 0.7, 0.8, 0.9)
  ]
  for r in rows:
    for key in (
        "ratio",
        "ratio_density",
        "ratio_sqrt_d",
        "ratio_out_layer",
        "theory",
        "paper",
    ):
      assert _finite(r[key]) and r[key] > 0, key
    assert len(r["per_seed_ratio"]) == results["config"]["seeds"] == 2
  bn = {r["sparsity"]: r for r in rows if r["batch_norm"]}
  # BatchNorm amplifies the sparse layer's gradient, more at higher sparsity,
  # and multiplying each neuron's gradient by sqrt(d_i) undoes it.
  assert bn[0.9]["ratio"] > bn[0.5]["ratio"] > 1.2
  assert abs(bn[0.9]["ratio_sqrt_d"] - 1) < 0.3
  assert set(results["bars"]) >= {"bn_within_15pct", "no_bn_within_0.9_1.15"}


@pytest.mark.slow  # four ViT runs through the training program: about 80 s of CPU
def test_vit_benchmark_smoke(tmp_path):
  vit = _load_benchmark_script("vit")
  result = vit.main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "vit.png").stat().st_size > 0
  saved = json.load(open(tmp_path / "vit.json"))
  assert saved["rows"] == result["rows"] and saved["machine"]["backend"]
  rows = {r["arm"]: r for r in result["rows"]}
  assert set(rows) == {"none", "layernorm"}
  for row in rows.values():
    assert row["seeds"] == 2 and 0 <= row["acc_mean"] <= 100
    assert _finite(row["transient_mean"]) and _finite(row["slope_head_raw"])
  corrected = rows["layernorm"]
  # Paired against the uncorrected arm (same seeds, data order, initial masks).
  assert _finite(corrected["delta_acc_mean"]) and _finite(
      corrected["delta_transient_mean"]
  )
  assert _finite(corrected["slope_head_corrected"])


@pytest.mark.slow  # a ViT's gradients and a RigL run: about 25 s of CPU
def test_layernorm_skew_benchmark_smoke(tmp_path):
  results = _run_smoke("layernorm_skew", tmp_path)
  r = results["variants"]["qknorm"]
  assert set(r["ln_leaves"]) == {
      f"block{i}/attn/{n}/kernel" for i in range(2) for n in ("query", "key")
  }
  assert r["corrections"] == ["none", "density", "layernorm"]
  for mode in r["corrections"]:
    assert _finite(r["layer_init"][mode]["slopes"]["pooled"]), mode
  # One RigL run in the smoke: one density per kernel, no within-kernel slope.
  assert r["layer_rigl"]["none"]["points"] and r["neuron_rigl"]["curves"]
  for when in ("init", "rigl"):
    assert _finite(r[f"neuron_{when}"]["slopes"]["pooled"]), when
  assert _finite(r["uniform_sweep"]["slopes"]["fc1"])
  assert _finite(r["head_init"]["layernorm"]["slope"])
  assert "Per head" in results["table"]


@pytest.mark.slow  # two runs of the training program: about 35 s of CPU
def test_main_job_records_both_runs_of_compare_sh(tmp_path):
  main_job = _load_benchmark_script("main_job")
  main_job.main(["--smoke", "--out", str(tmp_path), "--tag", "_t"])
  results = json.load(open(tmp_path / "main_job_t.json"))
  assert results["command"].startswith("bash scripts/compare.sh --steps 4")
  assert results["machine"]["cpu_count"] >= 1
  for arm in main_job.ARMS:
    assert results["final"][arm]["step"] == 4
    assert [s for s, _ in results["curve"][arm]] == [0, 2, 4]
    assert (tmp_path / f"{arm}_metrics_t.jsonl").exists()
  assert (tmp_path / "compare_t.png").read_bytes()[:4] == b"\x89PNG"
