"""What a GPU check ran on: card, driver, CUDA, torch, Triton, Python (recorded in results.json and
at the top of the summary, the fields benchmarks/RESULTS.md asks for)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except Exception:  # noqa: BLE001 - absent tool, hung driver query: the field stays empty
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def describe(device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "device": str(device),
        "machine": platform.machine(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable ({type(exc).__name__})"
    try:
        import ewc_fast

        info["ewc_fast"] = ewc_fast.__version__
    except Exception as exc:  # noqa: BLE001
        info["ewc_fast"] = f"not importable ({type(exc).__name__})"
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            card=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        info["card"] = "none (CPU)"
    if shutil.which("nvidia-smi"):
        info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    git = shutil.which("git")
    if git:
        info["commit"] = _run([git, "rev-parse", "--short", "HEAD"])
    return info
