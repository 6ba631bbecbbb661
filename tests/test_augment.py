"""Train-time augmentation (`automtl_nb.augment`) on tiny items and on the real-layout fixtures of `07_data`: sizes by
hand, image/label alignment through flip and crop, padding with each target's invalid value, the normal sign rule of
each dataset's recipe, determinism per key, and the wiring into `get_datasets` (train splits only)."""
import math, os, sys
from pathlib import Path
from unittest import mock
import numpy as np
import pytest
import torch
from automtl_nb.augment import AUGMENT_RECIPES, Augment, original_augment, item_generator, pad_value
from automtl_nb.data import (CityScapes, NYUv2, Taskonomy, get_datasets, make_cityscapes_fixture, make_nyuv2_fixture,
                             make_taskonomy_fixture)
from automtl_nb.metrics import Task

SEG = {'seg': dict(kind='seg', n_out=100, ignore_index=-1)}


def numbered(h, w):
    "An item whose image (all channels) and seg label both hold the pixel number i·w + j (image / 1000)."
    n = torch.arange(h * w).view(h, w)
    return {'img': (n / 1000.).expand(3, h, w).clone(), 'seg': n.clone()}


def key_with(aug, hw, want_flip):
    "An augmentation key whose draw flips (or not)."
    return next(k for k in range(100) if aug.draw(hw, item_generator((0, k))).get('flip') == want_flip)


# ================================================================ Augment on tiny items
def test_draw_sizes_truncate_and_offsets_cover_the_padded_item():
    a = Augment(crop=(8, 8))
    for seed in range(30):
        u = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).item()
        d = a.draw((10, 15), torch.Generator().manual_seed(seed))
        assert d['size'] == (int(10 * (0.5 + u)), int(15 * (0.5 + u)))  # int(), as the original, not round()
        assert 0 <= d['top'] <= max(d['size'][0], 8) - 8 and 0 <= d['left'] <= max(d['size'][1], 8) - 8
    assert Augment((4, 4), scale=(0.7, 0.7)).draw((10, 10))['size'] == (7, 7)  # int(7.000000000000001) = 7


def test_labels_rescale_nearest_like_opencv():
    "Nearest neighbour takes source pixel floor(i · in / out), as cv2.INTER_NEAREST."
    s = numbered(10, 10)
    d = dict(size=(7, 13), flip=False, top=0, left=0)
    o = Augment((7, 13)).apply(s, SEG, d)
    rows, cols = [math.floor(i * 10 / 7) for i in range(7)], [math.floor(j * 10 / 13) for j in range(13)]
    assert torch.equal(o['seg'], s['seg'][rows][:, cols])
    assert o['seg'].dtype == torch.int64 and o['img'].shape == (3, 7, 13)
    # the image is bilinear with half-pixel centres:
    # output row 0 of a 2x upscale samples source row -0.25 -> clamped to 0
    up = Augment((20, 20)).apply(s, SEG, dict(size=(20, 20), flip=False, top=0, left=0))
    torch.testing.assert_close(up['img'][0, 1, 1], s['img'][0, 0, 0] * .5625 + s['img'][0, 0, 1] * .1875
                               + s['img'][0, 1, 0] * .1875 + s['img'][0, 1, 1] * .0625)


@pytest.mark.parametrize('seed', range(6))
def test_image_and_label_stay_aligned_through_flip_and_crop(seed):
    s = numbered(9, 12)
    a = Augment(crop=(5, 7), scale=(1, 1))
    d = a.draw((9, 12), torch.Generator().manual_seed(seed))
    o = a(s, SEG, torch.Generator().manual_seed(seed))
    assert torch.equal((o['img'][1] * 1000).round().long(), o['seg'])
    src = s['seg'].flip(-1) if d['flip'] else s['seg']
    assert torch.equal(o['seg'], src[d['top']:d['top'] + 5, d['left']:d['left'] + 7])


def test_padding_uses_each_targets_invalid_value_and_keeps_ignore_labels():
    tasks = {'seg': dict(kind='seg', n_out=4, ignore_index=255), 'depth': dict(kind='depth', n_out=1),
             'normal': dict(kind='normal', n_out=3), 'keypoint': dict(kind='keypoint', n_out=1, ignore_index=255)}
    seg = torch.tensor([[0, 255, 1], [2, 3, 255]])
    s = {'img': torch.ones(3, 2, 3), 'seg': seg, 'depth': torch.ones(1, 2, 3), 'normal': torch.ones(3, 2, 3),
         'keypoint': torch.zeros(1, 2, 3)}
    o = Augment((4, 6), scale=(1, 1), flip=False)(s, tasks, torch.Generator().manual_seed(0))
    pad = o['img'][0] == 0  # centred: rows 1..2, columns 1..3 hold the item
    assert pad.sum() == 24 - 6 and not pad[1:3, 1:4].any()
    assert torch.equal(o['seg'][1:3, 1:4], seg) and (o['seg'][pad] == 255).all()
    assert (o['depth'][0][pad] == 0).all() and (o['normal'][:, pad] == 0).all() and (o['keypoint'][0][pad] == 255).all()
    assert pad_value(dict(kind='edge', n_out=1)) == 0.  # an edge task without an ignore value pads with 0
    # a halving rescale keeps ignore labels ignore labels (nearest never blends them)
    big = {'img': torch.rand(3, 8, 8), 'seg': torch.full((8, 8), 255)}; big['seg'][::2, ::2] = 1
    o = Augment((4, 4)).apply(big, tasks, dict(size=(4, 4), flip=False, top=0, left=0))
    assert set(o['seg'].unique().tolist()) == {1}


@pytest.mark.parametrize('dataset,negates', [('nyuv2', False), ('taskonomy', True), ('cityscapes', False)])
def test_normal_sign_rule_of_each_recipe(dataset, negates):
    tasks = {'normal': dict(kind='normal', n_out=3)}
    n = torch.nn.functional.normalize(torch.randn(3, 4, 6), dim=0)
    s = {'img': torch.rand(3, 4, 6), 'normal': n}
    o = original_augment(dataset, crop=(4, 6), scale=(1, 1)).apply(s, tasks,
                                                                   dict(size=(4, 6), flip=True, top=0, left=0))
    assert torch.equal(o['normal'][0], -n[0].flip(-1) if negates else n[0].flip(-1))
    assert torch.equal(o['normal'][1:], n[1:].flip(-1))


def test_same_key_same_output_and_the_global_rng_path():
    s = numbered(12, 12); a = Augment((6, 6))
    x, y = a(s, SEG, item_generator((3, 5, 1))), a(s, SEG, item_generator((3, 5, 1)))
    assert all(torch.equal(x[k], y[k]) for k in x)
    outs = {tuple(a(s, SEG, item_generator((3, b, 1)))['seg'].flatten().tolist()) for b in range(12)}
    assert len(outs) > 6  # other batches, other crops
    torch.manual_seed(4); x = a(s, SEG)
    torch.manual_seed(4); y = a(s, SEG)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_recipes_and_errors():
    crops = {k: r['crop'] for k, r in AUGMENT_RECIPES.items()}
    assert crops == {'cityscapes': (224, 224), 'nyuv2': (321, 321), 'taskonomy': (224, 224)}
    assert all(r['scale'] == (0.5, 1.5) and r['flip'] for r in AUGMENT_RECIPES.values())
    with pytest.raises(ValueError, match=r"crop must be \(H, W\) with H, W >= 1, got \(0, 4\)"): Augment((0, 4))
    with pytest.raises(ValueError, match="scale must be"): Augment(scale=(1.5, 0.5))
    with pytest.raises(ValueError, match="no augmentation recipe for 'coco'"): original_augment('coco')
    with pytest.raises(ValueError, match="non-negative"): item_generator(-1)


# ================================================================ wiring into the real-layout datasets
@pytest.fixture()
def cs_root(tmp_path): return make_cityscapes_fixture(tmp_path / 'cs', n=3, size=(16, 32), seed=1)


def test_get_datasets_augments_the_train_splits_only(cs_root):
    ds = get_datasets('cityscapes', cs_root, augment=True, crop=(12, 20), tasks=['seg', 'depth'])
    for s in ('train', 'train1', 'train2'):
        assert ds[s].augment.crop == (12, 20) and ds[s].augment.negate_normal_x is False
        assert ds[s][(0, (1, 2, 3))]['img'].shape == (3, 12, 20)
    assert ds['val'].augment is None and ds['val'][(0, (1, 2, 3))]['img'].shape == (3, 16, 32)
    assert get_datasets('cityscapes', cs_root)['train'].augment is None
    x, y = (ds['train'][(1, (7, 0, 1))],
            get_datasets('cityscapes', cs_root, augment=True, crop=(12, 20))['train'][(1, (7, 0, 1))])
    assert all(torch.equal(x[k], y[k]) for k in x)  # a key fixes the augmentation, whichever dataset object draws it
    with pytest.raises(ValueError, match='augment must be True, False, a dict'):
        CityScapes(cs_root, 'train', augment='yes')


def test_cityscapes_crop_is_a_window_of_the_item(cs_root):
    raw = CityScapes(cs_root, 'train', norm='none')[2]
    ds = CityScapes(cs_root, 'train', norm='none', augment={'scale': (1, 1)}, crop=(12, 20))
    for b in range(6):
        d = ds.augment.draw((16, 32), item_generator((0, b, 2)))
        o = ds[(2, (0, b, 2))]
        win = lambda y: (y.flip(-1) if d['flip'] else y)[..., d['top']:d['top'] + 12, d['left']:d['left'] + 20]
        assert all(torch.equal(o[k], win(raw[k])) for k in ('img', 'seg', 'depth'))
    # pads: ignore, depth 0
    big = CityScapes(cs_root, 'train', norm='none', augment=True, crop=(40, 40))[(0, (0, 0, 0))]
    pad = (big['img'] == 0).all(0)
    assert pad.any() and (big['seg'][pad] == -1).all() and (big['depth'][0][pad] == 0).all()


def test_nyuv2_keeps_normal_x_on_flip_taskonomy_negates_it(tmp_path):
    ny = make_nyuv2_fixture(tmp_path / 'ny', n=2, size=(16, 16))
    raw = NYUv2(ny, 'train', norm='none')[0]
    ds = NYUv2(ny, 'train', norm='none', augment={'scale': (1, 1)}, crop=(16, 16))
    k = key_with(ds.augment, (16, 16), True)
    assert torch.equal(ds[(0, (0, k))]['normal'], raw['normal'].flip(-1))  # the original NYU loader's flip
    fixed = NYUv2(ny, 'train', norm='none', augment={'scale': (1, 1), 'negate_normal_x': True}, crop=(16, 16))
    assert torch.equal(fixed[(0, (0, k))]['normal'][0], -raw['normal'][0].flip(-1))
    with pytest.raises(ValueError, match='negate_normal_x needs decoded normals'):
        NYUv2(ny, 'train', normal='raw_bgr', augment={'negate_normal_x': True})
    tk = make_taskonomy_fixture(tmp_path / 'tk', n=2, size=(16, 16))
    raw = Taskonomy(tk, 'train', norm='none', resize=None)[1]
    ds = Taskonomy(tk, 'train', norm='none', resize=None, augment={'scale': (1, 1)}, crop=(16, 16))
    k = key_with(ds.augment, (16, 16), True)
    o = ds[(1, (0, k))]
    assert (torch.equal(o['normal'][0], -raw['normal'][0].flip(-1))
            and torch.equal(o['normal'][1:], raw['normal'][1:].flip(-1)))
    assert torch.equal(o['seg'], raw['seg'].flip(-1)) and torch.equal(o['depth'], raw['depth'].flip(-1))


def test_taskonomy_pads_keypoints_and_edges_with_255_and_the_loss_ignores_them(tmp_path):
    tk = make_taskonomy_fixture(tmp_path / 'tk', n=2, size=(16, 16))
    # every map is 256x256 first: the crop pads
    ds = get_datasets('taskonomy', tk, augment={'scale': (1, 1)}, crop=(300, 300))
    assert ds['train'].tasks['keypoint'] == dict(kind='keypoint', n_out=1, ignore_index=255)
    x = ds['train'][(0, (0, 0, 0))]
    assert x['img'].shape == (3, 300, 300) and x['edge'].shape == (1, 300, 300)
    pad = x['keypoint'][0] == 255
    assert pad.sum() == 300 * 300 - 256 * 256 and (x['edge'][0][pad] == 255).all()
    assert (x['seg'][pad] == 255).all() and (x['depth'][0][pad] == 0).all() and (x['normal'][:, pad] == 0).all()
    t = Task('keypoint', **ds['train'].tasks['keypoint'])
    y = x['keypoint'][None]; pred = torch.zeros_like(y)
    torch.testing.assert_close(t.loss(pred, y), y[y != 255].abs().mean())
    assert ds['val'][0]['keypoint'].shape == (1, 256, 256) and not (ds['val'][0]['keypoint'] == 255).any()


# ================================================== the original loaders' own functions, same draws (AUTOMTL_ORIGINAL)
ORIGINAL = os.environ.get('AUTOMTL_ORIGINAL')


def _original_augment(cls, task, crop, draws, *arrays):
    "Run the original loader's scale, mirror and crop-and-pad methods on `arrays` with its RNG calls returning `draws`."
    o = object.__new__(cls); o.task, o.crop_h, o.crop_w = task, *crop
    f, flag, top, left = draws
    with (mock.patch('random.random', side_effect=[f - 0.5, flag]),
          mock.patch('numpy.random.randint', side_effect=[top, left])):
        out = o.__scale__(*arrays)
        out = o.__mirror__(*out)
        return o.__random_crop_and_pad_image_and_labels__(*out)


@pytest.mark.skipif(not ORIGINAL or not (Path(ORIGINAL) / 'data' / 'dataloader').is_dir(),
                    reason='needs the original AutoMTL tree: set AUTOMTL_ORIGINAL to it '
                           '(see ../shared/original/README.md)')
@pytest.mark.filterwarnings('ignore::SyntaxWarning')
def test_same_draws_give_the_original_loaders_output():
    "40 random draws per dataset: labels equal exactly, images to OpenCV's bilinear rounding (NYUv2: uint8 rounding)."
    pytest.importorskip('cv2', reason='the original loaders need OpenCV (pip install opencv-python-headless)')
    sys.path.insert(0, ORIGINAL)
    from data.dataloader.cityscapes_dataloader import CityScapes as OCS
    from data.dataloader.nyuv2_dataloader import NYU_v2 as ONY
    from data.dataloader.taskonomy_dataloader import Taskonomy as OTK
    rng, (H, W), crop = np.random.default_rng(0), (37, 53), (24, 40)
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1) if a.ndim == 3 else a[None]))
    hwc = lambda t: t.permute(1, 2, 0).numpy()
    worst = {}
    def same(name, ours, theirs, tol=0.):
        d = float(np.abs(ours - theirs).max()); worst[name] = max(worst.get(name, 0.), d)
        assert d <= tol, f"{name}: differs by {d}"
    for trial in range(40):
        f, flag = 0.5 + rng.random(), rng.random()
        h, w = int(H * f), int(W * f)
        d = dict(size=(h, w), flip=flag > .5, top=int(rng.integers(0, max(h, crop[0]) - crop[0] + 1)),
                 left=int(rng.integers(0, max(w, crop[1]) - crop[1] + 1)))
        draws = (f, flag, d['top'], d['left'])
        img = rng.random((H, W, 3)).astype(np.float32)
        # CityScapes: seg (-1 ignore) and inverse depth (0 invalid)
        seg = rng.integers(-1, 19, (H, W)).astype(np.float32)
        dep = (rng.random((H, W, 1)) * (rng.random((H, W, 1)) > .2)).astype(np.float32)
        tasks = {'seg': dict(kind='seg', n_out=19, ignore_index=-1), 'depth': dict(kind='depth', n_out=1)}
        s = {'img': chw(img), 'seg': torch.from_numpy(seg).long(), 'depth': chw(dep)}
        o = original_augment('cityscapes', crop=crop).apply(s, tasks, d)
        oi, ol = _original_augment(OCS, 'segment_semantic', crop, draws, img[:, :, ::-1] * 255, seg[:, :, None])
        _, od = _original_augment(OCS, 'depth_zbuffer', crop, draws, img[:, :, ::-1] * 255, dep)
        same('cityscapes img (0-255)', hwc(o['img'].flip(0) * 255), oi, 2e-3)
        same('cityscapes seg', o['seg'].numpy(), ol[:, :, 0])
        same('cityscapes depth', o['depth'][0].numpy(), od[:, :, 0])
        # NYUv2: seg (255 ignore), raw colour normals (pad 255 there, the zero vector here), depth (0 invalid);
        # no normal negation
        u8 = (img * 255).round().astype(np.uint8)
        seg = np.where(rng.random((H, W)) < .2, 255, rng.integers(0, 40, (H, W))).astype(np.uint8)
        nrm, dep = rng.integers(0, 255, (H, W, 3)).astype(np.uint8), (0.5 + rng.random((H, W, 1))).astype(np.float32)
        tasks = {'seg': dict(kind='seg', n_out=40, ignore_index=255), 'normal': dict(kind='normal', n_out=3),
                 'depth': dict(kind='depth', n_out=1)}
        s = {'img': chw(u8[:, :, ::-1].astype(np.float32) / 255), 'seg': torch.from_numpy(seg).long(),
             'normal': chw(nrm.astype(np.float32)), 'depth': chw(dep)}
        o = original_augment('nyuv2', crop=crop).apply(s, tasks, d)
        oi, ol = _original_augment(ONY, 'segment_semantic', crop, draws, u8, seg[:, :, None])
        _, on = _original_augment(ONY, 'normal', crop, draws, u8, nrm)
        _, od = _original_augment(ONY, 'depth_zbuffer', crop, draws, u8, dep)
        same('nyuv2 img (0-255)', hwc(o['img'].flip(0) * 255), oi, 1.)
        same('nyuv2 seg', o['seg'].numpy(), ol[:, :, 0]); same('nyuv2 depth', o['depth'][0].numpy(), od[:, :, 0])
        pad = (on == 255).all(-1)
        same('nyuv2 normal', hwc(o['normal']), np.where(pad[..., None], 0., on))
        assert (hwc(o['normal'])[pad] == 0).all()
        # Taskonomy: normals in [-1, 1] negated in x by a flip, keypoints padded with 255
        nrm, kp = (rng.random((H, W, 3)) * 2 - 1).astype(np.float32), (rng.random((H, W)) * 2 - 1).astype(np.float32)
        tasks = {'normal': dict(kind='normal', n_out=3), 'keypoint': dict(kind='keypoint', n_out=1, ignore_index=255)}
        o = original_augment('taskonomy', crop=crop).apply({'img': chw(img), 'normal': chw(nrm), 'keypoint': chw(kp)},
                                                           tasks, d)
        oi, on, om = _original_augment(OTK, 'normal', crop, draws, img[:, :, ::-1] * 255, nrm,
                                       np.ones((H, W), np.float32))
        _, ok, _ = _original_augment(OTK, 'keypoints2d', crop, draws, img[:, :, ::-1] * 255, kp)
        same('taskonomy img (0-255)', hwc(o['img'].flip(0) * 255), oi, 2e-3)
        same('taskonomy keypoint', o['keypoint'][0].numpy(), ok[:, :, 0], 1e-5)  # its (x − 255) + 255 rounds
        pad = om[:, :, 0] == 255
        same('taskonomy normal', hwc(o['normal']), np.where(pad[..., None], 0., on), 1e-5)
    print('\nlargest difference per check over 40 draws:', {k: round(v, 6) for k, v in worst.items()})
