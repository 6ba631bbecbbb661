"""Deeper checks of `automtl_nb.metrics`: hand computations on tiny maps, resizing rules, empty batches, gradients,
errors."""
import math, os, pickle, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from automtl_nb.metrics import (HIGHER_IS_BETTER, TASK_KINDS, CONVENTIONS, seg_loss, normal_loss, depth_loss, l1_loss,
                                SegMetrics, DepthMetrics, NormalMetrics, L1Metrics, delta_t, eval_size, Task)
from automtl_nb.metrics import _resize_nearest

approx = pytest.approx
LN = math.log


def t4(rows):
    "A (1, 1, H, W) float map from a nested list."
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def vecs(rows):
    "A (1, 3, H, W) map of vectors from an H×W nested list of 3-vectors."
    return torch.tensor(rows, dtype=torch.float32).permute(2, 0, 1)[None]


def upsample2(x):
    "Each pixel of (B, C, h, w) or (B, h, w) repeated 2×2 (what nearest upsampling by 2 gives)."
    return x.repeat_interleave(2, -2).repeat_interleave(2, -1)


# ---------------------------------------------------------------- resizing
@pytest.mark.parametrize('src,dst', [((8, 8), (4, 4)), ((7, 5), (3, 2)), ((3, 3), (7, 6)), ((224, 224), (28, 28))])
def test_resize_matches_interpolate_and_keeps_dtype(src, dst):
    x = torch.randint(-1, 40, (2, *src))
    y = _resize_nearest(x, dst)
    assert y.dtype == torch.int64 and y.shape == (2, *dst)
    assert torch.equal(y.float(), F.interpolate(x[:, None].float(), size=dst, mode='nearest')[:, 0])
    xb = torch.rand(2, 3, *src) > 0.5
    assert torch.equal(_resize_nearest(xb, dst), F.interpolate(xb.float(), size=dst, mode='nearest').bool())


def test_downsample_by_two_picks_the_top_left_pixel():
    x = torch.arange(16).view(1, 4, 4)
    assert _resize_nearest(x, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


# ---------------------------------------------------------------- seg_loss
def test_seg_loss_by_hand():
    # 2 classes; logits (0, ln 3) → p = (1/4, 3/4) everywhere
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = LN(3)
    lbl = torch.tensor([[[1, 0], [1, -1]]])
    want = (-LN(3 / 4) - LN(1 / 4) - LN(3 / 4)) / 3
    assert seg_loss(logits, lbl).item() == approx(want, rel=1e-6)
    # weights: w0 = 2, w1 = 1 → (1·ℓ1 + 2·ℓ0 + 1·ℓ1) / (1 + 2 + 1)
    want_w = (-LN(3 / 4) * 2 - 2 * LN(1 / 4)) / 4
    assert seg_loss(logits, lbl, weight=[2., 1.]).item() == approx(want_w, rel=1e-6)
    assert seg_loss(logits, lbl[:, None]).item() == approx(want, rel=1e-6)  # (B, 1, H, W) labels are accepted


def test_seg_loss_at_prediction_resolution():
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = LN(3)
    lbl = torch.full((1, 4, 4), -1)
    lbl[0, 0, 0], lbl[0, 0, 2], lbl[0, 2, 0] = 1, 0, 1  # the pixels nearest downsampling keeps; (2, 2) stays ignored
    lbl[0, 1, 1] = lbl[0, 3, 3] = 0  # pixels it drops: they must not count
    want = (-LN(3 / 4) - LN(1 / 4) - LN(3 / 4)) / 3
    assert seg_loss(logits, lbl).item() == approx(want, rel=1e-6)


def test_seg_loss_equals_cross_entropy_on_random_input():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 7, generator=g)
    lbl = torch.randint(0, 5, (3, 6, 7), generator=g)
    lbl[lbl == 4] = 255
    w = torch.rand(5, generator=g) + 0.1
    for kw in [dict(), dict(weight=w)]:
        want = F.cross_entropy(logits, lbl, ignore_index=255, **kw)
        assert seg_loss(logits, lbl, ignore_index=255, **kw).item() == approx(want.item(), rel=1e-5)


def test_seg_loss_gradient_and_empty_batch():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    seg_loss(logits, torch.randint(0, 3, (2, 4, 4))).backward()
    assert logits.grad.abs().sum() > 0
    logits.grad = None
    z = seg_loss(logits, torch.full((2, 8, 8), -1), weight=torch.ones(3))
    assert z.item() == 0 and z.grad_fn is not None and not torch.isnan(z)
    z.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_seg_loss_errors():
    with pytest.raises(ValueError, match='integer labels'): seg_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r'seg_loss: .*\(2, 3, 2, 2\) and \(1, 2, 2\)'):
        seg_loss(torch.zeros(2, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match='must be tensors'): seg_loss(torch.zeros(1, 3, 2, 2), [[0, 1]])


# ---------------------------------------------------------------- normal_loss
def test_normal_loss_by_hand():
    tgt = vecs([[[0, 0, 1], [0, 0, 1]], [[1, 0, 0], [0, 0, 0]]])  # last pixel invalid
    prd = vecs([[[0, 0, 7], [1, 0, 1]], [[-2, 0, 0], [5, 5, 5]]])  # cos = 1, 1/√2, −1
    want = 1 - (1 + 1 / math.sqrt(2) - 1) / 3
    assert normal_loss(prd, tgt).item() == approx(want, rel=1e-6)
    assert normal_loss(prd * 3, tgt * 0.5).item() == approx(want, rel=1e-6)  # only directions matter


def test_normal_loss_half_resolution_gradient_and_empty():
    tgt = upsample2(vecs([[[0, 0, 1], [0, 1, 0]], [[1, 0, 0], [0, 0, 0]]]))  # (1, 3, 4, 4)
    tgt[0, :, 1, 1] = torch.tensor([1., 0, 0])  # a dropped pixel: must not count
    prd = vecs([[[0, 0, 1], [0, 0, 1]], [[1, 0, 0], [0, 1, 0]]]).requires_grad_()
    z = normal_loss(prd, tgt)
    assert z.item() == approx(1 - (1 + 0 + 1) / 3, abs=1e-6)
    z.backward()
    assert prd.grad.abs().sum() > 0
    prd.grad = None
    z = normal_loss(prd, torch.zeros(1, 3, 4, 4))
    assert z.item() == 0 and z.grad_fn is not None
    z.backward()
    assert torch.equal(prd.grad, torch.zeros_like(prd))
    with pytest.raises(ValueError, match=r'normal_loss: expected pred \(B, 3, h, w\)'):
        normal_loss(torch.zeros(1, 1, 2, 2), tgt)


# ---------------------------------------------------------------- depth_loss and l1_loss
def test_depth_loss_by_hand_and_masks():
    g = t4([[2., 0.], [-1., 4.]])  # 0 and negative labels are invalid
    p = t4([[1., 9.], [9., 1.]]).requires_grad_()
    z = depth_loss(p, g)
    assert z.item() == approx((1 + 3) / 2)
    z.backward()
    assert p.grad.tolist() == [[[[-0.5, 0.], [0., -0.5]]]]  # sign(p − g) / n_valid
    assert depth_loss(p, g[:, 0]).item() == approx(2.)  # (B, H, W) labels get their channel axis


def test_depth_loss_at_half_resolution():
    g = upsample2(t4([[2., 0.], [1., 4.]]))
    g[0, 0, 1, 1] = 100.  # a dropped pixel must not count
    assert depth_loss(t4([[1., 7.], [1., 2.]]), g).item() == approx((1 + 0 + 2) / 3)


def test_l1_loss_by_hand():
    p = torch.tensor([[[[0., 1.], [2., 3.]], [[1., 1.], [1., 1.]]]])  # (1, 2, 2, 2)
    g = torch.tensor([[[[1., 1.], [255., 3.]], [[0., 255.], [3., 1.]]]])
    assert l1_loss(p, g, ignore_value=255.).item() == approx((1 + 0 + 0 + 1 + 2 + 0) / 6)
    assert l1_loss(p[:, :1], g[:, :1]).item() == approx((1 + 0 + 253 + 0) / 4)
    with pytest.raises(ValueError, match=r'l1_loss: expected pred \(B, 2, h, w\)'): l1_loss(p, g[:, :1])


@pytest.mark.parametrize('fn,target', [(depth_loss, torch.zeros(2, 1, 6, 6)),
                                       (lambda p, t: l1_loss(p, t, 255.), torch.full((2, 1, 6, 6), 255.))])
def test_dense_losses_empty_batch_is_zero_with_grad(fn, target):
    p = torch.randn(2, 1, 3, 3, requires_grad=True)
    z = fn(p, target)
    assert z.item() == 0 and z.grad_fn is not None
    z.backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize('fn,ch', [(depth_loss, 1), (l1_loss, 1), (normal_loss, 3)])
def test_dense_losses_gradient_flows(fn, ch):
    p = torch.randn(2, ch, 3, 3, requires_grad=True)
    fn(p, torch.rand(2, ch, 6, 6) + 0.1).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------- SegMetrics
def test_seg_metrics_absent_class_and_ignore():
    # 4 classes: class 3 never appears anywhere; class 2 only in the prediction; one ignored pixel
    lbl = torch.tensor([[[0, 0, 0], [0, 1, 1], [1, 1, -1]]])
    cls = torch.tensor([[[0, 0, 1], [2, 1, 1], [0, 1, 3]]])  # the ignored pixel's prediction (3) must not count
    m = SegMetrics(4)
    m.update(cls, lbl)
    assert m.cm.tolist() == [[2, 1, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    r = m.compute()
    assert r['mIoU'] == approx((0.4 + 0.6 + 0) / 3)  # class 3 absent → left out; class 2 predicted only → IoU 0
    assert r['pixel_acc'] == approx(5 / 8)
    mo = SegMetrics(4, convention='original')
    mo.update(cls, lbl)
    assert mo.compute()['mIoU'] == approx(0.5)


def test_seg_metrics_original_mode_drops_present_but_never_right_classes():
    lbl = torch.tensor([[[0, 0], [1, 1]]])
    cls = torch.tensor([[[0, 0], [0, 0]]])  # class 1 is present in the labels but never predicted
    m, mo = SegMetrics(2), SegMetrics(2, convention='original')
    for x in (m, mo): x.update(cls, lbl)
    assert m.compute()['mIoU'] == approx((2 / 4 + 0) / 2)
    assert mo.compute()['mIoU'] == approx(2 / 4)
    assert m.compute()['pixel_acc'] == approx(0.5)


def test_seg_metrics_upsamples_prediction_and_pools_batches():
    lbl = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 255, 255]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [2, 2]]]), 3).permute(0, 3, 1, 2).float()  # (1, 3, 2, 2)
    m = SegMetrics(3, ignore_index=255)
    m.update(logits, lbl)
    # upsampled prediction: [[0,0,1,1],[0,0,1,1],[2,2,2,2],[2,2,2,2]]; label 1 at (2,2),(2,3) predicted 2
    assert m.cm.tolist() == [[4, 0, 0], [0, 4, 2], [0, 0, 4]]
    assert m.compute()['pixel_acc'] == approx(12 / 14)
    assert m.compute()['mIoU'] == approx((1 + 4 / 6 + 4 / 6) / 3)
    # pooling: two updates == one update of the concatenated batch
    lbl2 = torch.randint(0, 3, (1, 4, 4))
    logits2 = torch.randn(1, 3, 2, 2)
    m.update(logits2, lbl2)
    m3 = SegMetrics(3, ignore_index=255)
    m3.update(torch.cat([logits, logits2]), torch.cat([lbl, lbl2]))
    assert torch.equal(m.cm, m3.cm) and m.cm.sum() == 14 + 16


def test_seg_metrics_label_ranges_and_in_range_ignore():
    # labels outside 0..C-1 drop out even when they are not the ignore index (as the original's confusion matrix)
    m = SegMetrics(2, ignore_index=-1)
    m.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 1, 7]]]))
    assert m.cm.sum() == 2 and m.compute()['pixel_acc'] == 1.0
    # an ignore index inside the class range (class 0 = unlabelled) also drops out
    m = SegMetrics(3, ignore_index=0)
    m.update(torch.tensor([[[1, 1, 2]]]), torch.tensor([[[0, 1, 2]]]))
    assert m.cm.sum() == 2 and m.compute()['mIoU'] == approx(1.0)


def test_seg_metrics_reset_empty_and_errors():
    m = SegMetrics(3)
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.tensor([[[0]]]), torch.tensor([[[-1]]]))
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.tensor([[[0]]]), torch.tensor([[[0]]]))
    assert m.compute()['pixel_acc'] == 1
    m.reset()
    assert m.cm.sum() == 0
    with pytest.raises(ValueError, match='expected 3 class channels'):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError,
                       match=r"SegMetrics: unknown metric convention 'x'; choose one of \['ours', 'original'\]"):
        SegMetrics(3, convention='x')
    with pytest.raises(ValueError, match='n_classes'): SegMetrics(0)


def test_metrics_do_not_track_gradients():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    m = SegMetrics(3)
    m.update(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    d = DepthMetrics()
    d.update(logits[:, :1], torch.ones(1, 1, 2, 2))
    assert not m.cm.requires_grad and not d.s.requires_grad


# ---------------------------------------------------------------- DepthMetrics
def test_depth_metrics_thresholds_are_strict():
    g = torch.ones(1, 1, 1, 7)
    # ratios exactly at 1.25, 1.25², 1.25³ (all exact in binary), in both directions, and a perfect pixel
    p = torch.tensor([1.25, 1 / 1.25, 1.5625, 1.953125, 1.953125 + 1e-3, 1.0, 1.2])[None, None, None]
    g2 = g.clone()
    g2[..., 1] = 1.25
    p[..., 1] = 1.0  # g/p = 1.25 exactly
    d = DepthMetrics()
    d.update(p, g2)
    r = d.compute()
    # within δ1 (<1.25): 1.0, 1.2 → 2; δ2 (<1.5625): + the two 1.25s → 4; δ3 (<1.953125): + 1.5625 → 5
    assert [r['delta1'], r['delta2'], r['delta3']] == approx([200 / 7, 400 / 7, 500 / 7])


def test_depth_metrics_by_hand_and_invalid_pixels():
    d = DepthMetrics()
    d.update(t4([[2., 3.], [0.5, 7.]]), t4([[1., 3.], [1., 0.]]))  # the last pixel is invalid
    r = d.compute()
    assert r['abs_err'] == approx((1 + 0 + 0.5) / 3) and r['rel_err'] == approx((1 + 0 + 0.5) / 3)
    assert r['delta1'] == approx(100 / 3) and r['delta2'] == approx(100 / 3) and r['delta3'] == approx(100 / 3)


def test_depth_metrics_nonpositive_prediction_is_outside_every_threshold():
    d = DepthMetrics()
    d.update(t4([[-1., 0.]]), t4([[1., 1.]]))
    r = d.compute()
    assert r['delta3'] == 0 and r['abs_err'] == approx(1.5) and r['rel_err'] == approx(1.5)


def test_depth_metrics_pool_pixels_over_batches():
    d = DepthMetrics()
    d.update(t4([[1., 1.]]), t4([[2., 0.]]))  # 1 valid pixel, error 1
    d.update(t4([[1., 1.]]), t4([[1., 1.]]))  # 2 valid pixels, error 0
    assert d.compute()['abs_err'] == approx(1 / 3)  # pooled, not (1 + 0) / 2
    assert d.compute()['delta1'] == approx(200 / 3)


def test_depth_metrics_upsample_prediction_and_empty():
    d = DepthMetrics()
    d.update(t4([[1., 2.]]), t4([[1., 1., 1., 1.]]))
    assert d.compute()['abs_err'] == approx(0.5)
    e = DepthMetrics()
    e.update(t4([[1.]]), t4([[0.]]))
    assert all(math.isnan(v) for v in e.compute().values())
    e.update(t4([[1.]]), t4([[1.]]))
    assert e.compute()['abs_err'] == 0
    e.reset()
    assert math.isnan(e.compute()['abs_err'])


# ---------------------------------------------------------------- NormalMetrics
def rot(deg):
    "A unit vector at `deg` degrees from +z, in the x–z plane."
    a = math.radians(deg)
    return [math.sin(a), 0., math.cos(a)]


def test_normal_metrics_known_angles():
    tgt = vecs([[[0, 0, 1], [0, 0, 1], [0, 0, 1]], [[0, 0, 1], [0, 0, 1], [0, 0, 0]]])  # one invalid pixel
    prd = vecs([[rot(0), rot(45), rot(90)], [rot(180), [0, 0, 5], [1, 1, 1]]])
    m = NormalMetrics()
    m.update(prd, tgt)
    r = m.compute()
    assert r['mean'] == approx((0 + 45 + 90 + 180 + 0) / 5, abs=1e-9)
    assert r['median'] == approx(45.005, abs=1e-9)  # the 0.01° bin [45, 45.01) → its centre
    assert r['within_11.25'] == approx(40) and r['within_22.5'] == approx(40) and r['within_30'] == approx(40)


def test_normal_metrics_threshold_bands():
    tgt = vecs([[[0, 0, 1]] * 4])
    m = NormalMetrics()
    m.update(vecs([[rot(11.2), rot(11.3), rot(22.4), rot(29.9)]]), tgt)
    r = m.compute()
    assert [r['within_11.25'], r['within_22.5'], r['within_30']] == approx([25, 75, 100])


def test_normal_metrics_median_matches_numpy_and_pools():
    g = torch.Generator().manual_seed(0)
    prd, tgt = torch.randn(3, 3, 5, 6, generator=g), torch.randn(3, 3, 5, 6, generator=g)
    tgt[0, :, 0] = 0  # some invalid pixels
    m = NormalMetrics()
    for i in range(3): m.update(prd[i:i + 1], tgt[i:i + 1])
    valid = (tgt != 0).any(1)
    cos = (F.normalize(prd.double(), dim=1) * F.normalize(tgt.double(), dim=1)).sum(1)[valid]
    ang = np.degrees(np.arccos(np.clip(cos.numpy(), -1, 1)))
    r = m.compute()
    assert r['mean'] == approx(ang.mean(), abs=1e-9)
    assert abs(r['median'] - np.median(ang)) <= 0.005 + 1e-9
    assert r['within_30'] == approx(100 * (ang <= 30).mean())


def test_normal_metrics_upsample_and_empty():
    m = NormalMetrics()
    m.update(vecs([[rot(90)]]), upsample2(vecs([[[0, 0, 1]]])))  # a 1×1 prediction against a 2×2 label
    assert m.compute()['mean'] == approx(90, abs=1e-9) and int(m.s[4]) == 4
    e = NormalMetrics()
    e.update(vecs([[rot(3)]]), torch.zeros(1, 3, 1, 1))
    assert all(math.isnan(v) for v in e.compute().values())
    m.reset()
    assert m.hist.sum() == 0 and all(math.isnan(v) for v in m.compute().values())


# ---------------------------------------------------------------- L1Metrics
def test_l1_metrics_pooled_with_ignore():
    m = L1Metrics(ignore_value=255.)
    m.update(t4([[1., 1.]]), t4([[0., 255.]]))  # 1 pixel, error 1
    m.update(t4([[0., 0.]]), t4([[0., 0.]]))  # 2 pixels, error 0
    assert m.compute() == {'l1': approx(1 / 3)}
    assert math.isnan(L1Metrics().compute()['l1'])


# ---------------------------------------------------------------- directions and Δt
def test_higher_is_better():
    lower = {k for k, v in HIGHER_IS_BETTER.items() if not v}
    assert lower == {'seg_err', 'abs_err', 'rel_err', 'mean', 'median', 'l1'}
    for c in CONVENTIONS:
        names = set()
        for m in (SegMetrics(2, convention=c, seg_err=True), DepthMetrics(c), NormalMetrics(c, cos_sim=True),
                  L1Metrics(None, c)):
            names |= set(m.compute())
        assert names == set(HIGHER_IS_BETTER)


def test_delta_t_two_tasks_by_hand():
    stl = {'seg': {'mIoU': 0.4, 'pixel_acc': 0.5}, 'normal': {'mean': 20., 'within_30': 50.}, 'depth': {'abs_err': 1.}}
    mtl = {'seg': {'mIoU': 0.5, 'pixel_acc': 0.45}, 'normal': {'mean': 18., 'within_30': 40.}}
    # seg: (+25 − 10)/2 = 7.5; normal: lower-better mean 20 → 18 is +10, within_30 50 → 40 is −20, so −5
    r = delta_t(mtl, stl)
    assert r == {'seg': approx(7.5), 'normal': approx(-5.), 'all': approx(1.25)}
    # a lower-is-better metric that got worse is negative
    assert delta_t({'depth': {'abs_err': 1.5}}, stl) == {'depth': approx(-50.), 'all': approx(-50.)}
    assert delta_t(stl, stl)['all'] == 0
    assert delta_t({'seg': {'mIoU': 0.5}}, stl, higher_is_better={'mIoU': False})['seg'] == approx(-25.)


def test_delta_t_errors():
    stl = {'seg': {'mIoU': 0.4}, 'z': {'l1': 0.}}
    with pytest.raises(ValueError, match="baseline has no task 'depth'; it has \\['seg', 'z'\\]"):
        delta_t({'depth': {'abs_err': 1.}}, stl)
    with pytest.raises(ValueError, match="baseline has no metric 'pixel_acc' for task 'seg'"):
        delta_t({'seg': {'pixel_acc': .5}}, stl)
    with pytest.raises(ValueError, match="'foo' of task 'seg' is not in higher_is_better"):
        delta_t({'seg': {'foo': .5}}, {'seg': {'foo': .4}})
    with pytest.raises(ValueError, match="is 0"): delta_t({'z': {'l1': 1.}}, stl)
    with pytest.raises(ValueError, match='empty'): delta_t({}, stl)
    with pytest.raises(ValueError, match='has no metrics'): delta_t({'seg': {}}, stl)
    with pytest.raises(ValueError, match='reserved'): delta_t({'all': {'mIoU': 1.}}, stl)


# ---------------------------------------------------------------- Task
def test_task_defaults_and_validation():
    assert [Task('x', k, 4 if k == 'seg' else None).n_out for k in TASK_KINDS] == [4, 1, 3, 1, 1]
    assert Task('s', 'seg', 19).ignore_index == -1 and Task('s', 'seg', 40, 255).ignore_index == 255
    assert Task('k', 'keypoint').ignore_index is None
    with pytest.raises(ValueError,
                       match=r"unknown kind; choose one of \['seg', 'depth', 'normal', 'keypoint', 'edge'\]"):
        Task('a', 'sem')
    with pytest.raises(ValueError, match='required for seg'): Task('s', 'seg')
    with pytest.raises(ValueError, match='n_out must be 3, got 1'): Task('n', 'normal', 1)
    with pytest.raises(ValueError, match='ignore_index is not used'): Task('d', 'depth', ignore_index=0)
    with pytest.raises(ValueError, match='class_weight is only for seg'): Task('d', 'depth', class_weight=[1.])
    with pytest.raises(ValueError, match='2 class weights for 3 classes'): Task('s', 'seg', 3, class_weight=[1., 2.])
    with pytest.raises(ValueError, match='non-empty string'): Task('', 'depth')


def test_task_is_plain_data():
    t = Task('seg', 'seg', 3, 255, torch.tensor([1., 2., 3.]))
    assert t.class_weight == (1., 2., 3.)
    assert pickle.loads(pickle.dumps(t)) == t
    assert t != Task('seg', 'seg', 3, 255)


def test_task_loss_dispatch():
    g = torch.Generator().manual_seed(1)
    logits, lbl = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    lbl[0, 0] = 255
    w = [1., 2., 0.5]
    assert Task('s', 'seg', 3, 255, w).loss(logits, lbl).item() == approx(seg_loss(logits, lbl, 255, w).item())
    p, n = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    assert Task('n', 'normal').loss(p, n).item() == approx(normal_loss(p, n).item())
    p1, d = torch.rand(2, 1, 4, 4, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    assert Task('d', 'depth').loss(p1, d).item() == approx(depth_loss(p1, d).item())
    d[0, 0, 0] = 255.
    assert Task('e', 'edge', ignore_index=255).loss(p1, d).item() == approx(l1_loss(p1, d, 255).item())
    with pytest.raises(ValueError, match=r"task 's' \(seg\) expects predictions \(B, 3, h, w\), got \(2, 1, 4, 4\)"):
        Task('s', 'seg', 3).loss(p1, lbl)


def test_task_new_metrics_and_postprocess():
    t = Task('s', 'seg', 5, 255)
    m1, m2 = t.new_metrics(), t.new_metrics()
    assert isinstance(m1, SegMetrics) and m1 is not m2 and m1.n_classes == 5 and m1.ignore_index == 255
    kinds = ('depth', 'normal', 'keypoint')
    assert [type(Task('x', k).new_metrics()) for k in kinds] == [DepthMetrics, NormalMetrics, L1Metrics]
    p = torch.randn(2, 3, 4, 4)
    assert torch.allclose(Task('n', 'normal').postprocess(p).norm(dim=1), torch.ones(2, 4, 4))
    assert Task('d', 'depth').postprocess(p[:, :1]) is not None and torch.equal(Task('s', 'seg', 3).postprocess(p), p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('conv', CONVENTIONS)
def test_on_gpu_matches_cpu(conv):
    g = torch.Generator().manual_seed(2)
    logits, lbl = torch.randn(2, 4, 5, 5, generator=g), torch.randint(-1, 4, (2, 10, 10), generator=g)
    nrm, ngt = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 10, 10, generator=g)
    dp, dg = torch.randn(2, 1, 5, 5, generator=g), torch.rand(2, 1, 10, 10, generator=g)
    for dev in ('cpu', 'cuda'):
        s = SegMetrics(4, convention=conv, seg_err=True, class_weight=[1., 2., 3., 4.])
        n = NormalMetrics(conv, cos_sim=True)
        d, l = DepthMetrics(conv), L1Metrics(0.5, conv)
        for _ in range(2):  # two updates: the running sums stay on the device
            s.update(logits.to(dev), lbl.to(dev))
            n.update(nrm.to(dev), ngt.to(dev))
            d.update(dp.to(dev), dg.to(dev))
            l.update(dp.to(dev), dg.to(dev))
        out = {**s.compute(), **n.compute(), **{f'd_{k}': v for k, v in d.compute().items()}, **l.compute(),
               'loss': seg_loss(logits.to(dev), lbl.to(dev)).item()}
        if dev == 'cpu': ref = out
    assert s.cm.device.type == 'cuda' and d.s.device.type == 'cuda'
    assert out == approx(ref, rel=1e-5)


# ---------------------------------------------------------------- the 'original' convention, rule by rule
def test_original_pixel_acc_keeps_negative_labels_and_averages_batches():
    C = 3
    lbl1, cls1 = torch.tensor([[[0, 1, -1, -1]]]), torch.tensor([[[0, 1, 0, 0]]])  # 2 right of 2 labelled (+2 ignored)
    # B = 2: 1 right of 3 (255 ≥ C)
    lbl2, cls2 = torch.tensor([[[2, 255]], [[0, 0]]]), torch.tensor([[[1, 2]], [[0, 1]]])
    ours, orig = SegMetrics(C), SegMetrics(C, convention='original')
    for m in (ours, orig):
        m.update(cls1, lbl1)
        m.update(cls2, lbl2)
    assert ours.compute()['pixel_acc'] == approx(3 / 5)  # pooled over labelled pixels
    assert orig.compute()['pixel_acc'] == approx((1 * 2 / 4 + 2 * 1 / 3) / 3)  # −1 pixels count as wrong; B-weighted
    assert torch.equal(ours.cm, orig.cm)


def test_original_pixel_acc_is_nan_for_a_batch_with_no_pixel_below_C():
    m = SegMetrics(2, 255, convention='original')
    m.update(torch.tensor([[[0]]]), torch.tensor([[[0]]]))
    m.update(torch.tensor([[[0]]]), torch.tensor([[[255]]]))
    assert math.isnan(m.compute()['pixel_acc'])  # the original averages a NaN batch mean in
    assert SegMetrics(2, 255).compute()['mIoU'] != SegMetrics(2, 255).compute()['mIoU']  # NaN when empty, in both


def test_seg_err_matches_weighted_cross_entropy_and_pools_or_averages():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(b, 4, 3, 3, generator=g) for b in (2, 1)]
    lbls = [torch.randint(0, 4, (b, 6, 6), generator=g) for b in (2, 1)]
    lbls[0][0, :2] = 255
    w = torch.tensor([1., 2., .5, 3.])
    ours, orig = SegMetrics(4, 255, seg_err=True, class_weight=w), SegMetrics(4, 255, 'original', True, w)
    for p, l in zip(logits, lbls):
        ours.update(p, l)
        orig.update(p, l)
    up = [upsample2(p) for p in logits]
    per = [F.cross_entropy(u, l, weight=w, ignore_index=255).item() for u, l in zip(up, lbls)]
    pooled = F.cross_entropy(torch.cat(up), torch.cat(lbls), weight=w, ignore_index=255).item()
    assert ours.compute()['seg_err'] == approx(pooled, rel=1e-6)
    assert orig.compute()['seg_err'] == approx((2 * per[0] + 1 * per[1]) / 3, rel=1e-6)
    with pytest.raises(ValueError, match='3 class weights for 4 classes'): SegMetrics(4, class_weight=[1., 2., 3.])


def test_original_depth_rules():
    orig = DepthMetrics('original')
    # valid: label > 3e-5; p = 1.25 g is within δ1 (≤); p < 0 is within every δ; p = 0 is outside (g/p = ∞)
    orig.update(t4([[1.25, -2., 0., 5.]]), t4([[1., 1., 1., 2e-5]]))
    r = orig.compute()
    assert [r['delta1'], r['delta2'], r['delta3']] == approx([200 / 3] * 3)
    assert r['abs_err'] == approx((0.25 + 3 + 1) / 3) and r['rel_err'] == approx((0.25 + 3 + 1) / 3)
    ours = DepthMetrics()
    ours.update(t4([[1.25, -2., 0., 5.]]), t4([[1., 1., 1., 2e-5]]))
    assert ours.compute()['delta3'] == approx(25.) and ours.compute()['delta1'] == 0  # 1.25 is not < 1.25; 2e-5 counts


def test_original_depth_and_l1_average_batch_means_weighted_by_batch_size():
    d, l = DepthMetrics('original'), L1Metrics(convention='original')
    d.update(torch.ones(2, 1, 1, 2), torch.tensor([[[[2., 0.]]], [[[1., 1.]]]]))  # B = 2: errors 1 | 0, 0 → mean 1/3
    d.update(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.))  # B = 1: error 2
    assert d.compute()['abs_err'] == approx((2 * 1 / 3 + 1 * 2) / 3)
    l.update(torch.zeros(2, 1, 1, 2), torch.tensor([[[[1., 0.]]], [[[0., 1.]]]]))
    l.update(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert l.compute()['l1'] == approx((2 * 0.5 + 1 * 1) / 3)
    e = DepthMetrics('original')
    e.update(t4([[1.]]), t4([[1e-5]]))
    assert all(math.isnan(v) for v in e.compute().values())


def test_original_normal_median_is_finer_and_cos_sim():
    tgt = vecs([[[0, 0, 1]] * 4])
    prd = vecs([[rot(10.123456), rot(20.5), rot(40), rot(170)]])
    o, m = NormalMetrics('original', cos_sim=True), NormalMetrics(cos_sim=True)
    o.update(prd, tgt)
    m.update(prd, tgt)
    assert abs(o.compute()['median'] - (20.5 + 40) / 2) <= 5e-5 + 1e-9
    assert abs(m.compute()['median'] - (20.5 + 40) / 2) <= 5e-3 + 1e-9
    assert o.hist.numel() == 1_800_000 and m.hist.numel() == 18_000
    cos = [math.cos(math.radians(a)) for a in (10.123456, 20.5, 40, 170)]
    assert o.compute()['cos_sim'] == approx(sum(cos) / 4) and m.compute()['cos_sim'] == approx(sum(cos) / 4)
    but_median = lambda r: {k: v for k, v in r.compute().items() if k != 'median'}
    assert but_median(o) == approx(but_median(m))


def test_delta_t_is_the_originals_cmp_for_every_direction():
    ref = {'mean': 17.7, 'median': 16.3, 'within_11.25': 29.4, 'within_22.5': 72.3, 'within_30': 87.3}
    got = {'mean': 16.0, 'median': 17.0, 'within_11.25': 35.0, 'within_22.5': 70.0, 'within_30': 90.0}
    cmp = ((17.7 - 16) / 17.7 + (16.3 - 17) / 16.3 + (35 - 29.4) / 29.4 + (70 - 72.3) / 72.3 + (90 - 87.3) / 87.3) / 5
    assert delta_t({'normal': got}, {'normal': ref})['normal'] / 100 == approx(cmp)
    assert delta_t({'s': {'seg_err': 0.5}}, {'s': {'seg_err': 0.575}})['s'] == approx((0.575 - 0.5) / 0.575 * 100)
    assert delta_t({'n': {'cos_sim': 0.873}}, {'n': {'cos_sim': 0.807}})['n'] == approx((0.873 - 0.807) / 0.807 * 100)


def test_eval_size_and_convention_errors():
    assert [eval_size(d, c) for c in CONVENTIONS for d in ('synthetic', 'cityscapes', 'nyuv2', 'taskonomy')] == \
           [None] * 4 + [None, None, (321, 321), (224, 224)]
    for make in (lambda: SegMetrics(2, convention='Original'), lambda: DepthMetrics('paper'),
                 lambda: NormalMetrics(None), lambda: L1Metrics(255, 'ourz'), lambda: eval_size('nyuv2', 'x'),
                 lambda: Task('t', 'edge', convention='x')):
        with pytest.raises(ValueError, match="unknown metric convention"): make()


def test_task_convention_and_loss_metrics_reach_the_accumulators():
    w = (1., 2., 3.)
    t = Task('seg', 'seg', 3, 255, w, loss_metrics=True, convention='original')
    m = t.new_metrics()
    assert (m.convention, m.seg_err, m.ignore_index, m.class_weight.tolist()) == ('original', True, 255, list(w))
    assert set(Task('s', 'seg', 3).new_metrics().compute()) == {'mIoU', 'pixel_acc'}
    assert 'cos_sim' in Task('n', 'normal', loss_metrics=True).new_metrics().compute()
    assert set(Task('d', 'depth', loss_metrics=True).new_metrics().compute()) == set(DepthMetrics().compute())
    assert Task('e', 'edge', ignore_index=255, convention='original').new_metrics().convention == 'original'
    assert Task('k', 'keypoint').convention == 'ours' and not Task('k', 'keypoint').loss_metrics
    assert pickle.loads(pickle.dumps(t)) == t and t != Task('seg', 'seg', 3, 255, w, loss_metrics=True)
    spec = dict(kind='seg', n_out=17, ignore_index=255, class_weight=w * 5 + (1., 1.), loss_metrics=True)
    # how 09_learner builds tasks from a dataset
    assert Task('seg', convention='original', **spec).new_metrics().seg_err
    with pytest.raises(ValueError, match='loss_metrics must be True or False'): Task('d', 'depth', loss_metrics='yes')


# ---------------------------------------------------------------- parity with the original code
ORIGINAL = os.environ.get('AUTOMTL_ORIGINAL')


@pytest.mark.skipif(not ORIGINAL,
                    reason='set AUTOMTL_ORIGINAL to the original AutoMTL tree to compare metrics with its code')
def test_metrics_match_the_original_code():
    "Every metric and Δt in the 'original' convention equals the original code's on random data (1e-5 relative)."
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'bench'))
    from parity_metrics import metric_checks
    checks = metric_checks(ORIGINAL)
    assert len(checks) == 37 and all(np.isfinite(d) for _, d, _ in checks)
    assert [c for c in checks if not c[2]] == []
    # our own convention differs exactly where the notebook says it does (so the random data exercise every rule)
    differ = {n for n, _, ok in metric_checks(ORIGINAL, 'ours') if not ok}
    same = {n for n, _, _ in checks} - differ
    assert same == {'nyuv2 normal mean', 'nyuv2 normal within_11.25', 'nyuv2 normal within_22.5',
                    'nyuv2 normal within_30', 'taskonomy normal cos_sim', 'taskonomy normal Δt'}
