"""The EWC -> Zenke SI exclusion protocol (ewc_fast.consolidation.exclusion) on its own."""

import gc

import torch
from torch import nn

from ewc_fast.consolidation.exclusion import ExclusionEndpoint, ExclusionRegistry


def _params():
    return [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(4))]


def test_index_matches_by_identity():
    ps = _params()
    ep = ExclusionEndpoint(ps[:2])
    other = nn.Parameter(ps[0].detach().clone())
    assert ep.index([ps[2], ps[1], other, ps[0]]) == ([1, 3], [1, 0])
    assert ep.index([]) == ([], [])


def test_task_grads_without_reports_is_identity():
    ps = _params()
    ep = ExclusionEndpoint(ps)
    grads = [torch.randn_like(p) for p in ps]
    assert ep.task_grads([0, 1, 2], grads) is grads


def test_snapshot_record_and_clear():
    ps = _params()
    ep = ExclusionEndpoint(ps)
    task = [torch.randn_like(p) for p in ps]
    pen_a = [torch.randn_like(p) for p in ps]
    pen_b = [torch.randn_like(p) for p in ps]
    # slot 0: recorded twice (autograd accumulation); slot 1: snapshot then a later report (ignored);
    # slot 2: record, then a snapshot of .grad = task + record, then more penalty added in place.
    ep.record([0, 2], [pen_a[0], pen_a[2]])
    ep.record([0], [pen_b[0]])
    ep.snapshot([1, 2], [task[1].clone(), task[2] + pen_a[2]])
    ep.record([1], [pen_a[1]])
    ep.snapshot([1], [torch.full_like(task[1], 7.0)])
    grad = [task[0] + pen_a[0] + pen_b[0], task[1] + pen_a[1], task[2] + pen_a[2] + pen_b[2]]
    got = ep.task_grads([0, 1, 2], grad)
    for g, t in zip(got, task):
        torch.testing.assert_close(g, t)
    ep.clear()
    fresh = [torch.randn_like(p) for p in ps]
    assert ep.task_grads([0, 1, 2], fresh) is fresh


def test_buffers_stay_out_of_autograd():
    ps = _params()
    ep = ExclusionEndpoint(ps)
    g = torch.randn(3, requires_grad=True) * 2
    ep.record([0], [g])
    ep.snapshot([0], [g])
    (out,) = ep.task_grads([0], [g])
    assert not out.requires_grad


class _Owner:
    pass


def test_registry_links_versions_and_weak_owners():
    reg = ExclusionRegistry()
    assert not reg and reg.links(_params()) == []
    ps = _params()
    a, b = _Owner(), _Owner()
    ep_a, ep_b = ExclusionEndpoint(ps[:2]), ExclusionEndpoint(ps[1:])
    reg.add(a, ep_a)
    v = reg.version
    reg.add(a, ep_a)  # already registered: no change
    assert reg.version == v
    reg.add(b, ep_b)
    assert reg and reg.version == v + 1
    links = reg.links([ps[2], ps[1]])
    assert [(e is ep_a, i, t) for e, i, t in links] == [(True, [1], [1]), (False, [0, 1], [1, 0])]
    reg.remove(a)
    assert [e for e, _, _ in reg.links(ps)] == [ep_b] and reg.version == v + 2
    reg.remove(a)  # not registered: no change
    assert reg.version == v + 2
    del b
    gc.collect()
    assert not reg and reg.links(ps) == [] and reg.version == v + 3
