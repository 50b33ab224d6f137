"""Hugging Face workloads of the comparison benchmark: third-party models as users bring them.

Tiny random configs of five transformers families (built offline from a config, no download; one
table of options per family, :data:`_FAMILIES` / :data:`_EXTRA`), each a classification problem like
every workload of :mod:`benchmarks.workloads` (integer labels, per-sample cross-entropy of the logits)
except the language model, so that every contender and the oracle compute the same quantities:

* ``hf-gpt2``: ``GPT2ForSequenceClassification`` (``Conv1D`` projections, learned ``(1, T)``
  position embeddings, logits of the last token picked by an advanced index);
* ``hf-llama``: ``LlamaForSequenceClassification`` (RMSNorm classes, rotary embeddings, grouped-query
  attention, SwiGLU MLP);
* ``hf-bert``: ``BertForSequenceClassification`` (token type and position embeddings, pooler);
* ``hf-t5``: ``T5EncoderModel`` + mean pool + linear head (relative attention bias on a shared
  ``(T, T)`` bucket matrix, T5's RMS layer norm, gated-free ReLU feed-forward). The encoder-decoder
  ``T5ForSequenceClassification`` picks its sentence vector with a boolean ``eos`` mask, which mixes
  the samples' positions (data-dependent shapes), so the encoder is benchmarked;
* ``hf-vit``: ``ViTForImageClassification`` on 64x128 images in 8x8 patches (128 patches + cls token);
* ``hf-gpt2-lm``: ``GPT2LMHeadModel`` with ``lm_head.weight`` tied to ``wte.weight`` (one parameter used
  by an ``nn.Embedding`` and by ``F.linear`` in the head: ewc_fast's tied path sums the per-sample
  gradients of both uses before squaring), next-token labels (the inputs), per-sample loss the sum of
  the shifted token NLLs (:func:`causal_lm_token_nll`, the model's own loss up to the mean).

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

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .workloads import Workload


def _wl():
    """:mod:`benchmarks.workloads` (imported late: it registers this module's workloads on import)."""
    from . import workloads

    return workloads


HF_WORKLOADS = ("hf-gpt2", "hf-llama", "hf-bert", "hf-t5", "hf-vit", "hf-gpt2-lm")


class HFLogits(nn.Module):
    """``model(**{key: x}).logits``: a Hugging Face model as a tensor-in, logits-out module.
    ``causal_lm``: the wrapper says it is a causal language model (``loss_type``), as the model it wraps
    does, so that ewc_fast's default loss shifts the labels like the workload's loss."""

    def __init__(self, model: nn.Module, key: str = "input_ids", causal_lm: bool = False):
        super().__init__()
        self.model, self.key = model, key
        if causal_lm:
            self.loss_type = "ForCausalLM"

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


#: config class, model class and the keyword names of each family (d, layers, heads, FFN, vocabulary,
#: positions); None: the family has no such option
_FAMILIES = {
    "gpt2": (
        "GPT2Config",
        "GPT2ForSequenceClassification",
        ("n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions"),
    ),
    "gpt2-lm": (
        "GPT2Config",
        "GPT2LMHeadModel",
        ("n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions"),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForSequenceClassification",
        (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ),
    ),
    "bert": (
        "BertConfig",
        "BertForSequenceClassification",
        (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ),
    ),
    "t5": ("T5Config", "T5EncoderModel", ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size", None)),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", None, None),
    ),
}
#: family-specific options besides the common ones (dropout off everywhere: train and eval mode agree)
_EXTRA = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=10, pad_token_id=0),
    "gpt2-lm": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True),
    "llama": dict(num_labels=10, pad_token_id=0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10),
    "t5": dict(dropout_rate=0.0),
    "vit": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10, num_channels=3),
}


def _config(T, family: str, k: dict):
    """The tiny random config of ``family`` at the sizes ``k`` (:func:`_dims`)."""
    cfg_cls, _, keys = _FAMILIES[family]
    ffn = k["ffn_llama"] if family == "llama" else k["ffn"]
    values = (k["d"], k["layers"], k["heads"], ffn, k["vocab"], k["t"])
    kw = {key: v for key, v in zip(keys, values) if key is not None}
    kw.update(_EXTRA[family])
    if family == "llama":
        kw["num_key_value_heads"] = max(1, k["heads"] // 2)
    if family == "t5":
        kw["d_kv"] = k["d"] // k["heads"]
    if family == "vit":
        kw.update(image_size=k["img"], patch_size=k["patch"])
    return getattr(T, cfg_cls)(**kw)


def _build(family: str, k: dict) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        T = _transformers()
        cfg = _config(T, family, k)
        model = getattr(T, _FAMILIES[family][1])(cfg)
        if family == "t5":
            return T5EncoderClassifier(model, k["d"], 10)
        if family == "gpt2-lm":
            assert model.lm_head.weight is model.transformer.wte.weight  # the tied parameter under test
            return HFLogits(model, causal_lm=True)
        return HFLogits(model, "pixel_values" if family == "vit" else "input_ids")

    return make


def causal_lm_token_nll(logits, target):
    """Per-sample loss of the causal-LM workload: sum over positions t of -log p(target[t + 1] | x_<=t),
    shape (N,) (the labels shifted by one, as the model's own loss and ewc_fast's default for causal LMs)."""
    n, c = logits.shape[0], logits.shape[-1]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, c), target[:, 1:].reshape(-1), reduction="none")
    return tok.view(n, -1).sum(1)


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
            "gpt2-lm": "GPT2LMHeadModel (wte tied to lm_head), causal-LM labels = the inputs, token NLLs summed",
            "llama": "LlamaForSequenceClassification",
            "bert": "BertForSequenceClassification",
            "t5": "T5EncoderModel + mean pool + linear head",
        }
        title = f"{names[family]}, d={d}, {layers} layers, vocabulary {k['vocab']}, T={t}"
        inputs = _ids(k["vocab"], t)
    wl = (_lm_workload() if family == "gpt2-lm" else _wl().Workload)(
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


@functools.cache
def _lm_workload() -> type:
    """A :class:`~benchmarks.workloads.Workload` whose labels are its inputs (next-token prediction)
    and whose per-sample loss is :func:`causal_lm_token_nll` (made late: see :func:`_wl`)."""

    class LMWorkload(_wl().Workload):
        loss_per_sample = staticmethod(causal_lm_token_nll)

        def make_batches(self, device="cpu", dtype=torch.float32):
            return [(x, x.clone()) for x, _ in super().make_batches(device, dtype)]

    return LMWorkload


HF_FACTORIES: dict[str, Callable[[str], Workload]] = {
    name: (lambda s, fam=name[3:]: _hf(fam, s)) for name in HF_WORKLOADS
}
