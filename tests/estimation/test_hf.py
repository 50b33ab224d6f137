"""Real third-party models (tiny random Hugging Face configs, built offline, PEFT LoRA) against the
float64 per-sample loop oracle (ewc_fast.testing.per_sample), with the models' default arguments:
ModelOutput outputs (.logits), dict batches with labels, causal-LM label shift, (1, T) position ids,
GPT-2's Conv1D, RMSNorm classes, BART's scaled tied embedding, T5's relative attention bias, ViT's
cls token and position embeddings, LoRA layers. No parameter may fall back to torch.func."""

import pytest
import torch

import ewc_fast
from ewc_fast.estimation.api import is_causal_lm
from ewc_fast.testing.per_sample import loop_reference
from tests.helpers import HF, HF_FAMILIES, PEFT, device_params, hf_batches, hf_model, on_device

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(not HF, reason="transformers not installed")]

#: relative error per parameter in fp32 against the float64 oracle (fp32 rounding of sums over a few
#: hundred terms stays far below it)
TOL = 1e-5


def assert_close_hf(res, ref, what):
    """Relative error <= TOL per parameter. Some gradients are zero in exact arithmetic (an attention
    key bias: softmax is invariant to a shift of all scores), so fp32 and fp64 only differ in rounding
    noise there: such a parameter (reference below 1e-12 of the largest one) must be below 1e-6 of it."""
    scale = max(float(b.norm()) for b in ref.values())
    for k, b in ref.items():
        a = res[k].to("cpu", torch.float64)
        assert bool(torch.isfinite(a).all()), (what, k)
        if float(b.norm()) <= 1e-12 * scale:
            assert float(a.norm()) <= 1e-6 * scale, (what, k, float(a.norm()), scale)
            continue
        err = float((a - b).norm() / b.norm())
        assert err <= TOL, f"{what} {k}: relative error {err:.3g}"


def methods_of(name):
    return ("fisher", "mas") + (("fisher_exact",) if name in ("bert", "vit") else ("fisher_mc",))


@pytest.mark.parametrize("device", device_params(triton=True))
@pytest.mark.parametrize("name", HF_FAMILIES + ("lora",))
def test_hf_model_matches_loop_oracle(name, device, cuda_strict):
    """On a card: the oracle runs on the CPU copy, the estimate on the card ("auto": the Triton kernels;
    TF32 off). SDPA picks its CUDA kernels; in fp32 they stay far inside TOL."""
    if name == "lora" and not PEFT:
        pytest.skip("peft not installed")
    model, data = hf_model(name), hf_batches(name)
    methods = methods_of(name)
    ref = loop_reference(
        model, data, methods, label_shift=is_causal_lm(model), generator=torch.Generator().manual_seed(3)
    )
    if device != "cpu":
        model, data = model.to(device), on_device(data, device)
    res = ewc_fast.estimate_importance(model, data, methods, progress=False, generator=torch.Generator().manual_seed(3))
    for m in methods:
        assert res[m].n_samples == 6
        assert res[m].meta["fallback"] == {}, res[m].meta["fallback"]
        assert_close_hf(res[m], ref[m], f"{name}/{m}")


def test_causal_lm_label_shift_and_token_mean():
    """The default for a causal LM shifts the labels like the model's own loss; token_reduction='mean'
    averages each sequence's counted tokens; label_shift=False is honoured."""
    model, data = hf_model("gpt2"), hf_batches("gpt2", sizes=(3,))
    assert is_causal_lm(model)
    for shift, red in ((False, "sum"), (True, "mean")):
        res = ewc_fast.estimate_importance(
            model, data, "fisher", progress=False, label_shift=shift, token_reduction=red
        )
        ref = loop_reference(model, data, "fisher", label_shift=shift, token_reduction=red)
        assert_close_hf(res["fisher"], ref["fisher"], f"shift={shift}/{red}")
    # the model's own (batch-mean) loss equals the mean of our shifted per-token NLLs
    b = data[0]
    own = model(**b).loss
    logits = model(**b).logits
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(own, tok)


def test_tied_embedding_and_lm_head_is_exact():
    """GPT-2's LM head is the token embedding matrix (one parameter, two uses: ``nn.Embedding`` and
    the ``nn.Linear`` head). Its importance (per-sample gradients of both uses summed before squaring,
    causal-LM labels) is exact against the float64 loop, and reported once under the embedding's name."""
    from ewc_fast.estimation.plan import build_plan, discover
    from ewc_fast.estimation.tied import split_applies

    model, data = hf_model("gpt2"), hf_batches("gpt2", sizes=(3, 1))
    assert model.lm_head.weight is model.transformer.wte.weight
    trainable = list(model.named_parameters())
    ids = data[0]["input_ids"]
    plan = build_plan(model, trainable, discover(model, {"input_ids": ids}, {id(p) for _, p in trainable}, len(ids)))
    assert [t.full for t in plan.tied] == ["transformer.wte.weight"] and not plan.fallbacks
    assert split_applies(plan.tied[0].uses)  # the head through persample_sq_, a correction on the ids' rows
    methods = ("fisher", "mas", "fisher_mc")
    res = ewc_fast.estimate_importance(model, data, methods, progress=False, generator=torch.Generator().manual_seed(5))
    ref = loop_reference(model, data, methods, label_shift=True, generator=torch.Generator().manual_seed(5))
    for m in methods:
        assert "lm_head.weight" not in res[m]
        assert_close_hf({"w": res[m]["transformer.wte.weight"]}, {"w": ref[m]["transformer.wte.weight"]}, f"tied/{m}")
        assert_close_hf(res[m], ref[m], f"gpt2-lm/{m}")


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_batch_of_one_sample_is_exact(name):
    """A ragged last batch of one sample: transformers' mask code indexes the samples with
    ``batch_arange[:, None, None, None]``, all of whose dims have size 1 when N == 1."""
    model, data = hf_model(name), hf_batches(name, sizes=(2, 1))
    res = ewc_fast.estimate_importance(model, data, "fisher", progress=False)
    ref = loop_reference(model, data, "fisher", label_shift=is_causal_lm(model))
    assert res["fisher"].meta["fallback"] == {}
    assert_close_hf(res["fisher"], ref["fisher"], f"{name}/N=1")


def test_output_selector_and_clear_error():
    model, data = hf_model("bert"), hf_batches("bert", sizes=(2,))
    res = ewc_fast.estimate_importance(model, data, "mas", progress=False, output=lambda o: o.logits)
    ref = loop_reference(model, data, "mas")
    assert_close_hf(res["mas"], ref["mas"], "selector")
    with pytest.raises(ValueError, match="output='nope' is not an entry"):
        ewc_fast.estimate_importance(model, data, "mas", progress=False, output="nope")


@pytest.mark.parametrize("name", ["vit", "bart"])
def test_fallback_module_returning_what_it_consumes_is_exact(name, monkeypatch):
    """The double-count trap on real models: with the conv rules removed, ViT's patch projection goes
    to the torch.func fallback while the model returns every hidden state (output_hidden_states=True);
    with the embedding rules removed, BART's shared embedding (encoder, decoder, tied LM head) sends the
    whole model to the fallback, and the model returns the encoder output that its decoder consumes.
    No attention mask for BART: transformers' mask check is data-dependent control flow under vmap
    (see the next test)."""
    from torch import nn

    from ewc_fast.estimation.rules import base as rules_base
    from ewc_fast.estimation.rules import functional as rules_functional

    if name == "vit":
        monkeypatch.delitem(rules_base.RULES, nn.Conv2d)
        monkeypatch.delitem(rules_functional.FUNCTION_RULES, "conv2d")
        model, data = hf_model("vit"), hf_batches("vit", sizes=(4, 1))
        model.config.output_hidden_states = True
        expect = {
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.embeddings.patch_embeddings.projection.bias",
        }
    else:
        monkeypatch.delitem(rules_base.RULES, nn.Embedding)
        monkeypatch.delitem(rules_functional.FUNCTION_RULES, "embedding")
        model = hf_model("bart")
        data = [{k: v for k, v in b.items() if k != "attention_mask"} for b in hf_batches("bart", sizes=(4, 1))]
        expect = {"model.shared.weight", "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    methods = ("fisher", "mas")
    with pytest.warns(UserWarning, match="torch.func fallback"):
        res = ewc_fast.estimate_importance(model, data, methods, progress=False)
    assert set(res["fisher"].meta["fallback"]) == expect
    ref = loop_reference(model, data, methods)
    for m in methods:
        assert_close_hf(res[m], ref[m], f"{name}/{m}")


def test_fallback_that_cannot_run_under_vmap_names_the_module_and_parameters(monkeypatch):
    from torch import nn

    from ewc_fast.estimation.rules import base as rules_base
    from ewc_fast.estimation.rules import functional as rules_functional

    monkeypatch.delitem(rules_base.RULES, nn.Embedding)
    monkeypatch.delitem(rules_functional.FUNCTION_RULES, "embedding")
    model, data = hf_model("bart"), hf_batches("bart", sizes=(2,))
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ValueError,
            match=r"BartForConditionalGeneration \(torch.func fallback for parameter\(s\) model.shared.weight",
        ),
    ):
        ewc_fast.estimate_importance(model, data, "fisher", progress=False)


def _eos_pooled(name):
    """T5ForSequenceClassification / BartForSequenceClassification: the sentence vector is picked by a
    boolean eos mask (``hidden[eos_mask, :].view(N, -1, E)[:, -1, :]``)."""
    import transformers as T

    torch.manual_seed(0)
    if name == "t5":
        cfg = T.T5Config(
            vocab_size=37, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, num_labels=3,
        )  # fmt: skip
        m, eos = T.T5ForSequenceClassification(cfg), 1
    else:
        cfg = T.BartConfig(
            vocab_size=37, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, num_labels=3,
        )  # fmt: skip
        m, eos = T.BartForSequenceClassification(cfg), 2
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    data = []
    for n in (4, 1):
        ids = torch.randint(3, 37, (n, 4), generator=g)
        ids[:, -1] = eos
        data.append({"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g)})
    return m.eval(), data, eos


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_eos_mask_pooling_is_exact(name):
    model, data, eos = _eos_pooled(name)
    methods = ("fisher", "mas", "fisher_exact")
    res = ewc_fast.estimate_importance(model, data, methods, progress=False)
    ref = loop_reference(model, data, methods)
    for m in methods:
        assert res[m].meta["fallback"] == {}
        assert_close_hf(res[m], ref[m], f"{name}/{m}")
    # a different number of eos tokens per sample is refused (the model itself refuses it too)
    bad = [{k: v.clone() for k, v in data[0].items()}]
    bad[0]["input_ids"][0, 0] = eos
    with pytest.raises(ValueError):
        ewc_fast.estimate_importance(model, bad, "fisher", progress=False)
