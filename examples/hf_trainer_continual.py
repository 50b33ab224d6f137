"""Continual fine-tuning with the Hugging Face Trainer and EWC: the multi-task recipe.

A loop over tasks calling ``trainer.train()``; ``ConsolidationCallback`` adds the EWC gradient once per
optimizer step and, at the end of each task, estimates the exact per-sample Fisher on that task's data
and consolidates it. The script trains the same tiny random-init Llama classifier twice, without and
with the callback, on tasks whose labels conflict, and prints how much of task 1 is forgotten.

    python examples/hf_trainer_continual.py            # a few seconds on a CPU
    python examples/hf_trainer_continual.py --tasks 3 --steps 60

Everything is built locally (a ``LlamaConfig``, synthetic token data): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, PrinterCallback, Trainer, TrainingArguments

import ewc_fast
from ewc_fast.integrations.hf import ConsolidationCallback

MAX_TASKS, CLASSES, WIDTH, LENGTH = 4, 3, 6, 6
VOCAB = 1 + MAX_TASKS + CLASSES * WIDTH


class TokenTask(Dataset):
    """Task ``k``: a task marker token, then tokens drawn from class ``c``'s block of the vocabulary
    (the same blocks in every task); the label is ``(c + k) % CLASSES``. A model can solve all tasks
    at once (by reading the marker), but fine-tuning on task k alone overwrites the class mapping of
    the earlier tasks."""

    def __init__(self, task: int, n: int, seed: int):
        if not 0 <= task < MAX_TASKS:
            raise ValueError(f"task must be in [0, {MAX_TASKS}), got {task}")
        g = torch.Generator().manual_seed(seed)
        cls = torch.randint(0, CLASSES, (n,), generator=g)
        tokens = 1 + MAX_TASKS + cls[:, None] * WIDTH + torch.randint(0, WIDTH, (n, LENGTH - 1), generator=g)
        self.ids = torch.cat([torch.full((n, 1), 1 + task), tokens], dim=1)
        self.labels = (cls + task) % CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def make_model(seed: int = 0) -> LlamaForSequenceClassification:
    """A tiny random-init Llama sequence classifier (about 6k parameters)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg)


def task_loss(model, data: TokenTask) -> float:
    """Mean cross-entropy of ``model`` on ``data``."""
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(input_ids=data.ids).logits, data.labels))


def run(tasks: int, steps: int, lam: float | None, out_dir: str, seed: int = 0) -> list[list[float]]:
    """Train on ``tasks`` tasks in sequence; ``lam=None``: plain fine-tuning. Returns L[i][j], the loss on
    task j after training task i."""
    model = make_model(seed)
    train = [TokenTask(k, 64, seed=100 + k) for k in range(tasks)]
    test = [TokenTask(k, 128, seed=200 + k) for k in range(tasks)]
    callbacks = []
    if lam is not None:
        # --- the recipe: ≤10 lines of user code ---
        ewc = ewc_fast.EWC(model, lam=lam)
        cb = ConsolidationCallback(ewc=ewc, importance="fisher")  # exact per-sample Fisher of the task
        callbacks.append(cb)
    losses = []
    for k in range(tasks):
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, f"task{k}"),  # one folder per task: checkpoint numbers restart
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=seed,
        )
        if lam is not None:
            cb.importance_data = train[k]  # the Fisher of task k, estimated when train() ends
        trainer = Trainer(model=model, args=args, train_dataset=train[k], callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # keep the example's output short
        trainer.train()
        losses.append([task_loss(model, t) for t in test])
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per task")
    # The empirical Fisher of a well-fit model is small (its per-sample gradients are), hence a large lam.
    ap.add_argument("--lam", type=float, default=1e6, help="EWC strength (penalty (lam/2) sum F (theta - theta*)^2)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(args.tasks, args.steps, None, os.path.join(tmp, "plain"))
        ewc = run(args.tasks, args.steps, args.lam, os.path.join(tmp, "ewc"))
    result = {"loss_plain": plain, "loss_ewc": ewc}
    for name, L in (("plain", plain), ("ewc", ewc)):
        forgetting = L[-1][0] - L[0][0]
        result[f"forgetting_{name}"] = forgetting
        print(
            f"{name:5s}: task-1 loss after task 1 {L[0][0]:.3f}, after the last task {L[-1][0]:.3f} "
            f"(forgetting {forgetting:+.3f}); last task's loss {L[-1][-1]:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
