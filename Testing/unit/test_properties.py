"""Property-based tests (hypothesis): random shapes, channels, masks and methods keep the engine's invariants."""

import torch
from hypothesis import given, settings, strategies as st

from SegHiResCAMLib.engine import METHODS, MaskRegion, SegmentTarget, compute_cams, count_hooks

from nets import LinearHeadNet

shapes = st.one_of(
    st.tuples(st.integers(2, 9), st.integers(2, 9)),
    st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, batch=st.integers(1, 3), in_channels=st.integers(1, 3), classes=st.integers(1, 4),
       seed=st.integers(0, 10_000), methods=st.lists(st.sampled_from(sorted(METHODS)), min_size=1, max_size=3,
                                                      unique=True), density=st.floats(0.05, 1.0))
def test_engine_invariants(shape, batch, in_channels, classes, seed, methods, density):
    nd = len(shape)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = LinearHeadNet(nd=nd, in_channels=in_channels, classes=classes).double()
    x = torch.randn((batch, in_channels) + shape, generator=gen, dtype=torch.float64)
    x_copy = x.clone()
    mask = torch.rand((batch,) + shape, generator=gen) < density
    mask.view(batch, -1)[:, 0] = True  # never empty
    cls = 1 if classes <= 2 else int(torch.randint(0, classes, (1,), generator=gen))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    target = SegmentTarget(cls, MaskRegion(mask))
    results = compute_cams(net, x, [target], ["features"], methods, relu=False, normalization="none")
    assert [r.method for r in results] == methods
    for res in results:
        assert res.map.shape == (batch,) + shape and res.raw.shape == (batch,) + shape
        assert torch.isfinite(res.map).all() and torch.isfinite(res.raw).all()
    # Seg-HiRes identity for the linear head: raw = 1[M] (Y' - b')
    with torch.no_grad():
        A = net.features(x)
    w = net.head.weight.detach().flatten(1)
    wc = (w[0] if cls == 1 else -w[0]) if classes == 1 else w[cls]
    expected = mask.double() * (A * wc.view((1, -1) + (1,) * nd)).sum(1)
    for res in results:
        if res.method == "seg-hires-grad-cam":
            torch.testing.assert_close(res.raw.double(), expected, rtol=1e-6, atol=1e-6)
    # nothing left behind
    assert count_hooks(net) == 0 and torch.equal(x, x_copy) and not x.requires_grad
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in net.parameters()) and net.training
