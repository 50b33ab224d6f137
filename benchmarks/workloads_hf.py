"""Hugging Face workloads of the comparison benchmark: third-party models as users bring them.

Tiny random configs of five transformers families (built offline from a config, no download), each
a classification problem like every workload of :mod:`benchmarks.workloads` (integer labels,
per-sample cross-entropy of the logits), so that every contender and the oracle compute the same
quantities:

* ``hf-gpt2``: ``GPT2ForSequenceClassification`` (``Conv1D`` projections, learned ``(1, T)``
  position embeddings, logits of the last token picked by an advanced index);
* ``hf-llama``: ``LlamaForSequenceClassification`` (RMSNorm classes, rotary embeddings, grouped-query
  attention, SwiGLU MLP);
* ``hf-bert``: ``BertForSequenceClassification`` (token type and position embeddings, pooler);
* ``hf-t5``: ``T5EncoderModel`` + mean pool + linear head (relative attention bias on a shared
  ``(T, T)`` bucket matrix, T5's RMS layer norm, gated-free ReLU feed-forward). The encoder-decoder
  ``T5ForSequenceClassification`` picks its sentence vector with a boolean ``eos`` mask, which mixes
  the samples' positions (data-dependent shapes), so the encoder is benchmarked;
* ``hf-vit``: ``ViTForImageClassification`` on 64x128 images in 8x8 patches (128 patches + cls token).

Full size: d=256, 4 layers, 4 heads, FFN 1024 (Llama: 688, 2 key/value heads), vocabulary 8000,
T=128, 3-6M parameters; 16 samples in batches of 8. Dropout probabilities are 0 (train and eval mode
compute the same function: Opacus measures in train mode). The wrapper :class:`HFLogits` returns the
output's ``.logits`` tensor, so peers that need a tensor-valued model run too; ewc_fast reads
``ModelOutput.logits`` by itself (tested in ``tests/estimation/test_hf.py``).

The oracle of these workloads is the float64 per-sample loop (``oracle="loop"``,
:mod:`ewc_fast.testing.per_sample`): ``torch.func`` cannot run every transformers forward under
``vmap``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .workloads import Workload


def _wl():
    """:mod:`benchmarks.workloads` (imported late: it registers this module's workloads on import)."""
    from . import workloads

    return workloads


HF_WORKLOADS = ("hf-gpt2", "hf-llama", "hf-bert", "hf-t5", "hf-vit")


class HFLogits(nn.Module):
    """``model(**{key: x}).logits``: a Hugging Face model as a tensor-in, logits-out module."""

    def __init__(self, model: nn.Module, key: str = "input_ids"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


class T5EncoderClassifier(nn.Module):
    """``T5EncoderModel`` hidden states, mean over positions, linear head."""

    def __init__(self, encoder: nn.Module, d: int, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(d, n_classes)

    def forward(self, input_ids):
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(1))


def _dims(size: str) -> dict:
    if size == "full":
        return dict(
            d=256, layers=4, heads=4, ffn=1024, ffn_llama=688, vocab=8000, t=128, n=16, b=8, img=(64, 128), patch=8
        )
    if size == "small":
        return dict(
            d=128, layers=2, heads=4, ffn=512, ffn_llama=344, vocab=2000, t=64, n=16, b=8, img=(32, 64), patch=8
        )
    return dict(d=32, layers=2, heads=2, ffn=64, ffn_llama=48, vocab=100, t=16, n=8, b=4, img=(16, 16), patch=4)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return transformers


def _ids(vocab: int, t: int):
    def fn(n, g):  # token ids 1..vocab-1 (0 is the padding id: never generated, so no sample is padded)
        return torch.randint(1, vocab, (n, t), generator=g)

    return fn


def _build(family: str, k: dict) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        T = _transformers()
        d, layers, heads, ffn, vocab, t = k["d"], k["layers"], k["heads"], k["ffn"], k["vocab"], k["t"]
        if family == "gpt2":
            cfg = T.GPT2Config(
                vocab_size=vocab,
                n_positions=t,
                n_embd=d,
                n_layer=layers,
                n_head=heads,
                n_inner=ffn,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                num_labels=10,
                pad_token_id=0,
            )
            return HFLogits(T.GPT2ForSequenceClassification(cfg))
        if family == "llama":
            cfg = T.LlamaConfig(
                vocab_size=vocab,
                hidden_size=d,
                intermediate_size=k["ffn_llama"],
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=t,
                num_labels=10,
                pad_token_id=0,
            )
            return HFLogits(T.LlamaForSequenceClassification(cfg))
        if family == "bert":
            cfg = T.BertConfig(
                vocab_size=vocab,
                hidden_size=d,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=ffn,
                max_position_embeddings=t,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=10,
            )
            return HFLogits(T.BertForSequenceClassification(cfg))
        if family == "t5":
            cfg = T.T5Config(
                vocab_size=vocab,
                d_model=d,
                d_kv=d // heads,
                d_ff=ffn,
                num_layers=layers,
                num_heads=heads,
                dropout_rate=0.0,
            )
            return T5EncoderClassifier(T.T5EncoderModel(cfg), d, 10)
        if family == "vit":
            cfg = T.ViTConfig(
                image_size=k["img"],
                patch_size=k["patch"],
                num_channels=3,
                hidden_size=d,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=ffn,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=10,
            )
            return HFLogits(T.ViTForImageClassification(cfg), "pixel_values")
        raise KeyError(family)

    return make


def _hf(family: str, size: str) -> Workload:
    k = _dims(size)
    d, layers, t = k["d"], k["layers"], k["t"]
    if family == "vit":
        h, w = k["img"]
        p = k["patch"]
        tokens = (h // p) * (w // p)
        title = (
            f"ViTForImageClassification, {h}x{w} images in {p}x{p} patches (T={tokens} + cls), d={d}, {layers} layers"
        )
        inputs = _wl()._gauss(3, h, w)
    else:
        names = {
            "gpt2": "GPT2ForSequenceClassification",
            "llama": "LlamaForSequenceClassification",
            "bert": "BertForSequenceClassification",
            "t5": "T5EncoderModel + mean pool + linear head",
        }
        title = f"{names[family]}, d={d}, {layers} layers, vocabulary {k['vocab']}, T={t}"
        inputs = _ids(k["vocab"], t)
    wl = _wl().Workload(
        f"hf-{family}",
        title,
        "hf",
        size,
        _build(family, k),
        inputs,
        k["n"],
        k["b"],
        sequence=True,
        oracle="loop",
    )
    return wl


HF_FACTORIES: dict[str, Callable[[str], Workload]] = {
    name: (lambda s, fam=name[3:]: _hf(fam, s)) for name in HF_WORKLOADS
}
