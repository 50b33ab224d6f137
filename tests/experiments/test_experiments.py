"""Experiment building blocks: accuracy-matrix bookkeeping, pruning, correlations, overlap."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ewc_fast.experiments import continual as C
from ewc_fast.experiments import correlate as K
from ewc_fast.experiments import overlap as O
from ewc_fast.experiments import prune as P
from ewc_fast.experiments.data import MNIST
from ewc_fast.experiments.models import MLP, SmallCNN, build_model, sig_activations
from ewc_fast.experiments.tasks import permuted_tasks


# ------------------------------------------------------------------ accuracy matrix
def test_bwt_fwt_hand_made():
    R = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.1], [0.6, 0.5, 0.95]]
    b = [0.1, 0.1, 0.1]
    # BWT = mean(R[2,0]-R[0,0], R[2,1]-R[1,1]) = mean(-0.3, -0.3)
    assert C.backward_transfer(R) == pytest.approx(-0.3)
    # FWT = mean(R[0,1]-b1, R[1,2]-b2) = mean(0.0, 0.0)
    assert C.forward_transfer(R, b) == pytest.approx(0.0)
    assert C.mean_accuracy_seen(R) == pytest.approx([0.9, 0.75, (0.6 + 0.5 + 0.95) / 3])
    assert C.backward_transfer([[0.5]]) == 0.0
    r = C.RunResult("x", 0.0, 0, ["a", "b", "c"], R, R, b)
    assert r.final_mean_acc == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert r.to_dict()["bwt"] == pytest.approx(-0.3)


def test_lam_conventions():
    assert C.to_ewc_lam(41, "kutalev") == 82
    assert C.to_ewc_lam(3.0, "ewc") == 3.0
    assert C.from_ewc_lam(82) == 41
    lam, src = C.default_lam("fisher")
    assert lam == 82 and "41" in src
    assert C.default_lam("mas", stabilize=True)[0] == pytest.approx(8.5)  # ½ already in their code
    assert C.default_lam("si")[0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        C.to_ewc_lam(1, "other")


def _tiny_data(n_train=200, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    y_tr = rng.integers(0, 10, n_train)
    y_te = rng.integers(0, 10, n_test)
    protos = rng.random((10, 784)).astype(np.float32)

    def make(y):
        return np.clip(protos[y] + 0.3 * rng.standard_normal((len(y), 784)), 0, 1).astype(np.float32)

    return MNIST(make(y_tr), y_tr.astype(np.int64), make(y_te), y_te.astype(np.int64), "synthetic")


@pytest.mark.parametrize("method", ["none", "l2", "fisher", "si"])
def test_run_sequence_shapes(method):
    data = _tiny_data()
    cfg = C.RunConfig(
        method=method, lam=C.default_lam(method)[0], epochs=1, model="small-mlp", n_importance=50, batch_size=50
    )
    r = C.run_sequence(data, permuted_tasks(3, 0), cfg, seed=0)
    R = np.asarray(r.R)
    assert R.shape == (3, 3) and np.all((R >= 0) & (R <= 1))
    assert len(r.initial) == 3 and len(r.curve) == 3
    assert R[0, 0] > 0.5  # the prototypes are easy
    assert math.isfinite(r.bwt)


@pytest.mark.parametrize("method,stabilize", [("mas", True), ("wva", False), ("sig", False)])
def test_run_sequence_other_methods(method, stabilize):
    data = _tiny_data(n_train=100, n_test=50)
    cfg = C.RunConfig(
        method=method,
        lam=C.default_lam(method, stabilize=stabilize)[0],
        stabilize=stabilize,
        epochs=1,
        model="small-mlp",
        n_importance=50,
        batch_size=50,
        eval_every_epoch=False,
    )
    r = C.run_sequence(data, permuted_tasks(2, 0), cfg, seed=0)
    assert np.asarray(r.R).shape == (2, 2) and r.importance_time_s > 0


def test_importance_stats_hand_made():
    from ewc_fast.experiments.strategies import importance_stats
    from ewc_fast.importance import Importance

    imp = Importance(
        {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.0, 9.0], [0.0, 0.0]])}, method="fisher", n_samples=1
    )
    # max over every entry: 9 (in b); largest per-tensor mean: a 2.0 vs b 2.25
    assert importance_stats(imp) == {"max": 9.0, "max_mean": 2.25}
    assert importance_stats(None) is None


@pytest.mark.parametrize("method", ["none", "fisher"])
def test_run_sequence_records_importance_stats(method):
    """``importance_stats`` per consolidation equals the statistics of the importance recomputed
    from the model and importance samples at that point (the empirical Fisher is deterministic)."""
    from ewc_fast.experiments.training import estimate

    data = _tiny_data(n_train=100, n_test=50)
    cfg = C.RunConfig(
        method=method, lam=10.0, epochs=1, model="small-mlp", n_importance=40, batch_size=50, eval_every_epoch=False
    )
    ref = []

    def on_task_end(stage, model, x_imp, y_imp, strategy):
        if method == "none":
            return
        imp = estimate(model, x_imp, y_imp, ("fisher",), cfg)["fisher"]
        ref.append((max(float(t.max()) for t in imp.values()), max(float(t.double().mean()) for t in imp.values())))

    r = C.run_sequence(data, permuted_tasks(2, 0), cfg, seed=0, on_task_end=on_task_end)
    stats = r.to_dict()["importance_stats"]
    assert len(stats) == 2  # on_task_end given: the last task is consolidated too
    if method == "none":
        assert stats == [None, None]
        return
    for got, (mx, mean) in zip(stats, ref):
        # the same estimator on the same model and samples: equal up to fp32 summation order
        assert got["max"] == pytest.approx(mx, rel=1e-6) and got["max_mean"] == pytest.approx(mean, rel=1e-6)
        assert 0 < got["max_mean"] <= got["max"]


def test_run_sequence_seeded():
    data = _tiny_data()
    cfg = C.RunConfig(method="none", epochs=1, model="small-mlp", batch_size=50)
    a = C.run_sequence(data, permuted_tasks(2, 0), cfg, seed=1)
    b = C.run_sequence(data, permuted_tasks(2, 0), cfg, seed=1)
    assert a.R == b.R


# ------------------------------------------------------------------ models
def test_models_shapes():
    x = torch.rand(2, 784)
    for name in ("mlp", "small-mlp", "small-cnn", "cnn"):
        m = build_model(name)
        assert m(x).shape == (2, 10)
    mlp = build_model("mlp")
    assert [n for n, _ in mlp.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "out.weight",
        "out.bias",
    ]
    acts = sig_activations(mlp)
    assert isinstance(acts["fc1"], nn.LeakyReLU) and callable(acts["out"])
    assert set(sig_activations(SmallCNN())) == {"conv1", "conv2", "out"}


# ------------------------------------------------------------------ pruning
def _mlp_and_importance(seed=0):
    torch.manual_seed(seed)
    m = MLP(784, (16,), 10)
    imp = {n: torch.rand(p.shape) for n, p in m.named_parameters()}
    return m, imp


@pytest.mark.parametrize("aggregation", ["weight", "unit", "filter"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_fraction_0_and_1(aggregation, scope):
    m, imp = _mlp_and_importance()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    groups = P.build_groups(m, aggregation)
    ranks = P.group_ranks(groups, P.group_scores(groups, imp, "mean"), scope)
    assert P.apply_pruning(m, groups, ranks, 0.0, scope=scope, original=original) == 0
    for n, p in m.named_parameters():
        assert torch.equal(p, original[n])
    total = sum(p.numel() for p in m.parameters())
    assert P.apply_pruning(m, groups, ranks, 1.0, scope=scope, original=original) == total
    assert all(bool((p == 0).all()) for p in m.parameters())


def test_prune_removes_least_important_first():
    m, imp = _mlp_and_importance()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    groups = P.build_groups(m, "weight")
    ranks = P.group_ranks(groups, P.group_scores(groups, imp), "global")
    P.apply_pruning(m, groups, ranks, 0.3, original=original)
    allimp = torch.cat([imp[n].flatten() for n in imp])
    thresh = torch.sort(allimp).values[round(0.3 * allimp.numel()) - 1]
    for n, p in m.named_parameters():
        pruned = (p == 0) & (original[n] != 0)
        assert bool((imp[n][pruned] <= thresh).all())
        assert bool((imp[n][~pruned & (original[n] != 0)] >= thresh).all())


def test_prune_unit_groups_rows_with_bias():
    m, imp = _mlp_and_importance()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    groups = P.build_groups(m, "unit")
    assert groups.n_groups == 16 + 10
    ranks = P.group_ranks(groups, P.group_scores(groups, imp, "max"), "layer")
    P.apply_pruning(m, groups, ranks, 0.5, scope="layer", original=original)
    w, b = m.fc1.weight, m.fc1.bias
    dead = (w == 0).all(dim=1)
    assert int(dead.sum()) == 8 and bool((b[dead] == 0).all()) and bool((b[~dead] != 0).all())


def test_prune_filter_groups_and_noise():
    torch.manual_seed(0)
    m = SmallCNN()
    imp = {n: torch.rand(p.shape) for n, p in m.named_parameters()}
    g = P.build_groups(m, "filter")
    assert g.n_groups == 8 * 1 + 8 + 16 * 8 + 16 + 10 * 784 + 10
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    ranks = P.group_ranks(g, P.group_scores(g, imp, "min"), "global")
    gen = torch.Generator().manual_seed(0)
    P.apply_pruning(m, g, ranks, 0.5, replace="noise", original=original, generator=gen)
    changed = m.conv2.weight != original["conv2.weight"]
    # whole 3x3 kernels are replaced or kept
    per_kernel = changed.flatten(2).float().mean(-1)
    assert bool(((per_kernel == 0) | (per_kernel == 1)).all())
    assert float(m.conv2.weight.detach()[changed].abs().max()) < float(original["conv2.weight"].std())


def test_auc_and_ordering():
    f = [0.0, 0.5, 1.0]
    assert P.auc(f, [1, 1, 1]) == pytest.approx(1.0)
    assert P.auc(f, [1, 0, 0]) == pytest.approx(0.25)
    rows = P.ordering_table({"a": {"acc": [1, 0, 0], "loss": [1, 2, 3]}, "b": {"acc": [1, 1, 0], "loss": [1, 1, 3]}}, f)
    assert [r["importance"] for r in rows] == ["b", "a"] and rows[0]["rank"] == 1


# ------------------------------------------------------------------ correlations
def test_correlation_of_importance_with_itself_is_one():
    rng = np.random.default_rng(0)
    v = rng.random(500) ** 3
    assert K.pearson(v, v) == pytest.approx(1.0)
    assert K.spearman(v, v) == pytest.approx(1.0)
    assert K.pearson(v, -v) == pytest.approx(-1.0)
    assert math.isnan(K.pearson(np.ones(5), v[:5]))
    m, imp = _mlp_and_importance()
    table = K.correlation_table({"FIS": imp, "MAS": imp, "SI": imp, "SIG": imp})
    for r in table:
        if r["pair"] == "FIS-MAS²":
            assert r["spearman"] == pytest.approx(1.0)  # monotone transform of the same values
        else:
            assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)


def test_rankdata_ties_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    a = np.array([3, 1, 2, 2, 5, 1, 1, 9.0])
    np.testing.assert_allclose(K.rankdata(a), stats.rankdata(a))
    rng = np.random.default_rng(1)
    x, y = rng.random(200), rng.random(200)
    y[:50] = 0.0
    assert K.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert K.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)


# ------------------------------------------------------------------ overlap
def test_fisher_overlap():
    a = torch.tensor([1.0, 2.0, 0.0, 3.0])
    assert O.fisher_overlap(a, a) == pytest.approx(1.0)
    assert O.fisher_overlap(a, 5 * a) == pytest.approx(1.0)
    assert O.fisher_overlap(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert 0.0 < O.fisher_overlap(a, torch.tensor([1.0, 1.0, 1.0, 1.0])) < 1.0
    t = O.overlap_table({"w": a, "b": a[:2]}, {"w": a, "b": a[:2]})
    assert t["all"] == pytest.approx(1.0) and t["w"] == pytest.approx(1.0)


# ------------------------------------------------------------------ demo reference loop
def test_loop_fisher_matches_estimate_importance():
    from ewc_fast.experiments.demo import loop_fisher, max_relative_difference, time_importance

    torch.manual_seed(0)
    m = MLP(784, (32,), 10)
    x, y = torch.rand(40, 784), torch.randint(0, 10, (40,))
    ref = loop_fisher(m, x, y)
    t = time_importance(m, x, y, batch_size=16)
    assert t["max_rel_diff"] < 1e-3 and t["n_samples"] == 40
    assert max_relative_difference(ref, ref) == 0.0


def test_mean_curve_mean_and_range_over_runs():
    def run(a, b):
        return {"curve": [{"stage": 0, "epoch": 1, "acc": [a, 0.1]}, {"stage": 1, "epoch": 1, "acc": [b, 0.5]}]}

    got = C.mean_curve([run(0.9, 0.6), run(0.7, 0.2), run(0.8, 0.4)])
    assert [(p["stage"], p["epoch"]) for p in got] == [(0, 1), (1, 1)]
    np.testing.assert_allclose(got[0]["acc"], [0.8, 0.1])
    np.testing.assert_allclose(got[1]["acc"], [0.4, 0.5])
    assert got[1]["acc_min"] == [0.2, 0.5] and got[1]["acc_max"] == [0.6, 0.5]
    one = C.mean_curve([run(0.9, 0.6)])
    assert one[1]["acc"] == [0.6, 0.5] and "acc_min" not in one[1]  # no range from a single run
    assert C.mean_curve([]) == []
    bad = run(0.5, 0.5)
    bad["curve"] = bad["curve"][:1]
    with pytest.raises(ValueError, match="run 1"):
        C.mean_curve([run(0.9, 0.6), bad])


def _part(seeds, accs, lr=1e-3):
    runs = [
        C.RunResult("fisher", 2.0, s, ["t0", "t1"], [[a, 0.1], [a - 0.2, a]], [[0.0] * 2] * 2, [0.1, 0.1]).to_dict()
        for s, a in zip(seeds, accs)
    ]
    summary = C.summarize_runs(
        [
            C.RunResult(**{k: r[k] for k in ("method", "lam", "seed", "task_names", "R", "loss", "initial")})
            for r in runs
        ]
    )
    return {
        "config": {"lr": lr},
        "n_tasks": 2,
        "task_kind": "permuted",
        "runs": len(seeds),
        "seed": seeds[0],
        "wall_s": 10.0,
        "meta": {"command": f"ewc-fast permuted-mnist --seed {seeds[0]}", "wall_s": 10.0},
        "methods": {"fisher": {"lams": {"2": {"lam": 2.0, "summary": summary, "runs": runs}}, "best_lam": 2.0}},
    }


def test_merge_experiments_concatenates_seeds_and_recomputes_the_summary():
    merged = C.merge_experiments([_part([2], [0.7]), _part([0, 1], [0.9, 0.8])])
    assert merged["seeds"] == [0, 1, 2] and merged["runs"] == 3 and merged["seed"] == 0
    assert merged["wall_s"] == 20.0 and merged["meta"]["wall_s"] == 20.0 and len(merged["parts_meta"]) == 2
    s = merged["methods"]["fisher"]["lams"]["2"]["summary"]
    finals = [(a - 0.2 + a) / 2 for a in (0.9, 0.8, 0.7)]  # mean of the last row of R per run
    assert s["n_runs"] == 3
    np.testing.assert_allclose(s["final_mean_acc"], np.mean(finals), rtol=1e-12)
    np.testing.assert_allclose(s["final_mean_acc_std"], np.std(finals, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(s["bwt"], -0.2, rtol=1e-12)
    with pytest.raises(ValueError, match="seed"):
        C.merge_experiments([_part([0], [0.9]), _part([0, 1], [0.9, 0.8])])
    with pytest.raises(ValueError, match="'config'"):
        C.merge_experiments([_part([0], [0.9]), _part([1], [0.8], lr=1e-4)])
    with pytest.raises(ValueError, match="no results"):
        C.merge_experiments([])
