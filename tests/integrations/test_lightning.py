"""Lightning callback (ewc_fast.integrations.lightning) on a real lightning.pytorch Trainer (CPU):
accumulate_grad_batches, bf16-mixed, SI under automatic optimization, checkpoint/resume, task end."""

import logging
import warnings

import pytest
import torch

pytest.importorskip("lightning")

from torch.utils.data import DataLoader  # noqa: E402

import ewc_fast  # noqa: E402
from ewc_fast.integrations.lightning import ConsolidationCallback  # noqa: E402
from tests.helpers import load_example  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


EX = load_example("lightning_continual")


def _consolidated(lam=20.0, seed=0):
    """A Classifier with EWC on task 0's Fisher, then moved away from the anchor."""
    model = EX.Classifier(seed=seed)
    ewc = ewc_fast.EWC(model, lam=lam)
    ewc.consolidate(
        ewc_fast.estimate_importance(model, DataLoader(EX.make_task(0, n=32), batch_size=8), progress=False)["fisher"]
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    return model, ewc


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_example_reduces_forgetting():
    res = EX.main(["--epochs", "10"])
    assert res["forgetting_plain"] > 1.0, res
    assert res["forgetting_ewc"] < 0.6 * res["forgetting_plain"], res  # measured 0.87 vs 2.20


def test_penalty_once_per_optimizer_step_with_accumulate_grad_batches():
    """bs 4 x 2 accumulated micro-batches == bs 8 (Lightning divides each micro-batch loss by 2): with
    the penalty once per optimizer step both train the same parameters."""
    data = EX.make_task(1, n=32, seed=3)
    finals = []
    for bs, acc in ((8, 1), (4, 2)):
        model, ewc = _consolidated()
        cb = ConsolidationCallback(ewc=ewc)
        tr = EX.trainer(2, callbacks=[cb], accumulate_grad_batches=acc)
        tr.fit(model, DataLoader(data, batch_size=bs))
        assert cb.penalty_steps == tr.global_step == 8
        finals.append(_params(model))
    for n in finals[0]:  # fp32 sum order of the accumulated task gradient only
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_with_accumulation():
    data = EX.make_task(1, n=32, seed=3)
    finals = []
    for lam in (0.0, 20.0):
        model, ewc = _consolidated(lam=lam)
        cb = ConsolidationCallback(ewc=ewc, importance_data=DataLoader(data, batch_size=8))
        tr = EX.trainer(1, callbacks=[cb], accumulate_grad_batches=2, precision="bf16-mixed")
        tr.fit(model, DataLoader(data, batch_size=4))
        assert cb.penalty_steps == tr.global_step == 4 and ewc.n_tasks == 2
        assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
        finals.append(_params(model))
    assert any(not torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_si_reads_the_gradients_of_each_step_under_automatic_optimization():
    """Lightning runs the backward inside optimizer.step(closure): SI's step pre-hook would read the
    previous step's gradients. The callback captures them in on_before_optimizer_step instead; the
    path integral equals the one of a plain loop over the same batches."""
    data = EX.make_task(1, n=24, seed=3)
    model = EX.Classifier(lr=1e-2)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    si = ewc_fast.SynapticIntelligence(model)
    cb = ConsolidationCallback(ewc=ewc_fast.EWC(model, lam=1.0), si=si, importance="si")
    EX.trainer(1, callbacks=[cb]).fit(model, DataLoader(data, batch_size=8))
    assert si.n_tasks == 1 and cb.ewc.n_tasks == 1  # SI consolidated into EWC at fit's end
    lightning_omega = si.cumulative

    ref = EX.Classifier(lr=1e-2)
    ref.load_state_dict(init)
    ref_si = ewc_fast.SynapticIntelligence(ref)
    opt = ref.configure_optimizers()
    ref_si.attach(opt)
    for x, y in DataLoader(data, batch_size=8):
        opt.zero_grad()
        ref.training_step((x, y), 0).backward()
        opt.step()
    ref_omega = ref_si.consolidate()
    for n in ref_omega:
        torch.testing.assert_close(lightning_omega[n], ref_omega[n], rtol=1e-6, atol=1e-9)


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    """ModelCheckpoint saves after each epoch (the callback's state_dict inside); a fresh process (other
    init, empty EWC/SI) resuming from the epoch-0 checkpoint ends bit-identical to the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = EX.make_task(1, n=24, seed=3)

    def fresh(seed=0):
        model, ewc = _consolidated(seed=seed)
        si = ewc_fast.SynapticIntelligence(model)
        return model, ConsolidationCallback(ewc=ewc, si=si, importance="si")

    model, cb = fresh()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    EX.trainer(2, callbacks=[cb, saver], enable_checkpointing=True).fit(model, DataLoader(data, batch_size=8))
    full, full_ewc = _params(model), cb.ewc.state_dict()
    ckpt = tmp_path / "epoch=0.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("ConsolidationCallback" in k for k in state)  # Lightning stored the callback's state_dict

    model2, cb2 = fresh(seed=5)
    EX.trainer(2, callbacks=[cb2]).fit(model2, DataLoader(data, batch_size=8), ckpt_path=ckpt)
    assert cb2.ewc.n_tasks == full_ewc["n_tasks"] == 2 and cb2.penalty_steps == 3
    for n, p in _params(model2).items():
        assert torch.equal(p, full[n]), n
    for k in ("omega", "mu"):
        for n, t in cb2.ewc.state_dict()[k].items():
            assert torch.equal(t, full_ewc[k][n]), (k, n)


def test_end_task_and_errors():
    model, ewc = _consolidated()
    data = DataLoader(EX.make_task(1, n=16, seed=3), batch_size=8)
    cb = ConsolidationCallback(ewc=ewc)
    imp = cb.end_task(model, data)
    direct = ewc_fast.estimate_importance(model, data, progress=False)["fisher"]
    assert all(torch.equal(imp[n], direct[n]) for n in imp) and ewc.n_tasks == 2
    with pytest.raises(ValueError, match="Consolidator.load_state_dict"):
        cb.load_state_dict({"format": "something else"})
    with pytest.raises(ValueError, match=r"the state holds \['ewc', 'si'\]"):
        cb.load_state_dict({"format": "ewc_fast.integrations.Consolidator", "version": 1, "ewc": {}, "si": {}})


class _SGDClassifier(EX.Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_wva_attenuates_every_lightning_step():
    """WVA (no penalty): each SGD step becomes -lr * g / (1 + lam * A), A the accumulated importance."""
    data = EX.make_task(1, n=8, seed=3)
    model = _SGDClassifier(lr=0.1)
    wva = ewc_fast.WVA(model, lam=3.0)
    imp = ewc_fast.estimate_importance(model, DataLoader(EX.make_task(0, n=16), batch_size=8), progress=False)
    wva.consolidate(imp["fisher"])
    before = _params(model)
    x, y = data.tensors
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: before[n] - 0.1 * p.grad / (1 + 3.0 * wva.accum[n]) for n, p in model.named_parameters()}
    plain = {n: before[n] - 0.1 * p.grad for n, p in model.named_parameters()}
    assert any(not torch.allclose(plain[n], expected[n], rtol=1e-4) for n in plain)  # the attenuation shows
    cb = ConsolidationCallback(wva=wva)
    EX.trainer(1, callbacks=[cb]).fit(model, DataLoader(data, batch_size=8))
    assert not wva.attached  # unhooked at fit's end
    for n, p in model.named_parameters():
        # the op computes old + (new - old)/(1 + lam*A) in fp32: a few ulps from the formula above
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)


def test_fused_optimizer_from_configure_optimizers():
    """An ewc_fast.optim.SGD holding the EWC and the SI tracker: the callback neither adds the penalty
    nor hooks SI (the step does both); same parameters and SI importance as the hook path."""
    optim = pytest.importorskip("ewc_fast.optim", reason="the fused optimizers (ewc_fast.optim) are not in this tree")
    data = EX.make_task(1, n=24, seed=3)
    results = []
    for fused in (False, True):
        model, ewc = _consolidated()
        si = ewc_fast.SynapticIntelligence(model)
        if fused:
            model.configure_optimizers = lambda m=model, e=ewc, s=si: optim.SGD(m.parameters(), lr=0.05, ewc=e, si=s)
        else:
            model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.05)
        cb = ConsolidationCallback(ewc=ewc, si=si, importance="si")
        EX.trainer(1, callbacks=[cb]).fit(model, DataLoader(data, batch_size=8))
        assert ewc.n_tasks == 2 and cb.penalty_steps == 3
        results.append((_params(model), cb.consolidator.last_importance))
    for n in results[0][0]:
        torch.testing.assert_close(results[1][0][n], results[0][0][n], rtol=1e-6, atol=1e-7)
        # SI sums g*dtheta over the steps with cancellation; the fused step forms dtheta from its own
        # update, the hooks from fp32 theta_after - theta_before: elements near 0 differ by ulps of the
        # largest terms (measured: 1.6e-9 absolute, 3e-5 relative, on one element of 256)
        ref = results[0][1][n]
        torch.testing.assert_close(results[1][1][n], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
