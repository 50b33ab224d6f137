"""RESULTS.md sections of ewc_fast.experiments.reproduce.science from given result files: every
number shown is the one in the file (means, bands at 90 %, thresholds), sections absent without files."""

import json

import pytest

from ewc_fast.experiments.reproduce.science import render_science


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _curve(acc_runs):
    n = len(acc_runs[0])
    return {
        "acc": [sum(r[i] for r in acc_runs) / len(acc_runs) for i in range(n)],
        "acc_min": [min(r[i] for r in acc_runs) for i in range(n)],
        "acc_max": [max(r[i] for r in acc_runs) for i in range(n)],
        "acc_runs": acc_runs,
        "loss": [0.0] * n,
        "removed": [0] * n,
    }


def _pm_part(mode, method, seed, a):
    """A one-seed ``permuted-mnist`` result: 2 tasks, R = [[a, 0.1], [a - 0.1, a + 0.1]]."""
    run = {
        "seed": seed,
        "method": method,
        "lam": 200.0,
        "task_names": ["t0", "t1"],
        "R": [[a, 0.1], [a - 0.1, a + 0.1]],
        "loss": [[0.0, 0.0], [0.0, 0.0]],
        "initial": [0.1, 0.1],
        "final_mean_acc": a,
        "bwt": -0.1,
        "curve": [{"stage": 0, "epoch": 1, "acc": [a, 0.1]}, {"stage": 1, "epoch": 1, "acc": [a - 0.1, a + 0.1]}],
    }
    summary = {"n_runs": 1, "final_mean_acc": a, "final_mean_acc_std": 0.0, "bwt": -0.1}
    return {
        "n_tasks": 2,
        "task_kind": "permuted",
        "runs": 1,
        "seed": seed,
        "n_train": 300,
        "n_test": 100,
        "wall_s": 60.0,
        "meta": {"command": f"ewc-fast permuted-mnist --seed {seed} --out /x/y", "wall_s": 60.0},
        "config": {
            "model": "cnn",
            "optimizer": "adam",
            "lr": 1e-3,
            "momentum": 0.0,
            "epochs": 1,
            "batch_size": 64,
            "n_importance": 100,
            "anchor": mode,
            "stabilize": False,
        },
        "methods": {method: {"best_lam": 200.0, "lams": {"200": {"lam": 200.0, "summary": summary, "runs": [run]}}}},
    }


def test_no_files_no_sections(tmp_path):
    assert render_science(tmp_path) == []


def test_prune_overlap_correlate_anchoring_sections(tmp_path):
    fr = [0.0, 0.8, 1.0]  # 90 % is interpolated between 0.8 and 1.0
    sig = _curve([[0.98, 0.6, 0.1], [0.97, 0.4, 0.1]])
    w = _curve([[0.98, 0.8, 0.1], [0.98, 0.7, 0.1]])
    prune = {
        "runs": 2,
        "seed": 0,
        "fractions": fr,
        "config": {"epochs": 6, "n_importance": 5000},
        "results": {f"{s}/weight/mean": {"curves": {"SIG": sig, "|w|": w}} for s in ("global", "layer")},
    }
    _write(tmp_path / "prune_layer/weights-only/prune.json", prune)
    entries = dict(prune, results={f"{s}/weight/mean": {"curves": {"SIG": sig}} for s in ("global", "layer")})
    _write(tmp_path / "prune_layer/all-entries/prune.json", entries)  # run without |w|: its cells are "—"
    _write(
        tmp_path / "overlap/overlap.json",
        {
            "per_fraction": [
                {"fraction": 0.0, "overlap": {"fc1.weight": 1.0, "all": 1.0}, "acc_A": 0.9, "acc_B": 0.9},
                {"fraction": 1.0, "overlap": {"fc1.weight": 0.4321, "all": 0.7}, "acc_A": 0.8, "acc_B": 0.85},
            ]
        },
    )
    rows = [
        {"stage": 1, "param": "fc1.weight", "pair": "FIS-MAS", "pearson": 0.5, "pearson_min": 0.25, "pearson_max": 0.75}
    ]
    _write(
        tmp_path / "correlate_seeds/correlations.json",
        {"rows": rows, "params": ["fc1.weight"], "pairs": ["FIS-MAS"], "n_tasks": 2, "seeds": [0, 1, 2]},
    )
    for mode, method, finals in (("all", "fisher", (0.8, 0.7)), ("previous", "fisher", (0.75, 0.72))):
        for seed, a in enumerate(finals):  # one file per seed, as `--seed k --runs 1` writes them
            _write(tmp_path / f"anchoring/{mode}/seed{seed}/permuted_mnist.json", _pm_part(mode, method, seed, a))
    text = "\n".join(render_science(tmp_path, {"overlap": ["NOTE-OVERLAP"]}))
    # 90 % = halfway between 0.8 and 1.0: SIG runs 0.35 and 0.25 → mean 0.30, band [0.25, 0.35]
    assert "| SIG | 0.896 | 0.625 | 0.300 [0.250, 0.350] | 0.300 [0.250, 0.350] | 0.300 [0.250, 0.350] |" in text
    assert "| \\|w\\| | 0.857 | 0.677 | 0.425 [0.400, 0.450] | 0.425 [0.400, 0.450] | — | — |" in text
    assert "| 1 | 0.432 | 0.700 | 0.800 | 0.850 |" in text and "NOTE-OVERLAP" in text
    assert "**3 seeds**" in text and "| FIS-MAS | +0.50 [+0.25, +0.75] |" in text
    # final = mean of the last row [a - 0.1, a + 0.1] = a; BWT = -0.1; task 0 at the end = a - 0.1
    assert "| penalty for all previous tasks (`all`) | 2 | 0.7500 [0.7000, 0.8000] | 0.800, 0.700 |" in text
    assert "-0.1000 [-0.1000, -0.1000] | 0.650 [0.600, 0.700] |" in text
    assert "| penalty for the previous task only (`previous`) | 2 | 0.7350 [0.7200, 0.7500] |" in text
    assert "`all` > `previous` in 1 of 2" in text and "no penalty" not in text
    assert "seeds 0, 1" in text and "(one invocation per seed, `--seed k`)" in text
    assert "explosion" not in text.lower()


def test_band_needs_the_run_curves(tmp_path):
    prune = {
        "runs": 1,
        "seed": 0,
        "fractions": [0.0, 1.0],
        "config": {"epochs": 1, "n_importance": 10},
        "results": {"global/weight/mean": {"curves": {"SIG": {"acc": [1.0, 0.0]}}}},
    }
    _write(tmp_path / "prune_layer/weights-only/prune.json", prune)
    with pytest.raises(ValueError, match="no min–max band"):  # an older prune.json: refused, not shown as exact
        render_science(tmp_path)


def test_conv_section_reference_column_and_lam_scan(tmp_path):
    def result(method, lams):
        part = _pm_part("latest", method, 0, 0.5)
        part["config"].update(model="kutalev-cnn", batch_size=100, epochs=1, stabilize=True)
        part["n_train"] = 6000  # 60 steps of 100 per task
        del part["meta"]  # an output without the command line: the wall time alone is shown
        entries = {}
        for lam, a in lams:
            e = _pm_part("latest", method, 0, a)["methods"][method]["lams"]["200"]
            e["lam"] = lam
            e["summary"]["R_mean"] = [[a, 0.1], [a - 0.1, a + 0.1]]
            entries[f"{lam:g}"] = e
        part["methods"] = {method: {"best_lam": lams[0][0], "lams": entries}}
        return part

    _write(tmp_path / "conv/permuted_mnist.json", result("fisher", [(675.0, 0.4)]))
    _write(tmp_path / "conv/scan/fisher/permuted_mnist.json", result("fisher", [(6.75, 0.6), (675.0, 0.4)]))
    code = result("fisher", [(675.0, 0.3)])
    code["config"]["model"] = "kutalev-cnn-code"  # the authors' net: its own rows, after ours
    _write(tmp_path / "conv/scan/code/permuted_mnist.json", code)
    text = "\n".join(render_science(tmp_path))
    assert "(60 steps per task)" in text
    # learned = mean of R[i][i] = (a + a + 0.1) / 2; theirs from Kutalev & Lapina 2021's conv rows
    assert "| fisher | 675 | 0.4000 | 0.0000 | -0.1000 | 0.450 | 675 → 0.585 |" in text
    assert "### Smaller runs and λ scans of the conv net" in text
    # sorted by steps, tasks, anchoring, model, then method and λ
    i = text.index("| 60 | 2 | `latest` | `kutalev-cnn` | fisher | 6.75 | 0.6000 | -0.1000 | 0.650 | 1 | 675 → 0.585 |")
    j = text.index("| 60 | 2 | `latest` | `kutalev-cnn` | fisher | 675 | 0.4000 | -0.1000 | 0.450 | 1 | 675 → 0.585 |")
    k = text.index("| 60 | 2 | `latest` | `kutalev-cnn-code` | fisher | 675 | 0.3000 | -0.1000 | 0.350 | 1 | 675 → ")
    assert i < j < k
