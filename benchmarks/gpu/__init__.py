"""GPU validation tables, run by ``scripts/gpu_check.sh`` (docs/GPU.md).

* :mod:`.timing` -- ``do_bench`` / CUDA-event timing (``perf_counter`` in the CPU dry run), input
  rotation beyond L2, phase budgets.
* :mod:`.sizes` -- the problem sizes on the card (``GPU``) and in the dry run (``DRY``).
* :mod:`.environment` -- card, driver and versions.
* :mod:`.ceilings` -- copy bandwidth and GEMM throughput, measured first.
* :mod:`.kernels` -- ``persample_sq_`` vs the dW GEMM; consolidation ops vs copy bandwidth and fused AdamW.
* :mod:`.fisher` -- Fisher / Fisher+MAS on the transformer workloads vs plain fwd+bwd and the exact peers.
* :mod:`.results`, :mod:`.phases`, :mod:`.report` -- ``results.json`` (atomic updates), the phase
  records of the shell script, the Markdown summary with the targets.
"""
