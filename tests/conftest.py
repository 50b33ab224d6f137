"""Test configuration: Triton runs in its CPU interpreter (must be set before Triton is imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
