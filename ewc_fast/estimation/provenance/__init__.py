"""Which dimension of every tensor of a forward holds the samples, decided by provenance.

The batch contract makes the roots: every tensor of a batch holds one row per sample along dim 0
(:mod:`.batches` checks that they agree). A ``TorchFunctionMode`` (:class:`Tracker`) then follows
every torch function the forward calls and records, for each tensor it produces, a :class:`BDim`:

* ``BDim(dim, outer, inner)``: ``size[dim] == outer * N * inner`` and sample n owns the indices
  ``o * N * inner + n * inner + i`` of that dimension (``outer = inner = 1``: a plain batch
  dimension; ``inner > 1``: the samples were flattened with the positions after them, e.g. the
  ``(N * T, E)`` view GPT-2's ``Conv1D`` multiplies; ``outer > 1``: with positions before them);
* no entry: the tensor does not derive from the batch (shared by all samples: parameters, buffers,
  ``arange``, a ``(1, T)`` position-id tensor, shapes read as Python ints);
* :class:`Unknown`: it derives from the batch but no rule could say how (an op that mixes the
  samples, e.g. a reduction over the batch dimension, or a function without a propagation rule).

A dimension is never taken for the batch because of its size: each rule maps the batch dimension
of the arguments to the output from the function's semantics (broadcasting from the right for
pointwise functions, stride arithmetic for views, the contraction structure of ``matmul``, ...),
and an advanced index on the batch dimension keeps it only when its values are verified to be
the identity ``arange(N)``. So sequence-first tensors (``(T, N, E)``), N == T and flattened
``(N * T, E)`` views are all told apart exactly.

The tracker also serves discovery (which functions each trainable parameter enters, inside which
module: :mod:`.plan`), the capture of function-level calls (:mod:`.rules.functional`), and
*meetings*: when a tensor derived from a planned call's shared output (e.g. GPT-2's position
embeddings of ``(1, T)`` ids) is combined with per-sample data, the shared operand is replaced by
an explicit broadcast whose gradient is per sample (:mod:`.shared`).

Modules: :mod:`.dims` (:class:`BDim`, :class:`Unknown`, :func:`batch_first`, view and broadcast
arithmetic), :mod:`.functions` (the propagation rule of every torch function), :mod:`.indexing`
(``__getitem__`` / ``__setitem__``, the identity-index check), :mod:`.tracker` (the
``TorchFunctionMode`` itself: bookkeeping, callbacks, meetings).
"""

from .dims import BDim, Unknown, batch_first, lookup
from .tracker import Tracker

__all__ = ["BDim", "Unknown", "Tracker", "batch_first", "lookup"]
