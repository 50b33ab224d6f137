"""Hugging Face Trainer callback (ewc_fast.integrations.hf) on a real transformers Trainer with a tiny
random-init Llama classifier (examples/hf_trainer_continual.py builds it; nothing is downloaded).

The task-end Fisher comes from ``estimate_importance`` on the Trainer's own batch dicts (``labels`` as
targets, ``ModelOutput.logits`` as outputs)."""

import copy
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ewc_fast  # noqa: E402
from ewc_fast.integrations.common import Consolidator  # noqa: E402
from ewc_fast.integrations.hf import STATE_FOLDER, ConsolidationCallback  # noqa: E402
from tests.helpers import load_example  # noqa: E402

EX = load_example("hf_trainer_continual")


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train(model, args, data, callbacks, **train_kw):
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.train(**train_kw)
    return trainer


def _fisher_of(model, data, size=8):
    """The Fisher of ``data`` from Trainer-style batch dicts of ``size`` samples."""
    batches = [
        {"input_ids": data.ids[i : i + size], "labels": data.labels[i : i + size]} for i in range(0, len(data), size)
    ]
    return ewc_fast.estimate_importance(model, batches, progress=False)["fisher"]


def _consolidated_model(lam=1e4):
    """A model with EWC consolidated on task 0's Fisher, then moved away from the anchor."""
    model = EX.make_model(0)
    ewc = ewc_fast.EWC(model, lam=lam)
    ewc.consolidate(_fisher_of(model, EX.TokenTask(0, 16, seed=1)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, ewc


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _Probe(TrainerCallback):
    """Records the total gradient norm the optimizer will see (runs after the callbacks before it)."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_the_multitask_recipe_reduces_forgetting():
    """The documented recipe (a loop over tasks calling trainer.train()), end to end on 2 tasks."""
    res = EX.main(["--tasks", "2", "--steps", "30"])
    plain, ewc = res["forgetting_plain"], res["forgetting_ewc"]
    assert plain > 1.0, res  # the tasks conflict: plain fine-tuning forgets task 1
    assert ewc < 0.6 * plain, res  # measured 2.1 vs 4.6
    assert res["loss_ewc"][-1][-1] < 0.5, res  # and the last task is still learnt


def test_penalty_once_per_optimizer_step_whatever_the_accumulation(tmp_path):
    """bs 4 x 1 and bs 2 x 2 accumulation steps see the same samples per optimizer step (same
    sampler seed): with the penalty added once per optimizer step they train the same parameters."""
    data = EX.TokenTask(1, 16, seed=5)
    finals, steps = [], []
    for bs, ga in ((4, 1), (2, 2)):
        model, ewc = _consolidated_model()
        cb = ConsolidationCallback(ewc=ewc)
        tr = _train(
            model,
            _args(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=4),
            data,
            [cb],
        )
        assert cb.penalty_steps == tr.state.global_step == 4
        finals.append(_params(model))
        steps.append(cb.last_penalty)
    # same samples, same penalty: the results differ only by the order of fp32 sums in the accumulated
    # task gradient (a few ulps after 4 Adam steps)
    for n in finals[0]:
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=1e-5, atol=1e-6)
    model, _ = _consolidated_model()
    _train(model, _args(tmp_path / "none", max_steps=4), data, [])
    assert any(not torch.allclose(model.state_dict()[n], finals[0][n], atol=1e-4) for n in finals[0])


def test_clipping_order_trainer_clips_before_the_penalty_unless_the_callback_clips(tmp_path):
    data = EX.TokenTask(1, 16, seed=5)
    model, ewc = _consolidated_model(lam=1e6)
    probe = _Probe()
    _train(model, _args(tmp_path / "a", max_grad_norm=0.01, max_steps=2), data, [ConsolidationCallback(ewc=ewc), probe])
    assert min(probe.norms) > 0.1  # the penalty gradient came after the Trainer's clipping to 0.01
    model, ewc = _consolidated_model(lam=1e6)
    probe = _Probe()
    cb = ConsolidationCallback(ewc=ewc, clip_grad_norm=0.01)
    _train(model, _args(tmp_path / "b", max_grad_norm=0, max_steps=2), data, [cb, probe])
    assert max(probe.norms) <= 0.01 * (1 + 1e-5)  # task + penalty clipped together
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        _train(model, _args(tmp_path / "c", max_grad_norm=1.0, max_steps=1), data, [cb])


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """EWC + SI state is saved in each checkpoint folder; a fresh process (new model, new empty EWC/SI,
    new callback) resuming from step 3 ends bit-identical to the run that was never interrupted."""
    task0, task1 = EX.TokenTask(0, 16, seed=1), EX.TokenTask(1, 16, seed=2)

    def fresh(seed):
        model = EX.make_model(seed)
        ewc = ewc_fast.EWC(model, lam=50.0)
        si = ewc_fast.SynapticIntelligence(model, xi=0.1)
        return model, ConsolidationCallback(ewc=ewc, si=si, importance="si")

    model, cb = fresh(0)
    _train(model, _args(tmp_path / "t0", max_steps=3), task0, [cb])  # task 0; SI -> EWC at the end
    assert cb.ewc.n_tasks == 1
    start = copy.deepcopy(model.state_dict())
    out = tmp_path / "t1"
    _train(model, _args(out, max_steps=6, save_strategy="steps", save_steps=3), task1, [cb])
    full_params, full_ewc = _params(model), cb.ewc.state_dict()
    assert (out / "checkpoint-3" / STATE_FOLDER / "ewc.safetensors").is_file()
    assert (out / "checkpoint-3" / STATE_FOLDER / "si.safetensors").is_file()

    model2, cb2 = fresh(7)  # another init: the checkpoint brings the weights, the callback the state
    model2.load_state_dict(start)
    _train(
        model2,
        _args(out, max_steps=6, save_strategy="steps", save_steps=3),
        task1,
        [cb2],
        resume_from_checkpoint=str(out / "checkpoint-3"),
    )
    assert cb2.ewc.n_tasks == 2 and cb2.penalty_steps == 3
    for n, p in _params(model2).items():
        assert torch.equal(p, full_params[n]), n
    for k in ("omega", "mu"):
        for n, t in cb2.ewc.state_dict()[k].items():
            assert torch.equal(t, full_ewc[k][n]), (k, n)

    # a resume that cannot find the state refuses instead of silently training without it
    model3, cb3 = fresh(0)
    for f in (out / "checkpoint-3" / STATE_FOLDER).iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="holds no consolidation state"):
        _train(model3, _args(out, max_steps=6), task1, [cb3], resume_from_checkpoint=str(out / "checkpoint-3"))


def test_bf16_mixed_precision_on_cpu(tmp_path):
    data = EX.TokenTask(1, 16, seed=5)
    results = []
    for lam in (0.0, 1e4):
        model, ewc = _consolidated_model(lam=lam)
        cb = ConsolidationCallback(ewc=ewc, importance_data=data)
        tr = _train(model, _args(tmp_path / str(lam), bf16=True, max_steps=3), data, [cb])
        assert cb.penalty_steps == tr.state.global_step == 3 and ewc.n_tasks == 2  # task end ran too
        assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
        results.append(_params(model))
    assert any(not torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_grad_scaler_gradients_are_unscaled_before_the_penalty():
    """An fp16 GradScaler keeps gradients scaled until unscale_; the penalty (unscaled units) must come
    after. The wrapper stands in for accelerate's AcceleratedOptimizer (``.optimizer`` + ``.scaler``):
    fp16 Trainer runs need a GPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ewc = ewc_fast.EWC(model, lam=2.0)
    ewc.consolidate(
        ewc_fast.Importance({n: torch.rand_like(p) for n, p in model.named_parameters()}, method="x", n_samples=1)
    )
    with torch.no_grad():
        model.weight.add_(0.3)
    x = torch.randn(5, 4)

    def task_grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected_task = task_grads()
    model.zero_grad()
    expected_pen = ewc.apply_()
    expected = [p.grad.clone() for p in model.parameters()]  # penalty gradient alone
    for already_unscaled in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        wrapper = types.SimpleNamespace(optimizer=opt, scaler=scaler)
        model.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if already_unscaled:
            scaler.unscale_(opt)  # e.g. the Trainer's clipping did it
        value = Consolidator(ewc=ewc).before_step(wrapper)
        assert value == pytest.approx(float(expected_pen), rel=1e-12)
        for p, t, e in zip(model.parameters(), expected_task, expected):
            torch.testing.assert_close(p.grad, t + e, rtol=1e-6, atol=1e-7)
        scaler.step(opt)  # does not unscale twice
        scaler.update()


def test_end_task_needs_data_and_argument_errors(tmp_path):
    model, ewc = _consolidated_model()
    cb = ConsolidationCallback(ewc=ewc)  # no importance_data: no automatic task end
    _train(model, _args(tmp_path, max_steps=1), EX.TokenTask(1, 8, seed=5), [cb])
    assert ewc.n_tasks == 1
    with pytest.raises(ValueError, match="name the task's data"):
        cb.end_task()
    cb2 = ConsolidationCallback(ewc=ewc)
    data = EX.TokenTask(1, 8, seed=5)
    imp = cb2.end_task(model, data=data)  # a Dataset: batched with the default collator
    assert imp.method == "fisher" and imp.n_samples == 8 and ewc.n_tasks == 2
    direct = _fisher_of(model, data)
    assert all(torch.equal(imp[n], direct[n]) for n in imp)
    with pytest.raises(ValueError, match="give ewc= and/or wva="):
        ConsolidationCallback()
    with pytest.raises(ValueError, match="importance='si' needs si="):
        ConsolidationCallback(ewc=ewc, importance="si")
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        ConsolidationCallback(ewc=ewc, clip_grad_norm=0.0)


class _LMData(torch.utils.data.Dataset):
    """Token sequences for a causal LM; the last two labels of odd rows are ignored (-100)."""

    def __init__(self, n=8, t=6, vocab=37, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, t), generator=g)
        self.labels = self.ids.clone()
        self.labels[1::2, -2:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("family", ["gpt2", "lora"])
def test_causal_lm_and_lora_through_the_trainer(tmp_path, family):
    """A tiny GPT-2 LM head model and a PEFT LoRA Llama: EWC on the trainable parameters only (LoRA: the
    adapters), the task-end Fisher from the Trainer's own batch dicts with the causal-LM label shift,
    equal to estimate_importance on the same batches."""
    if family == "lora":
        pytest.importorskip("peft")
    from tests.helpers import hf_model

    model = hf_model(family).train()
    data = _LMData()
    ewc = ewc_fast.EWC(model, lam=10.0)
    cb = ConsolidationCallback(ewc=ewc, importance_data=data, importance_batch_size=4)
    _train(model, _args(tmp_path, max_steps=2), data, [cb])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ewc.n_tasks == 1 and set(ewc.names) == trainable
    if family == "lora":
        assert all("lora_" in n for n in trainable)
    batches = [{"input_ids": data.ids[i : i + 4], "labels": data.labels[i : i + 4]} for i in (0, 4)]
    direct = ewc_fast.estimate_importance(model, batches, progress=False)["fisher"]
    assert cb.consolidator.last_importance.n_samples == 8
    for n in direct:
        torch.testing.assert_close(cb.consolidator.last_importance[n], direct[n], rtol=0, atol=0)
    # a second task: the penalty is applied on every optimizer step
    _train(model, _args(tmp_path / "b", max_steps=2), data, [cb])
    assert cb.penalty_steps == 4 and cb.last_penalty is not None and ewc.n_tasks == 2


def test_fused_optimizer_passed_by_the_user(tmp_path):
    """Trainer(optimizers=(ewc_fast.optim.AdamW(..., ewc=ewc), None)): the optimizer adds the penalty
    inside its step, so the callback adds nothing (it would count twice); same parameters as the hook
    path (torch's single-tensor AdamW + the callback's EWC.apply_)."""
    optim = pytest.importorskip("ewc_fast.optim", reason="the fused optimizers (ewc_fast.optim) are not in this tree")
    data = EX.TokenTask(1, 16, seed=5)
    finals = []
    for fused in (False, True):
        model, ewc = _consolidated_model()
        if fused:
            opt = optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0, ewc=ewc)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0, foreach=False)
        cb = ConsolidationCallback(ewc=ewc)
        trainer = Trainer(
            model=model,
            args=_args(tmp_path / str(fused), max_steps=3),
            train_dataset=data,
            callbacks=[cb],
            optimizers=(opt, None),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        assert cb.penalty_steps == 3 and cb.last_penalty is not None
        if fused:
            assert cb.consolidator.fused_by(opt) == {"ewc"}
        finals.append(_params(model))
    for n in finals[0]:  # the fused step reproduces torch's single-tensor AdamW + apply_ (up to fp32 order)
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=1e-6, atol=1e-7)
