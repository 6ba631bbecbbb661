"""Metric parity with the original AutoMTL code: every metric and Δt of `automtl_nb.metrics` in the 'original'
convention against the original's `data/metrics/pixel2pixel_metrics.py`, on the same random predictions and labels.

    python bench/parity_metrics.py --original /work/original

Covers CityScapes (seg with 19 and 7 classes, depth), NYUv2 (seg, normal, depth) and Tiny-Taskonomy (all five tasks).
The labels carry each dataset's invalid pixels (ignore labels, zero or tiny depths, invalid normals, crop padding 255)
and the predictions include negative and zero depths, so every rule of the 'original' convention is exercised. Each
check runs over three seeds of three batches of different sizes; it passes when the largest difference is within
1e-5 relative. The original code is only driven, never copied: two shims make it run on CPU with today's libraries
(its `.cuda()` calls become no-ops, and sklearn's `labels` argument is passed by keyword). Its metrics are read before
its 4-decimal rounding (its private `__*_metrics` methods), since the rounding is display.
"""
import argparse, contextlib, importlib.util, sys, tempfile
from pathlib import Path
import numpy as np
import torch
from automtl_nb.metrics import SegMetrics, DepthMetrics, NormalMetrics, L1Metrics, delta_t

RTOL = 1e-5
SEEDS = (0, 1, 2)
BATCHES = (3, 2, 1)  # batch sizes: unequal, so per-batch and pooled averages differ
LABEL, PRED = (12, 16), (6, 8)  # label and prediction resolution: metrics upsample the prediction
# the original's metric names → ours
NAMES = {'mIoU': 'mIoU', 'Pixel Acc': 'pixel_acc', 'err': None, 'abs_err': 'abs_err', 'rel_err': 'rel_err',
         'sigma_1.25': 'delta1', 'sigma_1.25^2': 'delta2', 'sigma_1.25^3': 'delta3', 'Angle Mean': 'mean',
         'Angle Median': 'median', 'Angle 11.25': 'within_11.25', 'Angle 22.5': 'within_22.5', 'Angle 30': 'within_30',
         'cosine_similarity': 'cos_sim'}


def load_original(path):
    "The original's metrics module, loaded from its file (nothing of it enters the package)."
    f = Path(path) / 'data' / 'metrics' / 'pixel2pixel_metrics.py'
    if not f.is_file(): raise FileNotFoundError(f"no original AutoMTL metrics at {f}; pass the original tree's root")
    try: import sklearn.metrics
    except ImportError as e:
        raise ImportError("the original metrics need scikit-learn: pip install scikit-learn") from e
    spec = importlib.util.spec_from_file_location('original_pixel2pixel_metrics', f)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    # keyword now
    mod.confusion_matrix = lambda t, p, labels=None: sklearn.metrics.confusion_matrix(t, p, labels=labels)
    return mod


@contextlib.contextmanager
def cpu_cuda():
    "Make the original's `.cuda()` calls no-ops while it runs on CPU."
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try: yield
    finally: torch.Tensor.cuda = saved


def original_values(m, cls, kind):
    "The original accumulator's metrics before its 4-decimal rounding, in our names; its `cmp` as 'cmp'."
    with cpu_cuda(): out = getattr(m, f'_{cls}__{kind}_metrics')()
    return {('cmp' if k == 'cmp' else NAMES[k] or m_err_name(m)): float(v) for k, v in out.items()}


def m_err_name(m):
    "The original's 'err' is the seg cross-entropy for segmentation and the L1 error for keypoints and edges."
    return 'seg_err' if m.task == 'segment_semantic' else 'l1'


def _close(a, b):
    "|a − b| and whether it is within RTOL of b (NaN matches NaN)."
    if np.isnan(a) and np.isnan(b): return 0., True
    d = abs(a - b)
    return d, bool(d <= RTOL * abs(b) + 1e-12)


# ------------------------------------------------------------------ random batches, in both label formats
def _seg_batch(g, B, C, ignore):
    "Logits (B, C, h, w) and labels (B, H, W) with ~10% `ignore`, class C−1 absent and class 1 never predicted."
    lbl = torch.randint(0, C - 1, (B, *LABEL), generator=g)
    lbl[torch.rand(B, *LABEL, generator=g) < 0.1] = ignore
    logits = torch.randn(B, C, *PRED, generator=g)
    logits[:, 1] = -1e3  # class 1 is present in the labels but never predicted: IoU 0, dropped by the original
    return logits, lbl


def _depth_batch(g, B, lo, hi):
    "Predictions (B, 1, h, w) with negative and zero values, labels (B, 1, H, W) with zeros and tiny positives."
    gt = lo + (hi - lo) * torch.rand(B, 1, *LABEL, generator=g)
    r = torch.rand(B, 1, *LABEL, generator=g)
    gt[r < 0.1] = 0.
    gt[(r >= 0.1) & (r < 0.15)] = 1e-5  # valid here, invalid in the original (≤ 3e-5)
    pred = torch.nn.functional.interpolate(gt, size=PRED) * (0.6 + 0.8 * torch.rand(B, 1, *PRED, generator=g))
    q = torch.rand(B, 1, *PRED, generator=g)
    pred[q < 0.1] = -pred[q < 0.1] - 0.1  # negative: within every δ in the original
    pred[(q >= 0.1) & (q < 0.13)] = 0.
    return pred, gt


def _normal_batch(g, B):
    "NYUv2-style raw labels (0..254, invalid pixels with a channel at 255) and predictions near them."
    raw = torch.randint(1, 255, (B, 3, *LABEL), generator=g).float()
    bad = torch.rand(B, *LABEL, generator=g)
    raw[:, 0][bad < 0.1] = 255  # one channel 255: invalid in the original (max == 255)
    raw[((bad >= 0.1) & (bad < 0.2))[:, None].expand_as(raw)] = 255  # all three 255: the PNG's invalid colour
    pred = torch.nn.functional.interpolate(raw - 127.5, size=PRED) + 60 * torch.randn(B, 3, *PRED, generator=g)
    ours = torch.where((raw == 255).any(1, keepdim=True), 0., raw)  # our loaders mark invalid normals by 0
    return pred, raw, ours


# ------------------------------------------------------------------ the checks
def _run(orig_m, ours_m, batches):
    "Feed the same batches to the original accumulator (pred, gt[, mask]) and ours (pred, our target)."
    for pred, gt, mask, ours_target in batches:
        with cpu_cuda(): orig_m(pred, gt, mask) if mask is not None else orig_m(pred, gt)
        ours_m.update(pred, ours_target)


def _compare(name, orig, ours, out):
    "Append one check per metric of `orig`, and one for Δt (ours vs the original's references, vs its `cmp`)."
    for k, v in orig.items():
        if k == 'cmp': continue
        out.setdefault(f'{name} {k}', []).append(_close(ours[k], v))


def _delta(name, m, orig, ours, out):
    "Δt of our values against the original's references, /100, vs the original's `cmp`."
    ref = {NAMES[k] or m_err_name(m): v for k, v in m.refer.items()}
    d = delta_t({'t': {k: ours[k] for k in ref}}, {'t': ref})['t'] / 100
    out.setdefault(f'{name} Δt', []).append(_close(d, orig['cmp']))


def _cityscapes(M, seed, out, conv):
    g = torch.Generator().manual_seed(seed)
    for C in (19, 7):
        m = M.CityScapesMetrics('segment_semantic')
        m.num_seg_cls = C; m.reset_records()  # the original hard-codes 19; AdaShare's code also runs 7
        ours = SegMetrics(C, -1, conv)
        batches = [(*_seg_batch(g, B, C, -1), None) for B in BATCHES]
        _run(m, ours, [(p, l[:, None], None, l) for p, l, _ in batches])
        o, r = original_values(m, 'CityScapesMetrics', 'seg'), ours.compute()
        _compare(f'cityscapes-{C} seg', o, r, out); _delta(f'cityscapes-{C} seg', m, o, r, out)
    m, ours = M.CityScapesMetrics('depth_zbuffer'), DepthMetrics(conv)
    _run(m, ours, [(p, t, None, t) for p, t in (_depth_batch(g, B, 0.01, 0.5) for B in BATCHES)])
    o, r = original_values(m, 'CityScapesMetrics', 'depth'), ours.compute()
    _compare('cityscapes depth', o, r, out); _delta('cityscapes depth', m, o, r, out)


def _nyuv2(M, seed, out, conv):
    g = torch.Generator().manual_seed(100 + seed)
    m, ours = M.NYUMetrics('segment_semantic'), SegMetrics(40, 255, conv)
    _run(m, ours, [(p, l[:, None], None, l) for p, l in (_seg_batch(g, B, 40, 255) for B in BATCHES)])
    o, r = original_values(m, 'NYUMetrics', 'seg'), ours.compute()
    _compare('nyuv2 seg', o, r, out); _delta('nyuv2 seg', m, o, r, out)
    m, ours = M.NYUMetrics('normal'), NormalMetrics(conv)
    _run(m, ours, [(p, raw, None, t) for p, raw, t in (_normal_batch(g, B) for B in BATCHES)])
    o, r = original_values(m, 'NYUMetrics', 'sn'), ours.compute()
    _compare('nyuv2 normal', o, r, out); _delta('nyuv2 normal', m, o, r, out)
    m, ours = M.NYUMetrics('depth_zbuffer'), DepthMetrics(conv)
    _run(m, ours, [(p, t, None, t) for p, t in (_depth_batch(g, B, 0.5, 10.) for B in BATCHES)])
    o, r = original_values(m, 'NYUMetrics', 'depth'), ours.compute()
    _compare('nyuv2 depth', o, r, out); _delta('nyuv2 depth', m, o, r, out)


def _taskonomy(M, seed, out, root, conv):
    g = torch.Generator().manual_seed(200 + seed)
    prior = 0.5 + torch.rand(17, generator=g)
    np.save(Path(root) / 'semseg_prior_factor.npy', prior.numpy().astype(np.float64))
    with cpu_cuda(): ms = {t: M.TaskonomyMetrics(t, str(root)) for t in
                           ('segment_semantic', 'normal', 'depth_zbuffer', 'keypoints2d', 'edge_texture')}
    ours = {'segment_semantic': SegMetrics(17, 255, conv, seg_err=True, class_weight=prior),
            'normal': NormalMetrics(conv, cos_sim=True), 'depth_zbuffer': DepthMetrics(conv),
            'keypoints2d': L1Metrics(255, conv), 'edge_texture': L1Metrics(255, conv)}
    seg = [_seg_batch(g, B, 17, 255) for B in BATCHES]
    _run(ms['segment_semantic'], ours['segment_semantic'], [(p, l[:, None].float(), None, l) for p, l in seg])
    nrm = []
    for B in BATCHES:  # labels in [-1, 1], the validity mask from depth (tiled to 3 channels), as its loader gives
        gt = 2 * torch.rand(B, 3, *LABEL, generator=g) - 1
        mask = (torch.rand(B, 1, *LABEL, generator=g) > 0.2).float().expand(B, 3, *LABEL)
        pred = torch.nn.functional.interpolate(gt, size=PRED) + 0.5 * torch.randn(B, 3, *PRED, generator=g)
        nrm.append((pred, gt, mask, gt * mask))
    _run(ms['normal'], ours['normal'], nrm)
    dep = []
    for B in BATCHES:  # log-depth in [0, 1], mask from depth < 64500, crop padding 255
        gt = 0.05 + 0.95 * torch.rand(B, 1, *LABEL, generator=g)
        mask = (torch.rand(B, 1, *LABEL, generator=g) > 0.2).float()
        gt[torch.rand(B, 1, *LABEL, generator=g) < 0.05] = 255
        pred = torch.rand(B, 1, *PRED, generator=g)
        dep.append((pred, gt, mask, torch.where((mask == 1) & (gt != 255), gt, 0.)))
    _run(ms['depth_zbuffer'], ours['depth_zbuffer'], dep)
    for t in ('keypoints2d', 'edge_texture'):
        kb = []
        for B in BATCHES:  # labels in [-1, 1] with crop padding 255
            gt = 2 * torch.rand(B, 1, *LABEL, generator=g) - 1
            gt[torch.rand(B, 1, *LABEL, generator=g) < 0.1] = 255
            kb.append((2 * torch.rand(B, 1, *PRED, generator=g) - 1, gt, None, gt))
        _run(ms[t], ours[t], kb)
    names = {'segment_semantic': ('seg', 'seg'), 'normal': ('normal', 'sn'), 'depth_zbuffer': ('depth', 'depth'),
             'keypoints2d': ('keypoint', 'keypoint_edge'), 'edge_texture': ('edge', 'keypoint_edge')}
    for t, (ours_name, kind) in names.items():
        o, r = original_values(ms[t], 'TaskonomyMetrics', kind), ours[t].compute()
        _compare(f'taskonomy {ours_name}', o, r, out); _delta(f'taskonomy {ours_name}', ms[t], o, r, out)


def metric_checks(original_path, # root of the original AutoMTL tree
                  convention:str='original', # our metric convention to compare ('ours' shows what differs)
                 )->list:
    ("[(check name, largest abs difference, passed)] for every metric and Δt: "
     "ours in `convention` vs the original code.")
    M, out = load_original(original_path), {}
    with tempfile.TemporaryDirectory() as root:
        for s in SEEDS:
            _cityscapes(M, s, out, convention); _nyuv2(M, s, out, convention); _taskonomy(M, s, out, root, convention)
    return [(name, max(d for d, _ in r), all(ok for _, ok in r)) for name, r in out.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--original', required=True, help="root of the original AutoMTL tree (with data/metrics/)")
    checks = metric_checks(ap.parse_args(argv).original)
    for name, diff, ok in checks: print(f"{'ok  ' if ok else 'FAIL'} metrics {name:<32} max |diff| = {diff:.2e}")
    bad = [c for c in checks if not c[2]]
    print(f"metrics: {len(checks) - len(bad)}/{len(checks)} checks within {RTOL:g} relative")
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
