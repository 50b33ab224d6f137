"""Task builders: permutations are bijections, seeded, identity task 0, blocks, split, partial."""

import numpy as np
import pytest
import torch

from ewc_fast.experiments import tasks as T


def test_permuted_tasks_bijection_and_identity():
    ts = T.permuted_tasks(4, seed=3)
    assert ts[0].is_identity and ts[0].perm is None
    for t in ts[1:]:
        assert T.is_bijection(t.perm, 784)
        assert not np.array_equal(t.perm, np.arange(784))
    assert not np.array_equal(ts[1].perm, ts[2].perm)
    ts2 = T.permuted_tasks(4, seed=3, first_identity=False)
    assert all(T.is_bijection(t.perm, 784) for t in ts2)


def test_permuted_tasks_seeded():
    a, b = T.permuted_tasks(3, seed=5), T.permuted_tasks(5, seed=5)
    for x, y in zip(a[1:], b[1:3]):
        np.testing.assert_array_equal(x.perm, y.perm)  # independent of the number of tasks
    c = T.permuted_tasks(3, seed=6)
    assert not np.array_equal(a[1].perm, c[1].perm)


def test_transform_numpy_and_torch_agree():
    t = T.permuted_tasks(2, seed=0)[1]
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    xn = t.transform(x)
    xt = t.transform(torch.from_numpy(x))
    np.testing.assert_array_equal(xn, xt.numpy())
    np.testing.assert_array_equal(xn[:, 10], x[:, t.perm[10]])
    # pixel values are only moved: the multiset per row is unchanged
    np.testing.assert_array_equal(np.sort(xn, axis=1), np.sort(x, axis=1))


def test_block_permutation():
    perm = T.block_permutation(seed=1, index=2)
    assert T.is_bijection(perm, 784)
    img = np.arange(784).reshape(28, 28)
    out = img.reshape(-1)[perm].reshape(28, 28)
    blocks_in = {tuple(img[r : r + 7, c : c + 7].ravel()) for r in range(0, 28, 7) for c in range(0, 28, 7)}
    moved = 0
    for r in range(0, 28, 7):
        for c in range(0, 28, 7):
            blk = out[r : r + 7, c : c + 7]
            assert tuple(blk.ravel()) in blocks_in  # every 7x7 block of the output is an input block
            moved += int(blk[0, 0] != img[r, c])
    assert moved > 0
    tasks = T.block_permuted_tasks(3, seed=1)
    assert tasks[0].is_identity
    np.testing.assert_array_equal(tasks[2].perm, perm)


def test_split_tasks():
    ts = T.split_tasks(5)
    assert [t.classes for t in ts] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    y = np.array([0, 1, 2, 3, 2, 9])
    x = np.arange(6 * 784, dtype=np.float32).reshape(6, 784)
    xs, ys = ts[1].apply(x, y)
    np.testing.assert_array_equal(ys, [2, 3, 2])
    np.testing.assert_array_equal(xs, x[[2, 3, 4]])
    xr, yr = T.split_tasks(5, relabel=True)[1].apply(torch.from_numpy(x), torch.from_numpy(y))
    assert yr.tolist() == [0, 1, 0] and xr.shape == (3, 784)
    with pytest.raises(ValueError):
        T.split_tasks(6)


def test_partial_permutation():
    assert np.array_equal(T.partial_permutation(0.0, seed=2), np.arange(784))
    full = T.partial_permutation(1.0, seed=2)
    assert T.is_bijection(full) and not np.any(full == np.arange(784))  # every pixel moves
    prev = set()
    for f in (0.1, 0.25, 0.5, 0.75, 1.0):
        p = T.partial_permutation(f, seed=2)
        assert T.is_bijection(p, 784)
        moved = set(np.flatnonzero(p != np.arange(784)).tolist())
        assert len(moved) == round(f * 784)
        assert prev <= moved  # nested as the fraction grows
        prev = moved
    np.testing.assert_array_equal(T.partial_permutation(0.3, seed=2), T.partial_permutation(0.3, seed=2))
    with pytest.raises(ValueError):
        T.partial_permutation(1.5)


def test_build_tasks_dispatch():
    assert len(T.build_tasks("permuted", 3, 0)) == 3
    assert len(T.build_tasks("blocks", 2, 0)) == 2
    assert T.build_tasks("split", 2, 0)[1].classes == (2, 3)
    with pytest.raises(ValueError):
        T.build_tasks("rotated", 2, 0)
