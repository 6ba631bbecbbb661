("The derived model: equal to the supermodel in fixed-policy mode on real backbones, hand-counted parameters, "
 "save/load/TorchScript round trips.")
import json
import pytest, torch, torchvision
from automtl_nb.compiler import compile_supermodel, MTLModel, Conv2dNode, BN2dNode, ReLUNode, PoolNode
from automtl_nb.models import load_zoo, make_heads
from automtl_nb.derive import (derive_model, derive_plan, count_params, param_table, save_derived, load_derived,
                               export_torchscript)

def _perturb(m, seed=0):
    "Multiply every weight and float buffer by 1 ± 10% noise so that task copies differ from the shared operators."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.mul_(1 + 0.1 * torch.randn(t.shape, generator=g)).add_(0.01 * torch.randn(t.shape, generator=g).abs())
    return m

def _assert_equal(sm, policy, x):
    sm.set_policy(policy).eval()
    dm = derive_model(sm).eval()
    with torch.no_grad(): ys, yd = sm(x), dm(x)
    for t in sm.tasks:
        scale = max(1., ys[t].abs().max().item())
        assert (yd[t] - ys[t]).abs().max().item() <= 1e-5 * scale, t
    return dm

def _policies(T, L, seeds):
    yield torch.zeros(T, L, dtype=torch.long); yield torch.ones(T, L, dtype=torch.long); yield torch.full((T, L), 2)
    for s in seeds: yield torch.randint(0, 3, (T, L), generator=torch.Generator().manual_seed(s))

@pytest.fixture(scope='module')
def deeplab():
    torch.manual_seed(0)
    return _perturb(compile_supermodel(load_zoo('deeplab_resnet34'), ['seg', 'depth', 'normal'],
                                       make_heads({'seg': 5, 'depth': 1, 'normal': 3}, 512, kind='dense')))

def test_deeplab_prototxt_matches_supermodel_for_random_policies(deeplab):
    x = torch.randn(2, 3, 24, 24)
    for pol in _policies(3, len(deeplab.vcns), seeds=(1, 2)):
        dm = _assert_equal(deeplab, pol, x)
        assert count_params(dm)['total'] == param_table(deeplab, pol)['derived']

def test_after_mix_deeplab_matches_supermodel_and_stores_shared_convs_once():
    "search_bn='after_mix': shared convs are one module (stored once), each task's BN follows its option."
    torch.manual_seed(0)
    sm = _perturb(compile_supermodel(load_zoo('deeplab_resnet34'), ['seg', 'depth'],
                                     make_heads({'seg': 5, 'depth': 1}, 512, kind='dense'), search_bn='after_mix'))
    x = torch.randn(2, 3, 24, 24)
    for pol in _policies(2, len(sm.vcns), seeds=(1,)):
        dm = _assert_equal(sm, pol, x)
        assert count_params(dm)['total'] == param_table(sm, pol)['derived']
    shared = derive_model(sm, torch.zeros(2, len(sm.vcns), dtype=torch.long))
    convs = [n for n, _ in shared.net.named_children() if n in sm.vcns]
    assert len(convs) == len(sm.vcns)  # one module per layer's shared conv, not one per task
    first = list(sm.vcns)[0]
    assert [v for v, *_ in shared.plan.steps][:3] == [first, f'{first}__bn_seg', f'{first}__bn_depth']


def test_torchvision_resnet34_matches_supermodel():
    torch.manual_seed(0)
    sm = _perturb(compile_supermodel(torchvision.models.resnet34(weights=None), ['a', 'b']))
    for pol in _policies(2, len(sm.vcns), seeds=(5,)): _assert_equal(sm, pol, torch.randn(2, 3, 32, 32))

class Plain(MTLModel):
    ("conv(3→8, 3×3)+BN, ReLU, conv(8→8, 3×3, bias)+ReLU, pool, conv(8→16, 1×1, stride 2): "
     "the last conv's skip downsamples.")
    def __init__(self):
        super().__init__(in_ch=3)
        x = self.add(ReLUNode(), parents=self.add(BN2dNode(), parents=self.add(Conv2dNode(8, 3, padding=1))))
        x = self.add(ReLUNode(), parents=self.add(Conv2dNode(8, 3, padding=1, bias=True), parents=x))
        self.add(Conv2dNode(16, 1, stride=2), parents=self.add(PoolNode('max', 2), parents=x))

def test_parameter_counts_by_hand():
    sm = compile_supermodel(Plain(), ['a', 'b'])
    # skip of conv3: 1×1 conv + its own BN
    c1, c2, c3, skip3 = 3 * 8 * 9 + 2 * 8, 8 * 8 * 9 + 8, 8 * 16, 8 * 16 + 2 * 16
    pol = torch.tensor([[0, 1, 0], [0, 2, 2]])  # b skips conv2 (an identity) and conv3 (a downsample)
    dm = derive_model(sm, pol)
    assert count_params(dm) == {'total': c1 + c2 + c3 + skip3, 'a': c1 + c2 + c3, 'b': c1 + skip3}
    assert param_table(sm, pol) == {'single-task (sum)': 2 * (c1 + c2 + c3), 'all-shared': c1 + c2 + c3,
                                    'derived': c1 + c2 + c3 + skip3}
    # conv1 is computed once for both tasks; conv2 only for a (b's identity skip computes nothing)
    assert [m for _, m, _, _ in derive_plan(sm, pol).steps].count('conv1') == 1
    assert 'conv2' not in {m for _, m, _, _ in derive_plan(sm, pol).steps}

def test_save_load_and_torchscript_round_trip(tmp_path, deeplab):
    pol = torch.randint(0, 3, (3, len(deeplab.vcns)), generator=torch.Generator().manual_seed(7))
    dm = derive_model(deeplab, pol).eval()
    save_derived(dm, deeplab, tmp_path / 'd')
    assert set(json.loads((tmp_path / 'd' / 'policy.json').read_text())) == {'seg', 'depth', 'normal'}
    torch.manual_seed(1)
    fresh = compile_supermodel(load_zoo('deeplab_resnet34'), ['seg', 'depth', 'normal'],
                               make_heads({'seg': 5, 'depth': 1, 'normal': 3}, 512, kind='dense'))
    back = load_derived(tmp_path / 'd', fresh).eval()
    x = torch.randn(1, 3, 32, 32)
    ts = torch.jit.load(str(export_torchscript(dm, tmp_path / 'm.pt', x)))
    with torch.no_grad():
        ref = dm(x)
        for t in ref:
            assert torch.equal(back(x)[t], ref[t])
            assert (ts(x)[t] - ref[t]).abs().max() <= 1e-5 * max(1., ref[t].abs().max().item())

def test_load_refuses_another_backbone_and_keeps_files(tmp_path):
    sm = compile_supermodel(Plain(), ['a', 'b'])
    save_derived(derive_model(sm, torch.zeros(2, 3, dtype=torch.long)), sm, tmp_path)
    before = (tmp_path / 'derived.pt').read_bytes()
    with pytest.raises(ValueError, match='layers of task'):
        load_derived(tmp_path, compile_supermodel(load_zoo('deeplab_resnet34'), ['a', 'b']))
    assert (tmp_path / 'derived.pt').read_bytes() == before

def test_derived_model_trains_without_touching_the_supermodel():
    sm = compile_supermodel(Plain(), ['a', 'b'])
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    dm = derive_model(sm, torch.tensor([[0, 1, 0], [1, 0, 2]])).train()
    out = dm(torch.randn(4, 3, 8, 8))
    (out['a'].square().mean() + out['b'].square().mean()).backward()
    assert all(p.grad is not None for p in dm.parameters())
    torch.optim.SGD(dm.parameters(), 0.1).step()
    assert all(torch.equal(v, sm.state_dict()[k]) for k, v in before.items())
