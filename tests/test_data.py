"""Deeper checks of `automtl_nb.data`: synthetic-scene determinism and label consistency, real-layout decoding against
hand values, split selection, augmentation, loaders and error messages."""
import json, math, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from automtl_nb import data
from automtl_nb.metrics import TASK_KINDS
from automtl_nb.data import (NORMS, CAFFE_MEAN_BGR, DEFAULT_SYNTHETIC_TASKS, CONFLICTING_SYNTHETIC_TASK, SPLITS,
                             check_sample, normalize_image, denormalize_image, synthetic_tasks, synthetic_class_names,
                             SyntheticScenes, synthetic_splits, render_scenes, DataLayoutError, resize_sample, Augment,
                             CityScapes, NYUv2, Taskonomy, decode_nyu_normals, make_cityscapes_fixture,
                             make_nyuv2_fixture, make_taskonomy_fixture, get_datasets, get_dataloaders)
from automtl_nb.data import _sample_scene, _rays, _FAR

ALL = list(synthetic_tasks())


# ================================================================ synthetic scenes
@pytest.fixture(scope='module')
def scenes():
    "40 items at 48×48 with every task, raw images ([0, 1]) and the instance maps from `render`."
    ds = SyntheticScenes(40, size=(48, 48), tasks=ALL, norm='none', seed=3)
    return ds, [ds[i] for i in range(len(ds))], [ds.render(i) for i in range(len(ds))]


def test_default_and_conflicting_tasks():
    ds = SyntheticScenes(2, size=(8, 8))
    assert list(ds.tasks) == ['seg', 'depth', 'normal', 'edge', 'keypoint'] == list(DEFAULT_SYNTHETIC_TASKS)
    assert CONFLICTING_SYNTHETIC_TASK == 'texture' and 'texture' not in ds.tasks and 'tint' not in ds.tasks
    assert ds.tasks['seg'] == dict(kind='seg', n_out=4, ignore_index=-1)
    assert SyntheticScenes(2, size=(8, 8), tasks=['tint']).tasks == {'tint': dict(kind='seg', n_out=2, ignore_index=-1)}
    assert all(spec['kind'] in TASK_KINDS for spec in synthetic_tasks(7).values())
    assert synthetic_tasks(7)['seg']['n_out'] == 7 and len(synthetic_class_names(7)) == 7


def _texture_vs_shape(conflict, n=60):
    "Pairs (seg class, texture label) over the object pixels of `n` scenes of a world with knob `conflict`."
    ds = SyntheticScenes(n, size=(32, 32), tasks=['seg', 'texture'], seed=1, conflict=conflict)
    seg, tex = torch.stack([ds[i]['seg'] for i in range(n)]), torch.stack([ds[i]['texture'] for i in range(n)])
    obj = seg > 0
    return seg[obj], tex[obj], (seg == 0) == (tex == 0), (seg == -1) == (tex == -1)


def test_relatedness_knob():
    "Knob off: texture is a function of the shape class (sphere plain, box stripes, cylinder checker). On: independent."
    seg, tex, floor_same, sky_same = _texture_vs_shape(0.)
    assert floor_same.all() and sky_same.all()
    # class c (1 sphere, 2 box, 3 cylinder) wears texture c (1 plain, 2 stripes, 3 checker)
    assert torch.equal(tex, seg)
    seg, tex, floor_same, sky_same = _texture_vs_shape(1.)
    assert floor_same.all() and sky_same.all()
    joint = torch.zeros(3, 3).index_put_((seg - 1, tex - 1), torch.ones(len(seg)), accumulate=True)
    assert (joint > 0).all()  # every shape wears every texture
    assert (tex == seg).float().mean() < .6  # far from the knob-off identity (1/3 when independent, pixel-weighted)
    a, b = (SyntheticScenes(3, size=(16, 16), conflict=c, norm='none') for c in (0., 1.))
    for i in range(3):  # same scenes: only the textures (and so the image) differ
        assert torch.equal(a[i]['depth'], b[i]['depth']) and torch.equal(a[i]['seg'], b[i]['seg'])


def test_items_follow_the_convention(scenes):
    ds, items, _ = scenes
    for s in items: check_sample(s, ds.tasks)
    b = torch.utils.data.default_collate(items[:4])
    assert b['img'].shape == (4, 3, 48, 48) and b['seg'].shape == (4, 48, 48) and b['normal'].shape == (4, 3, 48, 48)
    assert b['depth'].shape == b['edge'].shape == b['keypoint'].shape == (4, 1, 48, 48)


def test_determinism_within_and_across_instances():
    a, b = SyntheticScenes(10, size=(24, 32), seed=5), SyntheticScenes(10, size=(24, 32), seed=5)
    big = SyntheticScenes(70, size=(24, 32), seed=5)  # other length, so item 7 is rendered in another block
    for i in (0, 7, 9):
        x = a[i]
        for other in (a[i], b[i], big[i], big.subset(5, 5)[i - 5] if i >= 5 else big[i]):
            for k in x: assert torch.equal(x[k], other[k]), (i, k)
    assert torch.equal(a[-1]['img'], a[9]['img'])


def test_determinism_across_processes():
    code = ("import torch\nfrom automtl_nb.data import SyntheticScenes\n"
            "s = SyntheticScenes(6, size=(16, 16), seed=2)[4]\n"
            "print(repr([float(v.double().sum()) for v in s.values()]))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    s = SyntheticScenes(6, size=(16, 16), seed=2)[4]
    assert out == repr([float(v.double().sum()) for v in s.values()])


def test_dataloader_workers_give_the_same_items():
    ds = SyntheticScenes(8, size=(16, 16), seed=1)
    direct = torch.utils.data.default_collate([ds[i] for i in range(8)])
    batches = list(torch.utils.data.DataLoader(SyntheticScenes(8, size=(16, 16), seed=1), batch_size=4, num_workers=2))
    for k in direct: assert torch.equal(torch.cat([b[k] for b in batches]), direct[k])


def test_seeds_and_splits_differ():
    a = SyntheticScenes(6, size=(16, 16), seed=0)
    for other in (SyntheticScenes(6, size=(16, 16), seed=1), SyntheticScenes(6, size=(16, 16), split='val')):
        assert all(not torch.equal(a[i]['img'], other[j]['img']) for i in range(6) for j in range(6))
    va, te = SyntheticScenes(3, size=(16, 16), split='val'), SyntheticScenes(3, size=(16, 16), split='test')
    assert not torch.equal(va[0]['depth'], te[0]['depth'])


def test_validity_masks_agree(scenes):
    "No surface ⇔ seg ignore ⇔ depth 0 ⇔ zero normal ⇔ tint ignore; surfaces are within the sensor range."
    _, items, _ = scenes
    for s in items:
        sky = s['seg'] == -1
        assert torch.equal(sky, s['depth'][0] == 0)
        assert torch.equal(sky, (s['normal'] == 0).all(0))
        assert torch.equal(sky, s['tint'] == -1)
        d = s['depth'][0][~sky]
        assert (d > 0).all() and (d <= _FAR + 1e-4).all()
        assert (s['depth'][0][s['seg'] > 0] < 12).all()  # objects stand between 2.5 and 7.5 units away


def test_normals_are_unit_and_face_the_camera(scenes):
    _, items, _ = scenes
    dx, dy, _ = _rays((48, 48))
    d = torch.stack([dx, dy, -torch.ones_like(dx)]).view(3, 48, 48)
    for s in items:
        n, ok = s['normal'], s['seg'] >= 0
        torch.testing.assert_close(n.norm(dim=0)[ok], torch.ones(int(ok.sum())), atol=1e-4, rtol=0)
        assert ((n * d).sum(0)[ok] < 1e-4).all()  # visible surfaces point against the viewing ray


def _normals_from_depth(depth):
    "Normals of the back-projected depth map by central differences (interior pixels), like the tasks' relation."
    dx, dy, _ = _rays(depth.shape)
    H, W = depth.shape
    P = torch.stack([depth * dx.view(H, W), depth * dy.view(H, W), -depth])  # (3, H, W) points
    gx, gy = P[:, 1:-1, 2:] - P[:, 1:-1, :-2], P[:, :-2, 1:-1] - P[:, 2:, 1:-1]  # right − left, up − down
    return F.normalize(torch.cross(gx, gy, dim=0), dim=0)


def test_normals_agree_with_the_depth_map(scenes):
    "Surface normals are the derivative of the depth map: compare where a pixel's 3×3 neighbourhood is one surface."
    _, items, renders = scenes
    cos_all = []
    for s, r in zip(items, renders):
        inst = r['inst']
        same = torch.ones(46, 46, dtype=torch.bool)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1): same &= inst[1 + di:47 + di, 1 + dj:47 + dj] == inst[1:-1, 1:-1]
        same &= inst[1:-1, 1:-1] >= 0
        cos_all.append((_normals_from_depth(s['depth'][0]) * s['normal'][:, 1:-1, 1:-1]).sum(0)[same])
    cos = torch.cat(cos_all)
    assert cos.median() > 0.999 and (cos > 0.95).float().mean() > 0.95


def test_edges_are_surface_boundaries(scenes):
    """Edges = both pixels of every neighbour pair on different surfaces, checked with an independent loop; they contain
    every segmentation boundary."""
    _, items, renders = scenes
    for s, r in zip(items[:8], renders[:8]):
        inst, seg, e = r['inst'].numpy(), s['seg'].numpy(), s['edge'][0].numpy()
        H, W = inst.shape
        want, segb = np.zeros((H, W)), np.zeros((H, W), bool)
        for i in range(H):
            for j in range(W):
                for a, b in ((i + 1, j), (i, j + 1)):
                    if a < H and b < W:
                        if inst[i, j] != inst[a, b]: want[i, j] = want[a, b] = 1
                        if seg[i, j] != seg[a, b]: segb[i, j] = segb[a, b] = True
        np.testing.assert_array_equal(e, want)
        assert e[segb].all()


def test_keypoints_sit_on_visible_objects(scenes):
    _, items, renders = scenes
    n_peaks = 0
    for s, r in zip(items, renders):
        k = s['keypoint'][0]
        assert k.min() >= 0 and k.max() <= 1
        peaks = (k == F.max_pool2d(k[None, None], 3, 1, 1)[0, 0]) & (k > 0.6)
        n_peaks += int(peaks.sum())
        assert (r['inst'][peaks] > 0).all()  # a peak is on an object (slot > 0), never on floor or sky
    assert n_peaks >= len(items)  # at least one visible object per scene on average


def test_tint_is_independent_of_class_and_visible_in_the_image(scenes):
    "The conflicting task: per-surface bit, independent of the class, carried by the hue (warm: R > B, cool: B > R)."
    _, items, renders = scenes
    per_class, rb = {}, {0: [], 1: []}
    for s, r in zip(items, renders):
        for slot in r['inst'].unique().tolist():
            if slot < 0: continue
            m = r['inst'] == slot
            t = s['tint'][m].unique()
            assert len(t) == 1  # one tint per surface
            per_class.setdefault(int(s['seg'][m][0]), []).append(int(t))
            img = s['img'][:, m]
            rb[int(t)].append(float((img[0] - img[2]).mean()))
    for c, ts in per_class.items():
        if len(ts) >= 10: assert 0.2 < np.mean(ts) < 0.8, (c, np.mean(ts))
    assert np.mean(rb[0]) > 0.05 and np.mean(rb[1]) < -0.05


def test_hand_built_scene_depths_and_normals():
    "A box facing the camera and the floor, against closed-form depth and normals."
    sc = _sample_scene(0, 'train', 0, (33, 33), 4)
    sc['active'][:] = False
    sc['active'][:2] = True
    sc['shape'][1], sc['half'][1] = 1, [0.5, 0.5, 0.5]
    sc['axes'][1] = sc['axes'][0]  # aligned with the floor's (world) axes
    h, R = float(sc['cam_h'][0]), sc['R']
    sc['centre'][1] = R @ np.array([0., 0.5, -4.]) - R @ np.array([0., h, 0.])
    from automtl_nb.data import _slot_scalars
    r = render_scenes([_slot_scalars(sc)], (33, 33))
    dx, dy, f = _rays((33, 33))
    d = torch.stack([dx, dy, -torch.ones_like(dx)], -1).view(33, 33, 3).double()
    up = torch.tensor(R @ [0., 1, 0])
    floor = r['inst'][0] == 0
    # floor: depth = -h / (up·d), normal = up
    t_floor = -h / (d @ up)
    torch.testing.assert_close(r['depth'][0, 0][floor].double(), t_floor[floor], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r['normal'][0].permute(1, 2, 0)[floor].double(), up.expand(int(floor.sum()), 3),
                               atol=1e-5, rtol=0)
    # the box's front face (world normal +z) seen at the pixel of its face centre
    p = torch.tensor(R @ (np.array([0., 0.5, -3.5]) - np.array([0., h, 0.])))
    row, col = round(float(-p[1] / -p[2] * f + 16)), round(float(p[0] / -p[2] * f + 16))
    assert r['inst'][0, row, col] == 1
    torch.testing.assert_close(r['normal'][0, :, row, col].double(), torch.tensor(R @ [0., 0, 1]), atol=1e-5, rtol=0)
    # the depth there is that of the plane through the face: t = (n·p) / (n·d)
    n = torch.tensor(R @ [0., 0, 1])
    torch.testing.assert_close(r['depth'][0, 0, row, col].double(), (n @ p) / (n @ d[row, col]), rtol=1e-5, atol=1e-5)


def test_more_classes_and_images():
    ds = SyntheticScenes(60, size=(16, 16), n_classes=10, tasks=['seg'], norm='none')
    labels = torch.cat([ds[i]['seg'].flatten() for i in range(60)]).unique().tolist()
    assert labels[0] == -1 and max(labels) == 9 and len(labels) >= 9
    for i in range(5): assert 0 <= ds[i]['img'].min() and ds[i]['img'].max() <= 1


def test_normalised_images_round_trip():
    raw = SyntheticScenes(3, size=(16, 16), norm='none')
    for norm in NORMS:
        x = SyntheticScenes(3, size=(16, 16), norm=norm)[1]['img']
        torch.testing.assert_close(denormalize_image(x, norm), raw[1]['img'], atol=1e-5, rtol=0)


def test_synthetic_splits():
    sp = synthetic_splits(20, 6, size=(16, 16), seed=4, tasks=['seg', 'tint'], n_classes=5)
    assert {k: len(v) for k, v in sp.items()} == {'train': 20, 'train1': 16, 'train2': 4, 'val': 6, 'test': 6}
    assert list(sp['train1'].tasks) == ['seg', 'tint'] and sp['val'].tasks['seg']['n_out'] == 5
    for i in range(4): assert torch.equal(sp['train2'][i]['seg'], sp['train'][16 + i]['seg'])
    assert sp['train1']._cache is sp['train']._cache is sp['train2']._cache
    assert sp['val'].split == 'val' and sp['test'].split == 'test'
    assert not torch.equal(sp['val'][0]['img'], sp['test'][0]['img'])
    assert len(synthetic_splits(2, 1, size=(8, 8))['train2']) == 1
    with pytest.raises(ValueError, match='n_train >= 2'): synthetic_splits(1, 1)
    with pytest.raises(ValueError, match='0 < frac < 1'): synthetic_splits(10, 1, frac=1.)


def test_synthetic_errors():
    with pytest.raises(ValueError, match=r"size must be \(H, W\) with H, W >= 4"): SyntheticScenes(2, size=(2, 8))
    with pytest.raises(ValueError, match='n_classes must be in 2..10'): SyntheticScenes(2, n_classes=1)
    with pytest.raises(ValueError, match='unknown image normalisation'): SyntheticScenes(2, norm='bgr')
    with pytest.raises(ValueError, match="split must be one of"): SyntheticScenes(2, split='train2')
    with pytest.raises(ValueError, match=r"unknown or no tasks \['sem'\]"): SyntheticScenes(2, tasks=['seg', 'sem'])
    with pytest.raises(IndexError, match='out of range'): SyntheticScenes(2, size=(8, 8))[2]


def test_rendering_runs_single_threaded_and_gives_the_thread_count_back(monkeypatch):
    "Rendering is many small ops, run with one torch thread; the caller's thread count comes back, also after an error."
    seen, real = [], data.render_scenes
    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(data, 'render_scenes', spy)
        ds = SyntheticScenes(6, size=(16, 16), seed=4)
        x0, x, r = ds[0], ds[5], ds.render(5)
        assert seen == [1, 1] and torch.get_num_threads() == 2  # one block of the 6 items from item 0, then `render`
        assert torch.equal(x['seg'], r['seg']) and torch.equal(x['depth'], r['depth'])
        assert len(ds._cache) == 6 and ds[0] is not x0 and torch.equal(ds[0]['img'], x0['img'])  # cached, copied out
        def boom(*a, **kw): raise RuntimeError('boom')
        monkeypatch.setattr(data, 'render_scenes', boom)
        with pytest.raises(RuntimeError, match='boom'): SyntheticScenes(2, size=(8, 8))[0]
        assert torch.get_num_threads() == 2
    finally: torch.set_num_threads(n)


# ================================================================ sample convention, normalisation, resize, augment
def test_check_sample_errors():
    tasks = {'n': dict(kind='normal', n_out=3), 'k': dict(kind='keypoint', n_out=1)}
    s = {'img': torch.rand(3, 4, 5), 'n': torch.zeros(3, 4, 5), 'k': torch.zeros(1, 4, 5)}
    check_sample(s, tasks)
    with pytest.raises(ValueError, match=r"'img'\] must be a float32 tensor \[3, H, W\]"):
        check_sample({**s, 'img': torch.rand(1, 4, 5)}, tasks)
    with pytest.raises(ValueError, match=r"'n' \(normal\) must be torch.float32 of shape \[3, 4, 5\]"):
        check_sample({**s, 'n': torch.zeros(4, 5)}, tasks)
    with pytest.raises(ValueError, match="kinds are"): check_sample(s, {'x': dict(kind='flow')})


def test_caffe_normalisation_by_hand():
    img = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, 2, 2)
    x = normalize_image(img, 'caffe')
    want = torch.tensor([0.6 * 255 - CAFFE_MEAN_BGR[0], 0.4 * 255 - CAFFE_MEAN_BGR[1], 0.2 * 255 - CAFFE_MEAN_BGR[2]])
    torch.testing.assert_close(x[:, 0, 0], want)
    want = (torch.tensor([.2, .4, .6]) - torch.tensor([.485, .456, .406])) / torch.tensor([.229, .224, .225])
    torch.testing.assert_close(normalize_image(img, 'imagenet')[:, 1, 1], want)


def test_resize_keeps_labels_and_invalids():
    tasks = {'seg': dict(kind='seg', n_out=3, ignore_index=255), 'depth': dict(kind='depth', n_out=1)}
    s = {'img': torch.rand(3, 8, 8), 'seg': torch.randint(0, 3, (8, 8)), 'depth': torch.rand(1, 8, 8)}
    s['seg'][:4] = 255
    s['depth'][:, :4] = 0
    r = resize_sample(s, tasks, (5, 11))
    assert set(r['seg'].unique().tolist()) <= {0, 1, 2, 255} and r['seg'].dtype == torch.int64
    assert set(r['depth'].unique().tolist()) <= set(s['depth'].unique().tolist())
    assert resize_sample(s, tasks, (8, 8)) is s


def test_augment_is_a_function_of_the_generator_and_flips_normals():
    tasks = {'normal': dict(kind='normal', n_out=3), 'seg': dict(kind='seg', n_out=4, ignore_index=-1)}
    s = {'img': torch.rand(3, 6, 8), 'normal': F.normalize(torch.randn(3, 6, 8), dim=0),
         'seg': torch.randint(0, 4, (6, 8))}
    a = Augment(crop=(6, 8), scale=(1, 1))  # only the flip remains random
    flipped = 0
    for seed in range(12):
        o = a(s, tasks, torch.Generator().manual_seed(seed))
        o2 = a(s, tasks, torch.Generator().manual_seed(seed))
        assert all(torch.equal(o[k], o2[k]) for k in o)
        if torch.equal(o['img'], s['img']): assert torch.equal(o['normal'], s['normal'])
        else:
            flipped += 1
            assert torch.equal(o['img'], s['img'].flip(-1)) and torch.equal(o['seg'], s['seg'].flip(-1))
            assert torch.equal(o['normal'][0], -s['normal'][0].flip(-1))
            assert torch.equal(o['normal'][1:], s['normal'][1:].flip(-1))
    assert 0 < flipped < 12
    torch.manual_seed(7)
    x = Augment((4, 4))(s, tasks)
    torch.manual_seed(7)
    y = Augment((4, 4))(s, tasks)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_augment_pads_with_invalid_values():
    tasks = {'seg': dict(kind='seg', n_out=4, ignore_index=-1), 'depth': dict(kind='depth', n_out=1),
             'normal': dict(kind='normal', n_out=3)}
    s = {'img': torch.ones(3, 4, 4), 'seg': torch.zeros(4, 4, dtype=torch.long), 'depth': torch.ones(1, 4, 4),
         'normal': torch.ones(3, 4, 4)}
    o = Augment(crop=(10, 12), scale=(1, 1), flip=False)(s, tasks, torch.Generator().manual_seed(0))
    pad = o['img'][0] == 0
    assert pad.sum() == 10 * 12 - 16
    assert (o['seg'][pad] == -1).all() and (o['depth'][0][pad] == 0).all() and (o['normal'][:, pad] == 0).all()
    assert (o['seg'][~pad] == 0).all() and (o['depth'][0][~pad] == 1).all()


# ================================================================ CityScapes
@pytest.fixture()
def cs_root(tmp_path): return make_cityscapes_fixture(tmp_path / 'cs', n=3, size=(16, 32), seed=1)


def test_cityscapes_reads_the_files(cs_root):
    d = json.loads((cs_root / 'cityscape.json').read_text())
    assert {k: len(v) for k, v in d.items()} == {'train': 3, 'train1': 2, 'train2': 1, 'test': 3}
    ds = CityScapes(cs_root, 'test', norm='none')
    assert ds.tasks == {'seg': dict(kind='seg', n_out=19, ignore_index=-1), 'depth': dict(kind='depth', n_out=1)}
    img, dep, l2, l7, l19 = (np.load(cs_root / p) for p in d['test'][1])
    x = ds[1]
    check_sample(x, ds.tasks)
    torch.testing.assert_close(x['img'], torch.from_numpy(img).permute(2, 0, 1))
    torch.testing.assert_close(x['depth'], torch.from_numpy(dep).permute(2, 0, 1))
    assert torch.equal(x['seg'], torch.from_numpy(l19).long()) and x['seg'][0, 0] == -1 and x['depth'][0, 0, 0] == 0
    assert (x['seg'] == -1).any() and x['depth'].max() < 0.5  # inverse depth of surfaces at least 2 units away
    assert torch.equal(CityScapes(cs_root, 'test', label_set=2)[1]['seg'], torch.from_numpy(l2).long())
    assert set(CityScapes(cs_root, 'test', label_set=2)[1]['seg'].unique().tolist()) <= {-1, 0, 1}
    assert list(CityScapes(cs_root, 'test', tasks=['depth'])[0]) == ['img', 'depth']


def test_cityscapes_splits_and_layouts_agree(cs_root):
    sizes = {s: len(CityScapes(cs_root, s)) for s in ('train', 'train1', 'train2', 'test', 'val')}
    assert sizes == {'train': 3, 'train1': 2, 'train2': 1, 'test': 3, 'val': 3}
    for split in ('train', 'train1', 'train2', 'val'):
        a, b = CityScapes(cs_root, split), CityScapes(cs_root, split, layout='mtan')
        assert len(a) == len(b)
        for i in range(len(a)): assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    assert torch.equal(CityScapes(cs_root, 'train2')[0]['img'], CityScapes(cs_root, 'train')[2]['img'])
    with pytest.raises(ValueError,
                       match=r"split 'train3' is not in .*cityscape.json; "
                             r"it has \['test', 'train', 'train1', 'train2'\]"):
        CityScapes(cs_root, 'train3')


def test_cityscapes_caffe_norm_and_augmentation(cs_root):
    raw, caffe = CityScapes(cs_root, 'train', norm='none')[0], CityScapes(cs_root, 'train', norm='caffe')[0]
    want = raw['img'].flip(0) * 255 - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(caffe['img'], want)
    ds = CityScapes(cs_root, 'train', augment=True, crop=(12, 20))
    torch.manual_seed(0)
    x = ds[0]
    torch.manual_seed(0)
    y = ds[0]
    assert x['img'].shape == (3, 12, 20) and x['seg'].shape == (12, 20) and all(torch.equal(x[k], y[k]) for k in x)
    r = CityScapes(cs_root, 'test', resize=(8, 16))[0]
    assert r['img'].shape == (3, 8, 16) and r['depth'].shape == (1, 8, 16)


def test_cityscapes_layout_errors(cs_root, tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"nowhere does not exist or is not a directory; expected layout: <root>/cityscape.json"):
        CityScapes(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/cityscape.json not found; expected layout: .*label19"):
        CityScapes(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match=r"empty/train/image not found; expected layout: <root>/\{train,val\}"):
        CityScapes(tmp_path / 'empty', layout='mtan')
    with pytest.raises(ValueError, match='a data root is needed'): CityScapes(None)
    d = json.loads((cs_root / 'cityscape.json').read_text())
    d['train'][1] = d['train'][1][:4]
    (cs_root / 'cityscape.json').write_text(json.dumps(d))
    with pytest.raises(DataLayoutError,
                       match=r"entry 1 of split 'train' is .*; "
                             r"expected a list of 5 paths \[img, depth, label2, label7, label19\]"):
        CityScapes(cs_root, 'train')
    (cs_root / 'cityscape.json').write_text('{"train": [')
    with pytest.raises(DataLayoutError, match='is not valid JSON'): CityScapes(cs_root)
    (cs_root / 'cityscape.json').write_text('[1, 2]')
    with pytest.raises(DataLayoutError, match=r"must hold a JSON object \{split: \[entries\]\}"): CityScapes(cs_root)


def test_cityscapes_file_errors(cs_root):
    ds = CityScapes(cs_root, 'test')
    (cs_root / 'val' / 'depth' / '1.npy').unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"val/depth/1.npy not found \(depth of entry 1 of split 'test'\); expected layout"):
        ds[1]
    np.save(cs_root / 'val' / 'image' / '0.npy', np.zeros((16, 32, 4), np.float32))
    with pytest.raises(DataLayoutError, match=r"val/image/0.npy: image has shape \(16, 32, 4\); expected \(H, W, 3\)"):
        ds[0]
    np.save(cs_root / 'val' / 'image' / '2.npy', np.zeros((16, 30, 3), np.float32))
    with pytest.raises(DataLayoutError,
                       match=r"entry 2 of split 'test': seg is \(16, 32\) but the image is \(16, 30\)"):
        ds[2]
    # entry 1 has no depth file any more, which a seg-only dataset does not need
    np.save(cs_root / 'val' / 'label_19' / '1.npy', np.zeros((16, 32, 1), np.float32))
    with pytest.raises(DataLayoutError, match=r"label_19/1.npy: label19 has shape \(16, 32, 1\); expected \(H, W\)"):
        CityScapes(cs_root, 'test', tasks=['seg'])[1]
    with pytest.raises(ValueError, match="layout must be 'json' or 'mtan'"): CityScapes(cs_root, layout='npy')


def _entries_leading_out(root, fname, rel):
    "Make entry 1 of split 'test' in <root>/<fname> name `rel` in its second field."
    d = json.loads((root / fname).read_text())
    d['test'][1][1] = rel
    (root / fname).write_text(json.dumps(d))


@pytest.mark.parametrize('rel', ['../outside.npy', '../missing.npy', 'val/../../outside.npy', '..'])
def test_split_file_paths_must_stay_inside_the_data_root(cs_root, rel, monkeypatch):
    "Refused by split file, entry and root before any file is looked at: the message does not tell what exists outside."
    np.save(cs_root.parent / 'outside.npy', np.zeros((16, 32, 1), np.float32))
    _entries_leading_out(cs_root, 'cityscape.json', rel)
    looked = []
    real = Path.is_file
    monkeypatch.setattr(Path, 'is_file', lambda p: looked.append(p) or real(p))
    with pytest.raises(DataLayoutError) as e: CityScapes(cs_root, 'test')
    assert str(e.value).startswith(f"{cs_root}/cityscape.json: depth of entry 1 of split 'test' is {rel!r}, which is "
                                   f"outside the data root {cs_root}: a split file may only name files inside")
    assert looked == [cs_root / 'cityscape.json']  # the split file only
    CityScapes(cs_root, 'train')  # the other splits still load
    ds = CityScapes(cs_root, 'train', norm='none')
    ds.entries[0] = {**ds.entries[0], 'img': rel}  # entries given to the dataset directly are checked too
    looked.clear()
    with pytest.raises(DataLayoutError,
                       match=rf"img of entry 0 of split 'train' is '{re.escape(rel)}', which is outside the data root"):
        ds[0]
    assert looked == []


def test_paths_inside_the_root_may_go_through_dot_dot_and_symlinks(cs_root, tmp_path):
    d = json.loads((cs_root / 'cityscape.json').read_text())
    want = CityScapes(cs_root, 'test', norm='none')[1]
    _entries_leading_out(cs_root, 'cityscape.json', '/val/image/../depth/1.npy')  # a leading '/' is the root
    assert torch.equal(CityScapes(cs_root, 'test', norm='none')[1]['depth'], want['depth'])
    (tmp_path / 'elsewhere').mkdir()
    (cs_root / 'val' / 'depth').rename(tmp_path / 'elsewhere' / 'depth')
    (cs_root / 'val' / 'depth').symlink_to(tmp_path / 'elsewhere' / 'depth')  # the root's owner put the link there
    _entries_leading_out(cs_root, 'cityscape.json', d['test'][1][1])
    assert torch.equal(CityScapes(cs_root, 'test', norm='none')[1]['depth'], want['depth'])


def test_nyu_and_taskonomy_split_files_are_checked_too(tmp_path):
    nyu = make_nyuv2_fixture(tmp_path / 'nyu', n=2, size=(8, 8))
    _entries_leading_out(nyu, 'nyu_v2_3task.json', '../x.png')
    with pytest.raises(DataLayoutError,
                       match=r"nyu_v2_3task.json: seg of entry 1 of split 'test' is '../x.png', which is outside"):
        NYUv2(nyu, 'val')
    tk = make_taskonomy_fixture(tmp_path / 'tk', n=2, size=(8, 8), split_dirs=True)
    _entries_leading_out(tk, 'taskonomy.json', '../../x.png')
    with pytest.raises(DataLayoutError,
                       match=r"taskonomy.json: segmentsemantic of entry 1 of split 'test' is '../../x.png'"):
        Taskonomy(tk, 'test')


# ================================================================ NYUv2
@pytest.fixture()
def nyu_root(tmp_path): return make_nyuv2_fixture(tmp_path / 'nyu', n=2, size=(16, 32), seed=2)


def _poke_png(path, ij, value):
    a = np.array(Image.open(path))
    a[ij] = value
    Image.fromarray(a).save(path)


def test_nyu_decodes_known_pixels(nyu_root):
    d = json.loads((nyu_root / 'nyu_v2_3task.json').read_text())
    assert {k: len(v) for k, v in d.items()} == {'train': 2, 'train1': 1, 'train2': 1, 'test': 2}
    img_p, seg_p, nrm_p, dep_p = (nyu_root / p for p in d['train'][0])
    _poke_png(nrm_p, (2, 3), (255, 128, 0))
    _poke_png(nrm_p, (2, 4), (255, 255, 255))
    _poke_png(nrm_p, (2, 5), (0, 255, 64))
    _poke_png(seg_p, (3, 3), 255)
    _poke_png(seg_p, (3, 4), 39)
    ds = NYUv2(nyu_root, 'train', norm='none')
    assert ds.tasks == {'seg': dict(kind='seg', n_out=40, ignore_index=255), 'normal': dict(kind='normal', n_out=3),
                        'depth': dict(kind='depth', n_out=1)}
    x = ds[0]
    check_sample(x, ds.tasks)
    torch.testing.assert_close(x['normal'][:, 2, 3], torch.tensor([1., 1 / 255, -1.]))
    assert torch.equal(x['normal'][:, 2, 4], torch.zeros(3))
    torch.testing.assert_close(x['normal'][:, 2, 5], torch.tensor([-1., 1., 64 / 255 * 2 - 1]))
    assert x['seg'][3, 3] == 255 and x['seg'][3, 4] == 39 and x['seg'][0, 0] == 255
    torch.testing.assert_close(x['img'], torch.from_numpy(np.array(Image.open(img_p))).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(x['depth'][0], torch.from_numpy(np.load(dep_p)))
    raw = NYUv2(nyu_root, 'train', normal='raw_bgr', tasks=['normal'])[0]['normal']
    # any channel at 255: invalid
    assert torch.equal(raw[:, 2, 3], torch.zeros(3)) and torch.equal(raw[:, 2, 5], torch.zeros(3))
    enc = np.array(Image.open(nrm_p))[5, 6]
    if (enc < 255).all(): assert torch.equal(raw[:, 5, 6], torch.tensor(enc[::-1].astype(np.float32)))


def test_nyu_decoded_normals_are_unit_and_match_the_encoding(nyu_root):
    x = NYUv2(nyu_root, 'test')[1]
    ok = (x['normal'] != 0).any(0)
    assert ok.float().mean() > 0.3
    torch.testing.assert_close(x['normal'].norm(dim=0)[ok], torch.ones(int(ok.sum())), atol=0.02, rtol=0)
    assert not ok[0, 0]


def test_nyu_mtan_layout(tmp_path):
    root = make_nyuv2_fixture(tmp_path / 'nyu_m', n=3, size=(12, 16), layout='mtan')
    assert not (root / 'nyu_v2_3task.json').exists()
    ds = NYUv2(root, 'val', layout='mtan')
    assert len(ds) == 3 and ds.tasks['seg'] == dict(kind='seg', n_out=13, ignore_index=-1)
    x = ds[2]
    check_sample(x, ds.tasks)
    want = torch.from_numpy(np.load(root / 'val' / 'normal' / '2.npy')).permute(2, 0, 1)
    torch.testing.assert_close(x['normal'], want)
    assert x['seg'][0, 0] == -1 and x['depth'][0, 0, 0] == 0
    assert [len(NYUv2(root, s, layout='mtan')) for s in ('train', 'train1', 'train2', 'test')] == [3, 2, 1, 3]
    with pytest.raises(ValueError, match="raw_bgr' needs the json layout"): NYUv2(root, layout='mtan', normal='raw_bgr')
    with pytest.raises(ValueError, match="split 'train3' is not one of"): NYUv2(root, 'train3', layout='mtan')


def test_nyu_resize_and_errors(nyu_root):
    x = NYUv2(nyu_root, 'test', resize=(21, 21))[0]
    assert x['img'].shape == (3, 21, 21) and x['normal'].shape == (3, 21, 21) and x['seg'].shape == (21, 21)
    with pytest.raises(ValueError, match="normal mode must be 'decoded' or 'raw_bgr'"): NYUv2(nyu_root, normal='bgr')
    with pytest.raises(ValueError,
                       match=r"NYUv2: unknown or no tasks \['edge'\]; available: \['seg', 'normal', 'depth'\]"):
        NYUv2(nyu_root, tasks=['seg', 'edge'])
    d = json.loads((nyu_root / 'nyu_v2_3task.json').read_text())
    (nyu_root / d['test'][0][1]).write_bytes(b'not a png')
    with pytest.raises(DataLayoutError, match=r"seg/0002.png: cannot read seg as an image"): NYUv2(nyu_root, 'test')[0]
    (nyu_root / d['test'][1][0]).unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"img/0003.png not found \(img of entry 1 of split 'val'\); "
                             r"expected layout: <root>/nyu_v2_3task.json"):
        NYUv2(nyu_root, 'val')[1]


def test_decode_nyu_normals_hand_values():
    a = np.array([[[0, 0, 0], [255, 255, 255], [191, 64, 128]]], np.uint8)
    n = decode_nyu_normals(a)
    torch.testing.assert_close(n[:, 0, 0], torch.tensor([-1., -1, -1]))
    assert torch.equal(n[:, 0, 1], torch.zeros(3))
    torch.testing.assert_close(n[:, 0, 2], torch.tensor([191 / 255 * 2 - 1, 64 / 255 * 2 - 1, 128 / 255 * 2 - 1]))
    assert decode_nyu_normals(a).shape == (3, 1, 3) and decode_nyu_normals(a).dtype == torch.float32


# ================================================================ Taskonomy
@pytest.fixture()
def tk_root(tmp_path): return make_taskonomy_fixture(tmp_path / 'tk', n=2, size=(16, 32), seed=3)


def test_taskonomy_label_processing_against_hand_values(tk_root):
    d = json.loads((tk_root / 'taskonomy.json').read_text())
    assert {k: len(v) for k, v in d.items()} == {'train': 2, 'train1': 1, 'train2': 1, 'test': 2, 'test_small': 1}
    rgb, seg, nrm, dep, kp, edge = (tk_root / p for p in d['train'][1])
    _poke_png(dep, (1, 1), 255)
    _poke_png(dep, (1, 2), 64500)
    _poke_png(dep, (1, 3), 64499)
    _poke_png(nrm, (1, 1), (255, 0, 128))
    _poke_png(nrm, (1, 2), (255, 0, 128))
    _poke_png(kp, (2, 1), 164)
    _poke_png(kp, (2, 2), 655)
    _poke_png(kp, (2, 3), 0)
    _poke_png(edge, (3, 1), 2621)
    _poke_png(edge, (3, 2), 60000)
    _poke_png(seg, (4, 1), 0)
    _poke_png(seg, (4, 2), 1)
    _poke_png(seg, (4, 3), 17)
    ds = Taskonomy(tk_root, 'train', resize=None, norm='none')
    x = ds[1]
    check_sample(x, ds.tasks)
    torch.testing.assert_close(x['depth'][0, 1, 1:4], torch.tensor([0.5, 0., math.log(64500) / math.log(65536)]))
    torch.testing.assert_close(x['normal'][:, 1, 1], torch.tensor([1., -1., 128 / 255 * 2 - 1]))
    assert torch.equal(x['normal'][:, 1, 2], torch.zeros(3))  # invalid depth → invalid normal
    torch.testing.assert_close(x['keypoint'][0, 2, 1:4], torch.tensor([164 / 65536 / 0.005 * 2 - 1, 1., -1.]))
    torch.testing.assert_close(x['edge'][0, 3, 1:3], torch.tensor([2621 / 65536 / 0.08 * 2 - 1, 1.]))
    assert x['seg'][4, 1:4].tolist() == [0, 0, 16]
    ignored = Taskonomy(tk_root, 'train', resize=None, unlabeled='ignore', tasks=['seg'])[1]['seg']
    assert ignored[4, 1:4].tolist() == [255, 0, 16]
    torch.testing.assert_close(x['img'], torch.from_numpy(np.array(Image.open(rgb))).permute(2, 0, 1).float() / 255)


def test_taskonomy_tasks_splits_and_resize(tk_root):
    ds = Taskonomy(tk_root, 'test')
    assert list(ds.tasks) == ['seg', 'normal', 'depth', 'keypoint', 'edge']
    assert ds.tasks['seg']['n_out'] == 17 and ds.tasks['seg']['ignore_index'] == 255
    np.testing.assert_allclose(ds.tasks['seg']['class_weight'], np.linspace(.5, 2, 17), rtol=1e-6)
    x = ds[0]
    check_sample(x, ds.tasks)
    assert x['img'].shape == (3, 256, 256) and x['edge'].shape == (1, 256, 256)
    assert [len(Taskonomy(tk_root, s)) for s in ('train', 'train1', 'train2', 'val', 'test_small')] == [2, 1, 1, 2, 1]
    x = Taskonomy(tk_root, 'train1', tasks=['keypoint'], augment=True, crop=(100, 120))[0]
    assert list(x) == ['img', 'keypoint'] and x['keypoint'].shape == (1, 100, 120)
    np.save(tk_root / 'semseg_prior_factor.npy', np.ones(16))
    with pytest.raises(DataLayoutError,
                       match=r"semseg_prior_factor.npy: class weights has shape \(16,\); expected \(17\)"):
        Taskonomy(tk_root)
    with pytest.raises(ValueError, match="unlabeled must be 'class0' or 'ignore'"): Taskonomy(tk_root, unlabeled='drop')


def test_taskonomy_split_dirs_and_missing_files(tmp_path):
    root = make_taskonomy_fixture(tmp_path / 'tka', n=2, size=(8, 8), split_dirs=True)
    d = json.loads((root / 'taskonomy.json').read_text())
    assert not d['train'][0][0].startswith('train/')
    assert Taskonomy(root, 'train2', resize=None)[0]['img'].shape == (3, 8, 8)  # found under <root>/train
    assert Taskonomy(root, 'test', resize=None)[1]['seg'].shape == (8, 8)  # found under <root>/test
    (root / 'test' / d['test'][1][3]).unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"tka/fixture_building/depth_zbuffer/point_1_view_0_domain_depth_zbuffer.png or "
                             r".*tka/test/fixture_building/depth_zbuffer/.* "
                             r"not found \(depth of entry 1 of split 'test'\)"):
        Taskonomy(root, 'test')[1]
    assert list(Taskonomy(root, 'test', tasks=['edge'])[1]) == ['img', 'edge']  # depth not needed for edges


# ================================================================ loaders
def test_get_datasets_and_dataloaders(tmp_path):
    cs = make_cityscapes_fixture(tmp_path / 'cs', n=4, size=(16, 32))
    ds = get_datasets('cityscapes', cs, augment=True, crop=(8, 8), label_set=7)
    assert list(ds) == list(SPLITS) and all(ds[s].augment is not None for s in ('train', 'train1', 'train2'))
    assert ds['val'].augment is None and ds['val'][0]['img'].shape == (3, 16, 32)
    assert ds['train'].tasks['seg']['n_out'] == 7
    dls = get_dataloaders('cityscapes', cs, batch_size=2, splits=['train', 'val'], seed=0)
    b = next(iter(dls['val']))
    assert b['img'].shape == (2, 3, 16, 32) and b['seg'].shape == (2, 16, 32) and b['depth'].shape == (2, 1, 16, 32)
    train = lambda: get_dataloaders('synthetic', batch_size=2, seed=3, n_train=8, n_val=2, size=(8, 8))['train']
    order = lambda: torch.cat([b['img'].flatten(1)[:, 0] for b in train()])
    assert torch.equal(order(), order())
    tk = make_taskonomy_fixture(tmp_path / 'tk', n=2, size=(8, 8))
    dl = get_dataloaders('taskonomy', tk, batch_size=2, resize=(16, 16))
    assert next(iter(dl['train']))['keypoint'].shape == (2, 1, 16, 16)
    dls = get_dataloaders('synthetic', batch_size=4, num_workers=2, n_train=12, n_val=4, size=(8, 8))
    # rendered before the workers fork
    assert len(dls['train'].dataset._cache) == 12 and len(dls['val'].dataset._cache) == 4
    assert sum(len(b['seg']) for b in dls['val']) == 4
    with pytest.raises(ValueError,
                       match=r"unknown dataset 'coco'; "
                             r"valid names: \['synthetic', 'cityscapes', 'nyuv2', 'taskonomy'\]"):
        get_dataloaders('coco')
    with pytest.raises(ValueError, match="unknown splits \\['val2'\\] for the synthetic dataset"):
        get_datasets('synthetic', splits=['val2'])
    assert len(get_datasets('synthetic', splits=['test'], n_train=4, n_val=3, size=(8, 8))['test']) == 3
    with pytest.raises(ValueError, match='no augmentation'): get_datasets('synthetic', augment=True)
    with pytest.raises(ValueError, match='a data root is needed'): get_datasets('taskonomy')
