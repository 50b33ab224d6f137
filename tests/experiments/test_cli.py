"""Every ``ewc-fast`` command end to end, in a subprocess, on tiny data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = ["--n-train", "300", "--n-test", "100", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """300/100 real digits (the embedded set) as IDX files: loads in milliseconds per subprocess."""
    from ewc_fast.experiments.data import load_mnist, write_idx

    m = load_mnist("embedded", n_train=300, n_test=100)
    d = tmp_path_factory.mktemp("idx")
    for stem, x, y in (("train", m.x_train, m.y_train), ("t10k", m.x_test, m.y_test)):
        write_idx(d / f"{stem}-images-idx3-ubyte", np.round(x * 255).astype(np.uint8).reshape(-1, 28, 28))
        write_idx(d / f"{stem}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return ["--data", f"idx:{d}"]


def _run(*args, check=True, timeout=240):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", "ewc_fast", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _json(path: Path):
    with open(path) as f:
        return json.load(f)  # strict: the files are written with allow_nan=False


def _has_plots():
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def _check_matrix(R, T):
    R = np.asarray(R, dtype=float)
    assert R.shape == (T, T)
    assert np.all((R >= 0) & (R <= 1))


def test_help_and_no_command(capsys):
    from ewc_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("demo", "permuted-mnist", "correlate", "prune", "overlap"):
        assert cmd in text
    assert main([]) == 1


def test_demo(tmp_path):
    out = tmp_path / "demo"
    proc = _run("demo", "--out", out, "--epochs", "1", "--n-timing", "64", *TINY)
    assert "no consolidation" in proc.stdout and "EWC (Fisher" in proc.stdout
    assert "max relative difference" in proc.stdout and "λ = 82" in proc.stdout
    res = _json(out / "demo.json")
    assert set(res["runs"]) == {"none", "fisher"}
    for r in res["runs"].values():
        _check_matrix(r["R"], 3)
    t = res["timing"]
    assert t["n_samples"] == 64 and t["ewc_fast_s"] > 0 and t["loop_s"] > 0
    assert t["max_rel_diff"] < 1e-3
    if _has_plots():
        assert (out / "demo_accuracy.png").stat().st_size > 0
        assert (out / "demo_curves.png").exists()


def test_permuted_mnist_grid_runs(tmp_path, idx_data):
    out = tmp_path / "pm"
    proc = _run(
        "permuted-mnist",
        "--out",
        out,
        "--tasks",
        "2",
        "--epochs",
        "1",
        "--model",
        "small-mlp",
        "--methods",
        "none,fisher,si",
        "--lam-grid",
        "1,10",
        "--lam-convention",
        "kutalev",
        "--runs",
        "2",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    assert "λ'=1" in proc.stdout and "λ=2" in proc.stdout  # kutalev 1 → ewc 2, printed
    res = _json(out / "permuted_mnist.json")
    assert set(res["methods"]) == {"none", "fisher", "si"}
    assert set(res["methods"]["fisher"]["lams"]) == {"2", "20"}
    for m in res["methods"].values():
        for v in m["lams"].values():
            assert v["summary"]["n_runs"] == 2 and len(v["runs"]) == 2
            _check_matrix(v["summary"]["R_mean"], 2)
            assert [r["seed"] for r in v["runs"]] == [0, 1]
    # paired runs: the same seed gives the same first-task accuracy for every method
    r00 = [m["lams"][next(iter(m["lams"]))]["runs"][0]["R"][0][0] for m in res["methods"].values()]
    assert len(set(r00)) == 1
    if _has_plots():
        for name in ("accuracy_matrices.png", "task_curves.png", "lam_grid.png"):
            assert (out / name).exists()


def test_permuted_mnist_sgd_anchor_multi_head(tmp_path, idx_data):
    """SGD with momentum, only-previous anchoring and a multi-head split run, end to end."""
    out = tmp_path / "pmh"
    _run(
        "permuted-mnist",
        "--out",
        out,
        "--task-kind",
        "split",
        "--tasks",
        "3",
        "--multi-head",
        "--anchor",
        "previous",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.9",
        "--lr",
        "0.01",
        "--clip-norm",
        "5",
        "--epochs",
        "1",
        "--model",
        "small-mlp",
        "--methods",
        "none,fisher_exact,fisher_batched",
        "--method-lams",
        "fisher_exact=10,fisher_batched=1000",
        "--n-importance",
        "50",
        "--no-epoch-eval",
        *TINY,
        *idx_data,
    )
    res = _json(out / "permuted_mnist.json")
    cfg = res["config"]
    assert (cfg["optimizer"], cfg["momentum"], cfg["clip_norm"], cfg["anchor"], cfg["multi_head"]) == (
        "sgd",
        0.9,
        5.0,
        "previous",
        True,
    )
    assert res["methods"]["fisher_exact"]["best_lam"] == 10.0
    assert res["methods"]["fisher_batched"]["best_lam"] == 1000.0
    assert res["meta"]["command"].startswith("ewc-fast permuted-mnist")
    for m in res["methods"].values():
        R = np.asarray(next(iter(m["lams"].values()))["summary"]["R_mean"])
        _check_matrix(R, 3)
    # momentum without SGD: a clear error naming the option, exit 2
    proc = _run("permuted-mnist", "--out", out, "--momentum", "0.9", *TINY, *idx_data, check=False)
    assert proc.returncode == 2 and "--optimizer sgd" in proc.stderr
    proc = _run("permuted-mnist", "--out", out, "--method-lams", "fisher:3", *TINY, *idx_data, check=False)
    assert proc.returncode == 2 and "METHOD=VALUE" in proc.stderr


def test_permuted_mnist_from_idx_dir_blocks(tmp_path, capsys):
    """In-process (the subprocess path is covered above): gzipped IDX, block tasks, a CNN."""
    from ewc_fast.cli import main
    from ewc_fast.experiments.data import write_idx

    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    for stem, n in (("train", 120), ("t10k", 40)):
        write_idx(d / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    out = tmp_path / "pm"
    assert (
        main(
            [
                "permuted-mnist",
                "--data",
                f"idx:{d}",
                "--out",
                str(out),
                "--tasks",
                "2",
                "--task-kind",
                "blocks",
                "--epochs",
                "1",
                "--model",
                "small-cnn",
                "--methods",
                "l2,mas",
                "--no-progress",
                "--no-epoch-eval",
            ]
        )
        == 0
    )
    assert "train 120" in capsys.readouterr().out
    res = _json(out / "permuted_mnist.json")
    assert res["task_kind"] == "blocks" and res["n_train"] == 120
    _check_matrix(res["methods"]["mas"]["lams"]["9"]["summary"]["R_mean"], 2)


def test_lam_resolution_and_conversion(capsys):
    from ewc_fast.cli import build_parser
    from ewc_fast.cli.common import resolve_lams

    args = build_parser().parse_args(
        ["permuted-mnist", "--lam", "41", "--lam-convention", "kutalev", "--methods", "none,fisher,wva"]
    )
    lams = resolve_lams(args, args.methods)
    assert lams == {"none": [0.0], "fisher": [82.0], "wva": [41.0]}  # WVA has no ½: unconverted
    assert "λ'=41" in capsys.readouterr().out
    args = build_parser().parse_args(["permuted-mnist", "--methods", "fisher,si", "--stabilize"])
    # their stabilised scripts already carry the ½: 85 / 0.64 are ewc_fast's λ as they stand
    assert resolve_lams(args, args.methods) == {"fisher": [85.0], "si": [0.64]}
    # ... so a λ given in Kutalev's convention together with --stabilize is not doubled either
    args = build_parser().parse_args(
        ["permuted-mnist", "--methods", "fisher", "--stabilize", "--lam", "85", "--lam-convention", "kutalev"]
    )
    assert resolve_lams(args, args.methods) == {"fisher": [85.0]}
    args = build_parser().parse_args(
        ["permuted-mnist", "--methods", "fisher", "--lam", "41", "--lam-convention", "kutalev"]
    )
    assert resolve_lams(args, args.methods) == {"fisher": [82.0]}


def test_missing_data_source_is_a_clear_error(tmp_path, capsys):
    from ewc_fast.cli import main

    assert main(["permuted-mnist", "--data", f"idx:{tmp_path / 'none'}", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_correlate(tmp_path, idx_data):
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
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    with open(out / "correlations.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {r["pair"] for r in rows}
    assert pairs == {"FIS-MAS", "FIS-SI", "FIS-SIG", "MAS-SI", "MAS-SIG", "SI-SIG", "FIS-MAS²"}
    assert {r["stage"] for r in rows} == {"0", "1"}
    assert {r["param"] for r in rows} == {"fc1.weight", "fc1.bias", "out.weight", "out.bias"}
    vals = [float(r["pearson"]) for r in rows if r["pearson"] != ""]
    assert vals and all(-1 <= v <= 1 for v in vals)
    res = _json(out / "correlations.json")
    assert res["n_tasks"] == 2
    if _has_plots():
        assert (out / "correlation_surfaces_pearson.png").exists()
        assert (out / "correlation_surfaces_spearman.png").exists()


def test_prune(tmp_path, idx_data):
    out = tmp_path / "pr"
    _run(
        "prune",
        "--out",
        out,
        "--epochs",
        "2",
        "--model",
        "small-mlp",
        "--fractions",
        "5",
        "--scope",
        "global,layer",
        "--aggregation",
        "weight,unit",
        "--reduce",
        "mean,max",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    res = _json(out / "prune.json")
    assert res["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(res["results"]) == 2 * 2 * 2
    trained = res["trained_acc"][0]
    for r in res["results"].values():
        assert set(r["curves"]) == {"FIS", "MAS", "SI", "SIG", "|w|", "random"}
        for c in r["curves"].values():
            assert c["acc"][0] == pytest.approx(trained)  # fraction 0: the trained model
            assert c["removed"][0] == 0 and c["removed"][-1] == 784 * 100 + 100 + 100 * 10 + 10
        last = {c["acc"][-1] for c in r["curves"].values()}
        assert len(last) == 1  # fraction 1: everything zero, the same model for every importance
        assert [o["rank"] for o in r["ordering"]] == list(range(1, 7))
    with open(out / "prune_ordering.csv") as f:
        assert len(list(csv.DictReader(f))) == 8 * 6
    if _has_plots():
        assert (out / "prune_global_weight_mean.png").exists()


def test_prune_trackers_weights_only_bands(tmp_path, idx_data):
    """Seed-004 measures, weights-only pruning and the min–max band over 2 runs."""
    out = tmp_path / "pr2"
    _run(
        "prune",
        "--out",
        out,
        "--epochs",
        "1",
        "--model",
        "small-mlp",
        "--fractions",
        "3",
        "--scope",
        "layer",
        "--weights-only",
        "--runs",
        "2",
        "--importances",
        "magnitude,inverse_magnitude,sign_flips,dw_sign_changes,abs_change",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    res = _json(out / "prune.json")
    assert res["weights_only"] is True and res["runs"] == 2
    r = res["results"]["layer/weight/mean"]
    assert set(r["curves"]) == {"|w|", "1/|w|", "w sign flips", "Δw sign changes", "Σ|Δw|"}
    for c in r["curves"].values():
        assert c["removed"][-1] == 784 * 100 + 100 * 10  # weights only: the biases stay
        assert len(c["acc_runs"]) == 2
        for lo, m, hi, a, b in zip(c["acc_min"], c["acc"], c["acc_max"], *c["acc_runs"]):
            assert lo == min(a, b) and hi == max(a, b) and m == pytest.approx((a + b) / 2)
    with open(out / "prune_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 3 and {"acc_min", "acc_max"} <= set(rows[0])


def test_overlap(tmp_path, idx_data):
    out = tmp_path / "ov"
    _run(
        "overlap",
        "--out",
        out,
        "--epochs",
        "1",
        "--model",
        "small-mlp",
        "--fractions",
        "0,1",
        "--n-importance",
        "100",
        *TINY,
        *idx_data,
    )
    res = _json(out / "overlap.json")
    assert res["fractions"] == [0.0, 1.0]
    same, perm = (pf["overlap"] for pf in res["per_fraction"])
    for k, v in same.items():
        assert v == pytest.approx(1.0, abs=1e-5), k  # identical task: identical Fisher
    assert perm["fc1.weight"] < 0.99
    assert all(0 <= v <= 1 + 1e-6 for v in perm.values())
    if _has_plots():
        assert (out / "overlap.png").exists()
