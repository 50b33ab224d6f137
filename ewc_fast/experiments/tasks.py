"""Task builders for continual-learning experiments on MNIST-like data.

A :class:`Task` is a pure description (a pixel permutation and/or a class subset) applied to
flattened images ``(N, n_pixels)``; it never copies the dataset until asked to.

Permutation convention: ``x_task[:, i] = x[:, perm[i]]`` (output pixel ``i`` takes input pixel
``perm[i]``). All builders are seeded: task ``t`` of seed ``s`` depends only on ``(s, t)`` (a
``numpy.random.SeedSequence([s, t])``), not on how many tasks are built.

* :func:`permuted_tasks` — permuted MNIST: a random permutation of all pixels per task (task 0 the
  identity unless ``first_identity=False``), as in Kirkpatrick et al. 2017 and Kutalev & Lapina.
* :func:`block_permuted_tasks` — a spatial variant: the 28×28 image is a 4×4 grid of 7×7
  blocks and each task permutes the positions of the blocks (pixels inside a block keep their
  layout), which keeps local strokes intact for a CNN.
* :func:`split_tasks` — split MNIST: task ``t`` holds the samples of one class pair
  ((0,1), (2,3), …); labels are kept (class-incremental, 10-way head) or mapped to 0/1
  (``relabel=True``, domain-incremental).
* :func:`partial_permutation` / :func:`partial_permuted_tasks` — permute only a fraction of the
  pixels (for the Fisher-overlap experiment, Kirkpatrick et al. 2017 Fig. 3C): a seeded pixel
  order is drawn once and the first ``round(fraction·n)`` pixels are moved along one seeded random
  cycle through them, so the permuted sets are nested as the fraction grows and every chosen pixel
  moves.
* :func:`with_heads` — the multi-head (task-incremental) form of any of these: each task scores
  only its own output columns (:meth:`Task.logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: building tasks needs numpy only
    import torch

    Array = np.ndarray | torch.Tensor  # images (N, n_pixels) or labels (N,), numpy or torch

__all__ = [
    "Task",
    "pixel_permutation",
    "permuted_tasks",
    "block_permutation",
    "block_permuted_tasks",
    "split_tasks",
    "partial_permutation",
    "partial_permuted_tasks",
    "build_tasks",
    "with_heads",
    "head_outputs",
    "is_bijection",
    "TASK_KINDS",
]

TASK_KINDS = ("permuted", "blocks", "split")


def _rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(salt)]))


def is_bijection(perm: np.ndarray, n: int | None = None) -> bool:
    """True if ``perm`` is a permutation of ``range(n)``."""
    perm = np.asarray(perm)
    n = len(perm) if n is None else n
    return perm.ndim == 1 and len(perm) == n and np.array_equal(np.sort(perm), np.arange(n))


@dataclass(frozen=True)
class Task:
    """One task: optional pixel permutation + optional class subset (with optional relabel)."""

    name: str
    perm: np.ndarray | None = field(default=None, repr=False)
    classes: tuple[int, ...] | None = None
    relabel: bool = False
    #: output columns of this task's head (multi-head, task-incremental); None: every output
    head: tuple[int, ...] | None = None

    def logits(self, out: Array) -> Array:
        """The columns of ``out`` (N, C) that form this task's head (``out`` itself if none)."""
        if self.head is None:
            return out
        h = self.head
        if all(b == a + 1 for a, b in zip(h, h[1:])):  # contiguous: a basic slice (a view)
            return out[:, h[0] : h[-1] + 1]
        if hasattr(out, "index_select"):
            import torch

            return out.index_select(1, torch.as_tensor(h, device=out.device))
        return out[:, list(h)]

    @property
    def is_identity(self) -> bool:
        return self.perm is None

    def transform(self, x: Array) -> Array:
        """Permute the pixels of ``x`` (numpy array or torch tensor, ``(N, n_pixels)``)."""
        if self.perm is None:
            return x
        if hasattr(x, "index_select"):  # torch
            import torch

            idx = torch.as_tensor(self.perm, device=x.device)
            return x.index_select(-1, idx)
        return np.take(x, self.perm, axis=-1)

    def label_map(self, y: Array) -> Array:
        """Labels mapped to 0…k−1 in ``classes`` order when ``relabel``; else unchanged."""
        if self.classes is None or not self.relabel:
            return y
        lut = np.full(int(max(self.classes)) + 1, -1, dtype=np.int64)
        lut[list(self.classes)] = np.arange(len(self.classes))
        if hasattr(y, "index_select"):
            import torch

            return torch.as_tensor(lut, device=y.device)[y]
        return lut[y]

    def mask(self, y: Array) -> np.ndarray | None:
        """Boolean mask of the samples that belong to this task (None = all)."""
        if self.classes is None:
            return None
        return np.isin(np.asarray(y), np.asarray(self.classes))

    def apply(self, x: Array, y: Array) -> tuple[Array, Array]:
        """Select this task's samples, permute pixels, map labels → ``(x', y')``."""
        m = self.mask(y if not hasattr(y, "cpu") else y.cpu().numpy())
        if m is not None:
            if hasattr(x, "index_select"):
                import torch

                idx = torch.as_tensor(np.flatnonzero(m), device=x.device)
                x, y = x.index_select(0, idx), y.index_select(0, idx)
            else:
                x, y = x[m], y[m]
        return self.transform(x), self.label_map(y)

    @property
    def n_outputs(self) -> int | None:
        """Number of labels this task uses if relabelled, else None (the data's own)."""
        return len(self.classes) if (self.classes is not None and self.relabel) else None


def pixel_permutation(n_pixels: int = 784, seed: int = 0, index: int = 0) -> np.ndarray:
    """A seeded uniformly random permutation of ``range(n_pixels)``."""
    return _rng(seed, index).permutation(int(n_pixels)).astype(np.int64)


def permuted_tasks(n_tasks: int, seed: int = 0, *, first_identity: bool = True, n_pixels: int = 784) -> list[Task]:
    """Permuted-MNIST tasks; task 0 is the unpermuted data when ``first_identity``."""
    tasks = []
    for t in range(int(n_tasks)):
        if t == 0 and first_identity:
            tasks.append(Task("perm0-identity"))
        else:
            tasks.append(Task(f"perm{t}", pixel_permutation(n_pixels, seed, t)))
    return tasks


def block_permutation(seed: int = 0, index: int = 0, *, image_size: int = 28, block: int = 7) -> np.ndarray:
    """Pixel permutation that shuffles the positions of the ``block``×``block`` tiles.

    The ``image_size``×``image_size`` image is a ``g``×``g`` grid of tiles (``g = image_size /
    block``, 4×4 of 7×7 for MNIST); tile ``k`` of the output is tile ``order[k]`` of the input,
    pixel layout inside a tile unchanged.
    """
    if image_size % block:
        raise ValueError(f"image_size {image_size} is not a multiple of block {block}")
    g = image_size // block
    order = _rng(seed, index, salt=7).permutation(g * g)
    src = np.arange(image_size * image_size).reshape(g, block, g, block)  # (bi, r, bj, c)
    src = src.transpose(0, 2, 1, 3).reshape(g * g, block, block)  # tile k → its pixel indices
    out = src[order].reshape(g, g, block, block).transpose(0, 2, 1, 3)
    return out.reshape(-1).astype(np.int64)


def block_permuted_tasks(
    n_tasks: int, seed: int = 0, *, first_identity: bool = True, image_size: int = 28, block: int = 7
) -> list[Task]:
    """Block-permuted tasks: permute the 4×4 grid of 7×7 blocks (task 0 identity by default)."""
    tasks = []
    for t in range(int(n_tasks)):
        if t == 0 and first_identity:
            tasks.append(Task("blocks0-identity"))
        else:
            tasks.append(Task(f"blocks{t}", block_permutation(seed, t, image_size=image_size, block=block)))
    return tasks


def split_tasks(
    n_tasks: int = 5,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    relabel: bool = False,
    n_classes: int = 10,
) -> list[Task]:
    """Split MNIST: task ``t`` = classes ``(2t, 2t+1)`` (or the given ``pairs``)."""
    if pairs is None:
        if n_tasks * 2 > n_classes:
            raise ValueError(f"split needs 2 classes per task: {n_tasks} tasks > {n_classes // 2}")
        pairs = [(2 * t, 2 * t + 1) for t in range(int(n_tasks))]
    return [Task(f"split{'-'.join(map(str, p))}", None, tuple(int(c) for c in p), relabel) for p in pairs]


def partial_permutation(fraction: float, seed: int = 0, *, n_pixels: int = 784) -> np.ndarray:
    """Permute ``round(fraction·n_pixels)`` pixels among themselves (nested in ``fraction``).

    A seeded pixel order is drawn (depends on ``seed`` only); the first ``k`` pixels of it are
    the moved set, so a larger fraction moves a superset. Within the set, pixels move along one
    seeded random cycle (every chosen pixel leaves its place; ``k = 1`` moves nothing).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = _rng(seed, 0, salt=3)
    order = rng.permutation(int(n_pixels))
    k = int(round(fraction * n_pixels))
    perm = np.arange(int(n_pixels), dtype=np.int64)
    if k >= 2:
        chosen = order[:k]
        # random cycle through the chosen pixels: a random ordering, each takes the next one's value
        cyc = _rng(seed, k, salt=5).permutation(chosen)
        perm[cyc] = np.roll(cyc, -1)
    return perm


def partial_permuted_tasks(fraction: float, seed: int = 0, *, n_pixels: int = 784) -> list[Task]:
    """Two tasks: the identity and a permutation of ``fraction`` of the pixels."""
    return [Task("identity"), Task(f"partial{fraction:g}", partial_permutation(fraction, seed, n_pixels=n_pixels))]


def with_heads(tasks: Sequence[Task], n_classes: int = 10) -> list[Task]:
    """Multi-head (task-incremental) versions of ``tasks``: a task with a class subset gets the
    output columns of its classes and labels 0…k−1 in class order (split MNIST task t: columns
    (2t, 2t+1), as van de Ven et al.'s task-incremental setting); a task on all classes (permuted)
    gets its own block of ``n_classes`` columns ``[t·n_classes, (t+1)·n_classes)``. The model needs
    :func:`head_outputs` output units."""
    out = []
    for t, task in enumerate(tasks):
        if task.classes is not None:
            head = tuple(int(c) for c in task.classes)
            out.append(Task(task.name, task.perm, task.classes, True, head))
        else:
            head = tuple(range(t * n_classes, (t + 1) * n_classes))
            out.append(Task(task.name, task.perm, None, False, head))
    return out


def head_outputs(tasks: Sequence[Task], default: int) -> int:
    """Output units a model needs for ``tasks``: past the largest head column, else the first
    task's relabelled class count, else ``default``."""
    heads = [c for t in tasks if t.head is not None for c in t.head]
    if heads:
        return max(heads) + 1
    return tasks[0].n_outputs or default


def build_tasks(
    kind: str, n_tasks: int, seed: int = 0, *, first_identity: bool = True, n_pixels: int = 784, relabel: bool = False
) -> list[Task]:
    """Dispatch on ``kind`` ∈ :data:`TASK_KINDS`."""
    if kind == "permuted":
        return permuted_tasks(n_tasks, seed, first_identity=first_identity, n_pixels=n_pixels)
    if kind == "blocks":
        side = int(round(n_pixels**0.5))
        if side * side != n_pixels or side % 7:
            raise ValueError(f"block tasks need 28×28 images, got {n_pixels} pixels")
        return block_permuted_tasks(n_tasks, seed, first_identity=first_identity, image_size=side)
    if kind == "split":
        return split_tasks(n_tasks, relabel=relabel)
    raise ValueError(f"unknown task kind {kind!r}: choose from {TASK_KINDS}")
