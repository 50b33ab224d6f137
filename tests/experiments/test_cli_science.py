"""The science commands (``estimators``, ``explosion``) end to end in a subprocess on tiny data,
and the models they use."""

import csv

import numpy as np
import pytest
import torch

from ewc_fast import estimate_importance
from ewc_fast.experiments.models import build_model

from .test_cli import TINY, _has_plots, _json, _run, idx_data  # noqa: F401 - idx_data is a fixture


@pytest.mark.parametrize("name", ["mlp400", "kutalev-cnn", "kutalev-cnn-code", "attention"])
def test_new_models_shapes_and_exact_importance(name):
    torch.manual_seed(0)
    m = build_model(name, n_out=4).eval()
    x, y = torch.rand(3, 784), torch.tensor([0, 3, 1])
    assert m(x).shape == (3, 4)
    imp = estimate_importance(m, [(x, y)], methods=("fisher",), progress=False)["fisher"]
    assert not imp.meta.get("fallback")  # every parameter served by a per-layer rule
    # the empirical Fisher is the mean of per-sample squared gradients: check against autograd
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(3):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in m.named_parameters():
            ref[n] += p.grad**2 / 3
    for n in ref:
        # fp32 per-sample gradients by two routes; 1e-5 relative to the tensor's largest entry
        torch.testing.assert_close(imp[n], ref[n], rtol=1e-4, atol=1e-5 * float(ref[n].abs().max()))


@pytest.fixture(scope="module")
def est_out(tmp_path_factory, idx_data):  # noqa: F811
    out = tmp_path_factory.mktemp("est")
    _run(
        "estimators",
        "--out",
        out,
        "--iterations",
        "6",
        "--lam-grid",
        "1,1e6",
        "--runs",
        "2",
        "--model",
        "small-mlp",
        "--estimators",
        "EXACT,BATCHED",
        *TINY,
        *idx_data,
    )
    return out


def test_estimators(est_out, idx_data):  # noqa: F811
    out = est_out
    res = _json(out / "estimators.json")
    assert res["meta"]["command"].startswith("ewc-fast estimators") and res["meta"]["n_train"] == 300
    assert set(res["estimators"]) == {"EXACT", "BATCHED"}
    none_acc = [r["final_mean_acc"] for r in res["none"]["runs"]]
    for v in res["estimators"].values():
        assert v["best_lam"] in (1.0, 1e6)
        assert len(v["runs"]) == 2 and [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            assert len(r["R"]) == 5 and all(0 <= a <= 1 for row in r["R"] for a in row)
            assert len(r["importance_times_s"]) == 4  # one consolidation after each task but the last
        assert v["grid"]["1e+06"]["summary"]["n_runs"] == 1
        s = v["summary"]
        assert s["acc_min"] <= s["acc_mean"] <= s["acc_max"]
    assert res["estimators"]["BATCHED"]["summary"]["time_vs_batched"] == 1.0
    # λ = 1e6 pins the weights: its run differs from no EWC (the penalty acts)
    big = res["estimators"]["EXACT"]["grid"]["1e+06"]["summary"]["acc_mean"]
    assert big != pytest.approx(none_acc[0], abs=1e-9)
    with open(out / "estimators.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (1 + 2) + 1
    if _has_plots():
        assert (out / "estimators.png").exists()
    proc = _run("estimators", "--out", out, "--runs", "1", "--grid-runs", "2", *TINY, *idx_data, check=False)
    assert proc.returncode != 0 and "grid_runs" in proc.stderr


@pytest.fixture(scope="module")
def exp_out(tmp_path_factory, idx_data):  # noqa: F811
    out = tmp_path_factory.mktemp("ex")
    _run(
        "explosion",
        "--out",
        out,
        "--models",
        "small-mlp,attention",
        "--values",
        "0.5,50",
        "--steps",
        "25",
        "--eval-every",
        "5",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    return out


def test_explosion(exp_out):
    """Plain SGD + EWC diverges above α·λ·max Ω = 2 (here 50, within 25 steps) and not at 0.5;
    clipping and the stabilised penalty never diverge."""
    out = exp_out
    res = _json(out / "explosion.json")
    assert set(res["models"]) == {"small-mlp", "attention"}
    for m in res["models"].values():
        assert m["max_omega"] > 0
        assert m["thresholds"] == {
            "plain": {"first_diverged": 50.0, "last_stable": 0.5},
            "clip": {"first_diverged": None, "last_stable": 50.0},
            "stabilized": {"first_diverged": None, "last_stable": 50.0},
        }
        for r in m["runs"]:
            assert r["lam"] == pytest.approx(r["value"] / (0.05 * m["max_omega"]))
            if r["diverged"]:
                assert r["final_acc_A"] is None and r["diverged_at"] == len(r["step"]) <= 25
            else:
                assert len(r["step"]) == 25 and r["eval"][-1]["step"] == 25
                assert 0.0 <= r["final_acc_B"] <= 1.0
            if r["variant"] == "clip" and r["value"] == 50.0:  # the pre-clipping norm: above the clip of 1
                assert max(r["grad_norm"]) > 1.0
    with open(out / "explosion.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3 * 2
    if _has_plots():
        assert (out / "explosion.png").exists()


def test_results_md_sections_from_the_command_outputs(tmp_path, est_out, exp_out):
    """``reproduce --render-only`` renders the science sections from the commands' own JSON files."""
    import shutil

    res_dir = tmp_path / "results"
    shutil.copytree(est_out, res_dir / "estimators")
    shutil.copytree(exp_out, res_dir / "explosion")
    _run("reproduce", "--render-only", "--out", tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    est = _json(est_out / "estimators.json")
    ex = _json(exp_out / "explosion.json")
    assert "## 5. Which Fisher for EWC: van de Ven 2025 (arXiv 2502.11756)" in text
    s = est["estimators"]["EXACT"]["summary"]
    assert f"| EXACT (`fisher_exact`) | {est['estimators']['EXACT']['best_lam']:g} | {100 * s['acc_mean']:.2f} " in text
    assert "| 99.12 |" in text and "| 85.41 |" in text  # their numbers beside ours
    assert "## 6. The EWC step explosion under plain SGD" in text
    m = ex["models"]["attention"]
    assert f"| attention | {m['n_params']} | {m['max_omega']:.4g} | plain | 50.0 | 0.5 |" in text
    assert "results/explosion/explosion.png" in text and "the brief" not in text


def test_correlate_seeds_batched_fisher_latest_anchor(tmp_path, idx_data):  # noqa: F811
    out = tmp_path / "co"
    _run(
        "correlate",
        "--out",
        out,
        "--tasks",
        "2",
        "--epochs",
        "1",
        "--model",
        "small-mlp",
        "--runs",
        "2",
        "--batched-fisher",
        "--anchor",
        "latest",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    res = _json(out / "correlations.json")
    assert {"FISB-MAS", "FISB-MAS²", "FISB-FIS", "FIS-MAS²"} <= set(res["pairs"])
    assert res["seeds"] == [0, 1] and res["config"]["anchor"] == "latest"
    per = {(r["stage"], r["param"], r["pair"]): [] for r in res["rows"]}
    for run in res["per_seed"]:
        for r in run["rows"]:
            per[(r["stage"], r["param"], r["pair"])].append(r["pearson"])
    for r in res["rows"]:
        v = per[(r["stage"], r["param"], r["pair"])]
        assert r["n_seeds"] == 2
        if all(np.isfinite(v)):
            assert (
                r["pearson"] == pytest.approx(np.mean(v)) and r["pearson_min"] == min(v) and r["pearson_max"] == max(v)
            )
    if _has_plots():
        assert (out / "correlation_heatmap_pearson.png").exists()
