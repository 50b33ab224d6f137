"""Helpers shared by the test packages (never import one test module from another).

* :func:`assert_close` -- relative-error check of an importance against its float64 oracle.
* :func:`ragged` -- split (x, y) into ragged batches.
* :func:`mlp` / :func:`data_of` / :func:`rel` -- a small classifier (with dropout), ragged random
  classification batches for it, and the relative error of a tensor against a reference.
* :func:`cached_reference` / :func:`run_case` -- the float64 oracle of a test case (cached per
  case builder and name) and the engine's result on it.
* :func:`load_example` -- a script of ``examples/`` as a module (the suite runs the examples).
* :func:`spawn_gloo` -- run a worker on N local processes that join a gloo process group.
* :func:`frozen` / :func:`assert_unchanged` -- a bit-exact snapshot of everything reachable from some
  objects (tensors, counters, settings, nested lists/dicts and object attributes) and the check that
  nothing in it changed (the "state exactly as before" guarantee of a refused call).
* :data:`DEVICES` / :func:`device_params` / :func:`cuda_marks` / :func:`on_device` -- the device
  parametrisation: ``"cpu"`` always, ``"cuda"`` (marked ``cuda``, skipped at once without a CUDA device
  or, for Triton, while ``TRITON_INTERPRET=1``) -- and copies that keep a tensor's strides. The fixture
  ``cuda_strict`` (tests/conftest.py) turns TF32 off for a test.
* :func:`backend_cases` / :data:`BACKEND_CASES` / :func:`backend_for` / :func:`available_case` -- the
  (backend, device) cases of the op tests, the backend each one runs and the skip of an
  unavailable one (``cpp-1t`` / ``cpp-2t``: the C++ kernels with 1 / 2 OpenMP threads).
"""

import contextlib
import importlib.util
import os

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.ops.backends import why_unavailable
from ewc_fast.testing.importance import reference_importance

#: relative error allowed per parameter in fp32 against the float64 oracle (fp32 rounding of sums
#: over at most a few hundred terms stays orders of magnitude below it)
TOL = 1e-5
ALL = ("fisher", "fisher_mc", "fisher_exact", "mas", "sig", "magnitude", "random", "fisher_batched")
TOKEN = ("fisher", "fisher_mc", "mas", "sig", "fisher_batched")  # (N, T, C) outputs: no fisher_exact

#: Triton is importable and the kernels package is installed (tests run it in the CPU interpreter)
TRITON = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec("ewc_fast.kernels.persample") is not None
)


# --------------------------------------------------------------------------------------- devices
#: a CUDA device is present (the ``cuda`` parameters run; elsewhere they are skipped at collection speed)
CUDA = torch.cuda.is_available()
#: Triton runs in its CPU interpreter in this process (tests/conftest.py sets it unless the caller did)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
#: why Triton cannot be proven on the card in this process (None: it can)
TRITON_ON_CUDA_SKIP = (
    NO_CUDA
    if not CUDA
    else (
        "TRITON_INTERPRET=1: Triton would run in the CPU interpreter, not on the card; "
        "run the cuda tests with TRITON_INTERPRET=0 (scripts/gpu_check.sh does)"
        if INTERPRET
        else None
    )
)


def cuda_marks(triton: bool = False) -> list:
    """Marks of a CUDA parameter: ``cuda``, and a skip without a card (or, for Triton, under the interpreter)."""
    reason = TRITON_ON_CUDA_SKIP if triton else (None if CUDA else NO_CUDA)
    return [pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")]


def device_params(triton: bool = False) -> list:
    """``[pytest.param("cpu"), pytest.param("cuda", marks=cuda_marks(triton))]`` for ``parametrize``."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=cuda_marks(triton))]


#: ``@pytest.mark.parametrize("device", DEVICES)``: cpu always, cuda marked ``cuda`` (skipped without one)
DEVICES = device_params()


def backend_cases(cpp_threads: tuple[int, ...] | None = (1, 2)) -> list:
    """(backend, device) cases of the op tests: torch, C++ (``cpp-1t`` / ``cpp-2t`` with 1 / 2 OpenMP
    threads, or one ``cpp`` case for ``cpp_threads=None``), Triton (the interpreter on the CPU), and
    torch / Triton on CUDA (marked ``cuda``)."""
    if cpp_threads:
        cpp = [pytest.param((f"cpp-{n}t", "cpu"), id=f"cpp-{n}t") for n in cpp_threads]
    else:
        cpp = [pytest.param(("cpp", "cpu"), id="cpp")]
    return [
        pytest.param(("torch", "cpu"), id="torch"),
        *cpp,
        pytest.param(("triton", "cpu"), id="triton"),
        pytest.param(("torch", "cuda"), id="torch-cuda", marks=cuda_marks()),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=cuda_marks(triton=True)),
    ]


BACKEND_CASES = backend_cases()


def available_case(request) -> tuple[str, str]:
    """The (backend, device) parameter of a ``case`` fixture built on :func:`backend_cases`, skipped with
    the reason when the backend cannot run on that device; CUDA cases run with TF32 off (``cuda_strict``)."""
    name, device = request.param
    reason = why_unavailable(name.split("-")[0], torch.device(device))
    if reason:
        pytest.skip(reason)
    if device == "cuda":
        request.getfixturevalue("cuda_strict")
    return name, device


@contextlib.contextmanager
def backend_for(case, *, skip_unavailable: bool = True):
    """The backend name of a :data:`BACKEND_CASES` case (``torch``, ``cpp`` or ``triton``), with torch's
    (= OpenMP's) thread count set to 1 / 2 for ``cpp-1t`` / ``cpp-2t`` and restored afterwards. Skips
    the test with the reason when the backend cannot run on the case's device; with
    ``skip_unavailable=False`` only the C++ backend is checked (the test checks the others itself)."""
    name, device = case
    base = name.split("-")[0]
    if skip_unavailable or base == "cpp":
        reason = why_unavailable(base, torch.device(device))
        if reason:
            pytest.skip(reason)
    old = torch.get_num_threads()
    if base == "cpp":
        torch.set_num_threads(int(name[4]))
    try:
        yield base
    finally:
        torch.set_num_threads(old)


def same_layout(t: torch.Tensor, device, *, force: bool = False) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same shape and strides (a strided view into a fresh
    buffer; stride-0 (expanded) dimensions stay stride 0). ``t`` itself when it is already there,
    unless ``force``."""
    device = torch.device(device)
    if t.device == device and not force:
        return t
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0
    out = torch.empty(span, dtype=t.dtype, device=device).as_strided(t.shape, t.stride())
    # write through the non-overlapping part: one index along every stride-0 dimension
    idx = tuple(slice(0, 1) if (s == 0 and n > 1) else slice(None) for n, s in zip(t.shape, t.stride()))
    if t.numel():
        out[idx].copy_(t[idx])
    return out


def on_device(x, device):
    """``x`` (a tensor, or a list / tuple / dict of them, nested) moved to ``device`` with the same strides."""
    if isinstance(x, torch.Tensor):
        return same_layout(x, device)
    if isinstance(x, dict):
        return {k: on_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(on_device(v, device) for v in x)
    return x


def assert_close(res, ref, tol=TOL, what=""):
    """``res`` (fp32 tensors, any device) equals ``ref`` (float64) within relative error ``tol`` per
    entry; NaN fails."""
    assert set(res) == set(ref), (what, sorted(set(res) ^ set(ref)))
    for k, b in ref.items():
        a = res[k]
        assert a.shape == b.shape and a.dtype == torch.float32, (what, k)
        a = a.to("cpu", torch.float64)
        b = b.to("cpu", torch.float64)
        assert bool(torch.isfinite(a).all()), (what, k, "non-finite")
        denom = float(b.norm())
        err = float((a - b).norm()) / denom if denom > 0 else float(a.norm())
        assert err <= tol, f"{what} {k}: relative error {err:.3g} > {tol}"  # NaN fails too


def ragged(x, y, sizes=(3, 1, 4)):
    """Batches of ``sizes`` samples from ``x`` (and ``y`` unless None)."""
    out, s = [], 0
    for n in sizes:
        out.append((x[s : s + n], y[s : s + n]) if y is not None else x[s : s + n])
        s += n
    return out


def mlp(n_in=6, n_out=3, seed=0):
    """Linear-Tanh-Dropout-Linear classifier, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, n_out))


def data_of(n=8, n_in=6, n_cls=3, sizes=(3, 1, 4), seed=0):
    """``n`` random (x (n_in,), class) samples from generator ``seed``, as ragged batches of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, n_in, generator=g), torch.randint(0, n_cls, (n,), generator=g)
    return ragged(x, y, sizes)


def rel(a, b):
    """||a - b|| / ||b|| in float64."""
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


_REF: dict = {}


def cached_reference(make, name):
    """Float64 oracle of case ``name`` built by ``make(name) -> (model, data, methods)``, cached."""
    if (make, name) not in _REF:
        model, data, methods = make(name)
        _REF[make, name] = reference_importance(
            model, data, methods, generator=torch.Generator().manual_seed(3), mc_samples=2
        )
    return _REF[make, name]


def run_case(make, name, backend, device="cpu", **kw):
    """``estimate_importance`` on case ``name`` built by ``make`` with the oracle's seed, model and data
    on ``device``; ``(result, methods)``."""
    model, data, methods = make(name)
    if torch.device(device).type != "cpu":
        model, data = model.to(device), on_device(data, device)
    res = ewc_fast.estimate_importance(
        model,
        data,
        methods,
        backend=backend,
        progress=False,
        generator=torch.Generator().manual_seed(3),
        mc_samples=2,
        **kw,
    )
    return res, methods


# ------------------------------------------------------------------------- Hugging Face models
HF = importlib.util.find_spec("transformers") is not None
PEFT = importlib.util.find_spec("peft") is not None
HF_FAMILIES = ("gpt2", "llama", "bert", "t5", "bart", "vit")


def hf_model(name, seed=0):
    """A tiny randomly initialised Hugging Face model of family ``name`` (built from a config: no
    download), in eval mode; ``"lora"``: a PEFT LoRA wrapper around a tiny Llama."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as T
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    V = 37
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        m = T.GPT2LMHeadModel(cfg)
    elif name in ("llama", "lora"):
        cfg = T.LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        m = T.LlamaForCausalLM(cfg)
    elif name == "bert":
        cfg = T.BertConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
            num_labels=3,
        )
        m = T.BertForSequenceClassification(cfg)
    elif name == "t5":
        cfg = T.T5Config(
            vocab_size=V,
            d_model=16,
            d_kv=8,
            d_ff=24,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        m = T.T5ForConditionalGeneration(cfg)
    elif name == "bart":
        cfg = T.BartConfig(
            vocab_size=V,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
            max_position_embeddings=16,
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
        m = T.BartForConditionalGeneration(cfg)
    elif name == "vit":
        cfg = T.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            num_labels=3,
        )
        m = T.ViTForImageClassification(cfg)
    else:
        raise KeyError(name)
    with torch.no_grad():  # random init (some families start norms / biases at constants)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
        with torch.no_grad():  # LoRA B starts at zero: move it so every gradient is non-trivial
            for k, p in m.named_parameters():
                if "lora_B" in k:
                    p.normal_(0, 0.1)
    return m.eval()


def hf_batches(name, sizes=(4, 2), t=4, seed=1):
    """Hugging Face-style batches (dicts with ``labels``) for ``hf_model(name)``: ragged batch sizes,
    N == T in the first batch, padding (attention_mask 0 and label -100) in the first sample."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        if name == "vit":
            out.append(
                {"pixel_values": torch.randn(n, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
            )
            continue
        ids = torch.randint(3, 37, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[0, -1] = 0
        if name == "bert":
            labels = torch.randint(0, 3, (n,), generator=g)
        else:
            labels = torch.randint(3, 37, (n, t), generator=g)
            labels[0, -1] = -100
            if name in ("gpt2", "llama", "lora"):
                labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def load_example(name: str):
    """``examples/<name>.py`` imported as a module (its ``main(argv)`` runs it)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spawn_gloo(worker, world: int, path: str) -> None:
    """``worker(rank, world, path)`` on ``world`` processes, each in a gloo process group on 127.0.0.1
    (one intra-op thread), destroyed when the worker returns or raises."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_entry, args=(worker, world, port, path), nprocs=world, join=True)


def _gloo_entry(rank, worker, world, port, path):
    import os

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, path)
    finally:
        torch.distributed.destroy_process_group()


def _freeze(obj, seen):
    """Bit-exact, comparable copy of ``obj``: tensors as (dtype, shape, strides, version, bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        raw = t.contiguous().reshape(-1).view(torch.uint8).clone() if t.numel() else b""
        return ("tensor", t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device), raw)
    if isinstance(obj, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_freeze(v, seen) for v in obj])
    if isinstance(obj, dict):
        return ("dict", [(repr(k), _freeze(v, seen)) for k, v in obj.items()])
    if isinstance(obj, set):
        return ("set", sorted(map(repr, obj)))
    if isinstance(obj, nn.Module):
        return ("module", [(n, _freeze(p, seen), _freeze(p.grad, seen)) for n, p in obj.named_parameters()])
    if id(obj) in seen or not hasattr(obj, "__dict__"):
        return ("opaque", type(obj).__name__)
    seen.add(id(obj))
    return ("object", type(obj).__name__, [(k, _freeze(v, seen)) for k, v in sorted(vars(obj).items())])


def frozen(*objs):
    """Snapshot of ``objs`` for :func:`assert_unchanged`: every tensor's bytes, dtype, shape and strides
    (a module: its parameters and their ``.grad``), every counter and setting, recursively through
    lists, dicts and object attributes (optimizer hook handles and the like compare by type)."""
    return [_freeze(o, set()) for o in objs]


def _same(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        if not (isinstance(b, tuple) and b and b[0] == "tensor" and a[:5] == b[:5]):
            return False
        return (a[5] == b[5]) if isinstance(a[5], bytes) else torch.equal(a[5], b[5])
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN settings compare equal to themselves


def assert_unchanged(before, *objs):
    """Everything :func:`frozen` captured in ``before`` is bit-identical now."""
    after = frozen(*objs)
    for i, (a, b) in enumerate(zip(before, after)):
        assert _same(a, b), f"state of argument #{i} ({type(objs[i]).__name__}) changed"


def isa_variant_results(child_code: str, tmp_path) -> dict:
    """Run ``child_code`` (Python source; it must ``torch.save((chosen_isa, result), sys.argv[1])``) once
    per C++ instruction-set cap (``EWC_FAST_CPP_ISA`` = generic / avx2 / avx512, chosen once per process,
    so each needs its own process) and return ``{chosen_isa: result}``. Caps the CPU lacks fall back to a
    lower level, so the dict holds one entry per distinct build that ran; the generic build (0) always
    runs, which is asserted. Skips the test when the C++ extension is not built."""
    import subprocess
    import sys
    from pathlib import Path

    reason = why_unavailable("cpp", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    root = str(Path(__file__).resolve().parents[1])
    results = {}
    for isa in ("generic", "avx2", "avx512"):
        env = dict(os.environ, EWC_FAST_CPP_ISA=isa, OMP_NUM_THREADS="2", PYTHONPATH=root)
        path = str(tmp_path / f"{isa}.pt")
        run = subprocess.run([sys.executable, "-c", child_code, path], env=env, cwd=root, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        chosen, out = torch.load(path)
        results[chosen] = out
    assert 0 in results  # the generic build always runs; the others where the CPU has them
    return results
