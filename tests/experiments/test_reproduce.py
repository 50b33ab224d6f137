"""``ewc-fast reproduce``: tiny sizes through the same code path as the full reproduction."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ewc_fast.experiments import reproduce as R
from ewc_fast.experiments.continual import RunConfig, default_lam
from ewc_fast.experiments.data import load_mnist
from ewc_fast.experiments.models import build_model, sig_activations
from ewc_fast.experiments.tasks import build_tasks


@pytest.fixture(scope="module")
def tiny():
    return load_mnist("embedded", n_train=300, n_test=200)


def test_rows_use_their_code_lambdas():
    lam = {r.key: r.lam_ours for r in R.TABLE_ROWS}
    # unstabilised scripts: λ'·ΣΩ(θ−θ*)² (no ½) → doubled
    assert (lam["fisher"], lam["mas"], lam["si"]) == (82.0, 9.0, 0.5)
    # stabilised scripts: Ω·λ·0.5/(Ω·λ·lr + 1) → already the (λ/2) form, unchanged
    assert lam["fisher_stab"] == 85.0 and lam["mas_stab"] == 8.5 and lam["si_stab"] == 0.64
    assert default_lam("si", stabilize=True)[0] == pytest.approx(0.64)
    assert lam["none"] == 0.0
    assert sum(r.reference is not None for r in R.TABLE_ROWS) == 6


def test_choose_runs_and_estimate():
    cal = {"epoch_plain_s": 2.0, "epoch_penalty_s": 3.0, "importance_s": 0.5, "eval_task_s": 0.1}
    none = R.estimate_run_seconds(cal, "none", 10, 6)
    ewc = R.estimate_run_seconds(cal, "fisher", 10, 6)
    assert none == pytest.approx(10 * 6 * 2.0 + 110 * 0.1)
    assert ewc == pytest.approx(6 * 2.0 + 9 * 6 * 3.0 + 9 * 0.5 + 110 * 0.1)
    assert R.choose_runs([100.0] * 7, 35 * 60) == 3
    assert R.choose_runs([1000.0] * 7, 60) == 1  # at least one run
    assert R.choose_runs([0.0], 60) == 1


def test_sig_estimator_matches_kutalev_formula(tiny):
    torch.manual_seed(0)
    model = build_model("mlp")
    x = torch.from_numpy(tiny.x_train[:64])
    y = torch.from_numpy(tiny.y_train[:64])
    from ewc_fast import estimate_importance

    sig = estimate_importance(
        model, [(x[:40], y[:40]), (x[40:], y[40:])], "sig", progress=False, sig_activation=sig_activations(model)
    )["sig"]
    hand = R.sig_by_hand(model, x)
    assert set(sig.keys()) == set(hand.keys())
    assert R.max_relative_error(sig, hand) < 1e-5


@pytest.mark.parametrize("stabilize", [False, True])
def test_latest_anchor_is_kutalevs_update(tiny, stabilize):
    """run_latest_anchor == Kutalev's loop written out: autograd penalty λ'·ΣΩ(θ−θ*)² (or the
    stabilised coefficient Ω·λ·0.5/(Ω·λ·lr + 1)), Ω summed over tasks, θ* the latest optimum,
    Fisher by a batch-of-one loop."""
    seed, n_imp, lr = 3, 50, 1e-3
    lam_theirs = 85.0 if stabilize else 41.0
    lam_ours = 85.0 if stabilize else 82.0
    tasks = build_tasks("permuted", 3, seed, first_identity=True, n_pixels=784)
    cfg = RunConfig(
        method="fisher",
        lam=lam_ours,
        stabilize=stabilize,
        model="small-mlp",
        epochs=2,
        n_importance=n_imp,
        importance_batch=32,
        eval_every_epoch=False,
    )
    torch.manual_seed(seed)
    model = build_model("small-mlp")
    torch.manual_seed(seed)
    ref = build_model("small-mlp")
    R.run_latest_anchor(tiny, tasks, cfg, seed=seed, model=model)

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ref.parameters(), lr=lr, foreach=True)
    params = list(ref.parameters())
    imp = [torch.zeros_like(p) for p in params]
    star = None
    x_tr, y_tr = torch.from_numpy(tiny.x_train), torch.from_numpy(tiny.y_train)
    for i, task in enumerate(tasks):
        if stabilize:
            reg = [o * lam_theirs * 0.5 / (o * lam_theirs * lr + 1.0) for o in imp]
        else:
            reg = [o * lam_theirs for o in imp]
        x, y = task.apply(x_tr, y_tr)
        ref.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for b in range(0, x.shape[0], cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                loss = F.cross_entropy(ref(x[idx]), y[idx])
                if star is not None:
                    for p, r, s in zip(params, reg, star):
                        loss = loss + torch.sum(r * torch.square(p - s))
                opt.zero_grad()
                loss.backward()
                opt.step()
        if i < len(tasks) - 1:
            ref.eval()
            acc = [torch.zeros_like(p) for p in params]
            for j in range(x.shape[0] - n_imp, x.shape[0]):
                ref.zero_grad()
                F.log_softmax(ref(x[j : j + 1]), dim=1)[0, y[j]].backward()
                for a, p in zip(acc, params):
                    a.add_(p.grad.square())
            for o, a in zip(imp, acc):
                o.add_(a / n_imp)
            star = [p.detach().clone() for p in params]
    for (n, p), q in zip(model.named_parameters(), params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=2e-6, msg=n)


def test_kutalev_prune_protocol_keeps_biases(tiny):
    torch.manual_seed(0)
    model = build_model("small-mlp")
    imps = {m: {n: torch.rand_like(p) for n, p in model.named_parameters()} for m in R.PRUNE_IMPORTANCES}
    imps["si"] = {n: torch.randn_like(p) for n, p in model.named_parameters()}  # signed, like raw SI
    x, y = torch.from_numpy(tiny.x_test), torch.from_numpy(tiny.y_test)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curves = R.prune_both_protocols(model, imps, x, y, [0.0, 0.5, 1.0], seed=0)
    n_w = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    n_all = sum(p.numel() for p in model.parameters())
    for lab, c in curves["kutalev"].items():
        assert c["removed"] == [0, round(0.5 * n_w), n_w], lab
    for lab, c in curves["library"].items():
        assert c["removed"][-1] == n_all, lab
    for n, p in model.named_parameters():  # restored
        assert torch.equal(p.detach(), before[n])
    assert all(p.requires_grad for p in model.parameters())


def test_correlation_claims_synthetic():
    rows = []
    vals = {
        "FIS-MAS": (0.9, 0.85),
        "MAS-SI": (0.85, 0.82),
        "FIS-SI": (0.8, 0.77),
        "FIS-MAS²": (0.95, 0.9),
        "FIS-SIG": (0.6, -0.2),
        "MAS-SIG": (0.6, -0.1),
        "SI-SIG": (0.5, -0.3),
    }
    for pair, (first, last) in vals.items():
        for stage in (0, 1):
            for li, layer in enumerate(("fc1.weight", "fc2.weight", "out.weight")):
                v = first + (last - first) * li / 2
                rows.append({"stage": stage, "param": layer, "pair": pair, "pearson": v, "spearman": v})
    claims = R.correlation_claims({"rows": rows})
    assert len(claims) == 10
    assert all(c["holds_all"] and c["holds_last"] for c in claims), claims
    rows[0]["pearson"] = 0.1  # FIS-MAS on fc1 at stage 0 drops below 0.8
    first = R.correlation_claims({"rows": rows})[0]
    assert not first["holds_all"] and first["holds_last"]


def test_reproduce_quick_end_to_end(tmp_path):
    """The command as the full run calls it, with tiny sizes: JSON, PNG, RESULTS.md, re-render."""
    from ewc_fast.cli import main

    out = tmp_path / "docs"
    args = [
        "reproduce",
        "--quick",
        "--data",
        "embedded",
        "--n-train",
        "400",
        "--n-test",
        "200",
        "--tasks",
        "2",
        "--corr-tasks",
        "2",
        "--prune-runs",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    res = out / "results"
    table = json.loads((res / "table.json").read_text())
    assert table["runs"] == 1 and table["n_tasks"] == 2 and table["meta"]["quick"] is True
    assert set(table["rows"]) == {r.key for r in R.TABLE_ROWS}
    for row in table["rows"].values():
        assert len(row["runs"]) == 1
        Rm = np.asarray(row["runs"][0]["R"])
        assert Rm.shape == (2, 2) and np.all((Rm >= 0) & (Rm <= 1))
        assert row["summary"]["mean"] == pytest.approx(Rm[-1].mean())
        if row["reference"] is not None:
            assert row["summary"]["diff_points"] == pytest.approx(100 * (row["summary"]["mean"] - row["reference"]))
    corr = json.loads((res / "correlate.json").read_text())
    assert corr["n_tasks"] == 2 and len(corr["claims"]) == 10
    prune = json.loads((res / "prune.json").read_text())
    assert set(prune["summary"]) == {"kutalev", "library"}
    assert prune["per_run"][0]["sig_check"]["max_rel_err_vs_hand"] < 1e-5
    assert "embedded" in prune
    text = (out / "RESULTS.md").read_text()
    for needle in (
        "QUICK MODE",
        "runs per row: K = 1",
        "EWC, Fisher",
        "stabilised EWC, SI",
        "\\|w\\|",
        "FIS-MAS²",
        "default_lam",
    ):
        assert needle in text, needle
    try:
        import matplotlib  # noqa: F401

        assert "Accuracy matrices and per-task curves of the table" in text
        for png in ("table_accuracy_matrices.png", "table_task_curves.png", "correlation_heatmap_pearson.png"):
            assert (res / png).exists() and f"results/{png}" in text, png
    except ImportError:
        pass
    # --render-only rebuilds the same file from the JSON alone
    (out / "RESULTS.md").unlink()
    assert main(["reproduce", "--render-only", "--out", str(out)]) == 0
    assert (out / "RESULTS.md").read_text() == text
    # an investigation variant lands in table.json and in the text
    assert (
        main(
            [
                "reproduce",
                "--data",
                "embedded",
                "--n-train",
                "400",
                "--n-test",
                "200",
                "--out",
                str(out),
                "--investigate",
                "fisher_separate,none+seeds,si_adam_carry",
                "--investigate-runs",
                "2",
            ]
        )
        == 0
    )
    table = json.loads((res / "table.json").read_text())
    inv = table["investigations"]
    assert set(inv) == {"fisher_separate", "none+seeds", "si_adam_carry"}
    assert [r["seed"] for r in inv["none+seeds"]["per_run"]] == [1, 2]
    carried = [bool(r.get("adam_state_carried_in")) for r in inv["si_adam_carry"]["per_run"]]
    assert carried == [False, True]
    # the chain's first run starts fresh: identical to the table's run of the same seed
    assert inv["si_adam_carry"]["per_run"][0]["final_mean_acc"] == table["rows"]["si"]["runs"][0]["final_mean_acc"]
    assert "Investigation runs" in (out / "RESULTS.md").read_text()
