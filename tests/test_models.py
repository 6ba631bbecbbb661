"Backbones, heads, registry, and the shipped prototxts (dialect, drift, structure and numerical equivalence)."
import tempfile
from pathlib import Path
import pytest, torch, torch.nn as nn, torchvision
from automtl_nb.graph import Graph, GraphNet, GraphError, Node, n_params
from automtl_nb.compiler import compile_supermodel
from automtl_nb.prototxt import parse_prototxt
from automtl_nb.models import (BasicBlock, DeeplabResNet, deeplab_resnet, deeplab_resnet34, deeplab_resnet_small,
                               InvertedResidual, MobileBackbone, mobilenet_v2_backbone, mnasnet_backbone, ASPPHead,
                               DenseHead, make_heads, HEADS, BACKBONES, get_backbone, converter_prototxt,
                               graph_signature, transfer_weights, ZOO, ZOO_INPUT, zoo_path, load_zoo, zoo_prototxt,
                               write_zoo)

def _randomize_bn(model, seed=0):
    "Non-trivial BN statistics and affine parameters, so that a mix-up of BN layers shows in the outputs."
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g)); m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()

def _close(a, b, rtol=1e-5):
    "Equal up to `rtol` relative to the scale of `b`."
    assert a.shape == b.shape, (a.shape, b.shape)
    assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < rtol

# ---------------------------------------------------------------- Deeplab-ResNet
def test_deeplab_resnet34_stages_by_hand():
    m = deeplab_resnet34().eval()
    seen = {}
    hooks = [getattr(m, k).register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, tuple(o.shape[1:])))
             for k in ('conv1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')]
    with torch.no_grad(): out = m(torch.randn(1, 3, 64, 64))
    for h in hooks: h.remove()
    # 64 -> 7x7/2 conv: 32 -> 3x3/2 max-pool, pad 1, ceil mode: ceil(31/2)+1 = 17 -> stride-2 stage: 9
    # -> dilated stages keep 9
    assert seen == {'conv1': (64, 32, 32), 'maxpool': (64, 17, 17), 'layer1': (64, 17, 17), 'layer2': (128, 9, 9),
                    'layer3': (256, 9, 9), 'layer4': (512, 9, 9)}
    assert out.shape == (1, 512, 9, 9)

def test_deeplab_resnet34_convs():
    m = deeplab_resnet34()
    convs = {k: c for k, c in m.named_modules() if isinstance(c, nn.Conv2d)}
    assert len(convs) == 36
    assert all(c.bias is None for c in convs.values())
    proj = {k: (c.stride, c.kernel_size) for k, c in convs.items() if 'downsample' in k}
    assert proj == {'layer2.0.downsample.0': ((2, 2), (1, 1)), 'layer3.0.downsample.0': ((1, 1), (1, 1)),
                    'layer4.0.downsample.0': ((1, 1), (1, 1))}
    dil = {k.split('.')[0]: c.dilation for k, c in convs.items() if c.kernel_size == (3, 3)}
    assert dil == {'layer1': (1, 1), 'layer2': (1, 1), 'layer3': (2, 2), 'layer4': (4, 4)}
    assert all(c.padding == c.dilation for c in convs.values() if c.kernel_size == (3, 3))
    assert [len(getattr(m, f'layer{i}')) for i in range(1, 5)] == [3, 4, 6, 3]
    assert m.maxpool.ceil_mode and (m.maxpool.kernel_size, m.maxpool.stride, m.maxpool.padding) == (3, 2, 1)
    # dilation changes no weight shape: the same parameter count as torchvision's resnet34 without its classifier
    tv = torchvision.models.resnet34(weights=None)
    assert n_params(m) == n_params(tv) - n_params(tv.fc) == 21_284_672

@pytest.mark.parametrize('size,out', [(321, 41), (224, 29), (60, 8), (57, 8)])
def test_deeplab_output_stride(size, out):
    g = Graph.from_module(deeplab_resnet34(), input_shape=(3, size, size))
    assert g[g.outputs[0]].shape == (512, out, out)

def test_deeplab_small_and_builder_errors():
    m = deeplab_resnet_small()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 64, 9, 9)
    assert sum(isinstance(c, nn.Conv2d) for c in m.modules()) == 12
    assert n_params(m) < n_params(deeplab_resnet34()) / 100
    # 32 -> 16 -> 9 -> 5
    assert deeplab_resnet((2, 1), (8, 8), (1, 2), in_ch=1)(torch.randn(1, 1, 32, 32)).shape == (1, 8, 5, 5)
    with pytest.raises(ValueError, match='one entry per stage'): deeplab_resnet((1, 1, 1), (8, 8), (1, 1, 1))
    with pytest.raises(ValueError, match='must be positive'): deeplab_resnet((1, 0), (8, 8), (1, 1))
    with pytest.raises(ValueError, match='needs project=True'): BasicBlock(8, 8, stride=2)

def test_dilated_stage_of_equal_width_projects():
    "As in the original: a dilated stage's first block projects even when the width does not change."
    m = deeplab_resnet((1, 1, 1), (8, 8, 8), (1, 1, 2))
    assert m.layer1[0].downsample is None and m.layer2[0].downsample is not None and m.layer3[0].downsample is not None

def test_small_search_forward_and_backward():
    heads = make_heads({'seg': 5, 'depth': 1}, 64, kind='dense')
    sm = compile_supermodel(deeplab_resnet_small(), ['seg', 'depth'], heads).set_mode('search', tau=5.)
    out = sm(torch.randn(4, 3, 64, 64))
    assert {t: o.shape for t, o in out.items()} == {'seg': (4, 5, 9, 9), 'depth': (4, 1, 9, 9)}
    sum(o.mean() for o in out.values()).backward()
    assert sm.logits.grad is not None and sm.logits.grad.abs().sum() > 0

# ---------------------------------------------------------------- MobileNetV2 / MNasNet
@pytest.mark.parametrize('ours,theirs',
                         [(mobilenet_v2_backbone, lambda: torchvision.models.mobilenet_v2(weights=None).features),
                          (mnasnet_backbone, lambda: torchvision.models.mnasnet1_0(weights=None).layers)])
def test_mobile_backbones_compute_torchvision_features(ours, theirs):
    "Same layers in the same order: loading torchvision's weights tensor by tensor gives the same features."
    a, b = _randomize_bn(ours()), _randomize_bn(theirs())
    sa, sb = a.state_dict(), b.state_dict()
    assert [v.shape for v in sa.values()] == [v.shape for v in sb.values()]
    a.load_state_dict(dict(zip(sa, sb.values())))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): _close(a(x), b(x))
    assert a(x).shape == (1, 1280, 2, 2) and a.out_ch == 1280

def test_inverted_residual():
    b = InvertedResidual(8, 8, expand=3, k=5, act=nn.ReLU)
    assert b.residual and len(b.layers) == 8
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad(): _close(b(x), x + b.layers(x))
    assert not InvertedResidual(8, 8, stride=2).residual and not InvertedResidual(8, 16).residual
    assert ([type(m) for m in InvertedResidual(4, 4, expand=1).layers]
            == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Conv2d, nn.BatchNorm2d])
    assert InvertedResidual(4, 4, expand=1).layers[0].groups == 4

# ---------------------------------------------------------------- fx traceability
@pytest.mark.parametrize('name', list(BACKBONES))
def test_backbones_are_fx_traceable(name):
    b = get_backbone(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(): _close(torch.fx.symbolic_trace(b)(x), b(x), 1e-6)
    g = Graph.from_module(b, input_shape=(3, 32, 32))
    assert g[g.outputs[0]].shape == tuple(b(x).shape[1:])
    assert sum(n.kind == 'conv' for n in g) == sum(isinstance(m, nn.Conv2d) for m in b.modules())

# ---------------------------------------------------------------- heads
def test_aspp_head():
    h = ASPPHead(16, 3, rates=(1, 2), mid_ch=8, dropout=0.).eval()
    x = torch.randn(2, 16, 9, 13)
    assert h(x).shape == (2, 3, 9, 13)
    assert len(h.branches) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in h.modules())
    b = h.branches[1]
    assert (b[0].dilation, b[0].padding, b[0].kernel_size, b[0].bias is not None) == ((2, 2), (2, 2), (3, 3), True)
    with torch.no_grad(): _close(h(x), h.branches[0](x) + h.branches[1](x))
    assert n_params(ASPPHead(16, 3, mid_ch=8)) == 4 * ((16 * 9 + 1) * 8 + 9 * 8 + 9 * 3)
    assert [m.p for m in ASPPHead(4, 1, mid_ch=2).modules() if isinstance(m, nn.Dropout)] == [0.5] * 8

def test_dense_head_and_make_heads():
    assert DenseHead(16, 4)(torch.randn(2, 16, 5, 7)).shape == (2, 4, 5, 7)
    assert DenseHead(16, 4, mid_ch=8).body[0].out_channels == 8
    assert DenseHead(1024, 4).body[0].out_channels == 256
    hs = make_heads({'seg': 19, 'depth': 1}, 32, kind='aspp', mid_ch=16)
    assert list(hs) == ['seg', 'depth'] and all(isinstance(h, ASPPHead) for h in hs.values())
    assert hs['seg'](torch.randn(1, 32, 4, 4)).shape == (1, 19, 4, 4)
    assert set(HEADS) == {'aspp', 'dense'}
    with pytest.raises(ValueError, match="unknown head kind 'fcn'; kinds: aspp, dense"):
        make_heads({'a': 1}, 8, kind='fcn')
    with pytest.raises(TypeError, match='must be a dict'): make_heads(['seg'], 8)
    with pytest.raises(TypeError, match='output channels > 0'): make_heads({'seg': 0}, 8)

# ---------------------------------------------------------------- registry
def test_registry():
    assert list(BACKBONES) == ['deeplab_resnet34', 'deeplab_resnet_small', 'mobilenet_v2', 'mnasnet']
    assert isinstance(get_backbone('deeplab_resnet_small'), DeeplabResNet)
    assert get_backbone('mobilenet_v2', in_ch=1).features[0].in_channels == 1
    tv = get_backbone('torchvision:resnet18')
    assert isinstance(tv, torchvision.models.ResNet) and tv(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet34'; shipped: deeplab_resnet34, "
                                         r"deeplab_resnet_small, mobilenet_v2, mnasnet, or torchvision:<name>"):
        get_backbone('resnet34')
    with pytest.raises(ValueError, match="torchvision has no classification model 'nope'"):
        get_backbone('torchvision:nope')
    with pytest.raises(TypeError, match='must be a str'): get_backbone(None)

# ---------------------------------------------------------------- the shipped zoo
@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_file_is_what_write_zoo_writes(name):
    assert zoo_path(name).is_file() and zoo_path(name).parent.name == 'zoo'
    assert load_zoo(name) == zoo_prototxt(name)

def test_write_zoo_into_a_folder():
    with tempfile.TemporaryDirectory() as d:
        paths = write_zoo(Path(d) / 'sub')
        assert [p.name for p in paths] == [f'{k}.prototxt' for k in ZOO]
        for p in paths: assert p.read_text() == load_zoo(p.stem)
    with pytest.raises(ValueError, match="no zoo prototxt 'resnet50'; "
                                         "shipped: deeplab_resnet34, mobilenet_v2, mnasnet"):
        zoo_path('resnet50')
    with pytest.raises(ValueError, match='shipped'): zoo_prototxt('resnet50')

@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_dialect(name):
    text = load_zoo(name)
    assert text.splitlines()[:6] == [f'name: "{name}"', 'input: "blob1"'] + [f'input_dim: {d}' for d in ZOO_INPUT]
    net = parse_prototxt(text)
    assert list(net.layer[0].bottom) == ['data'] and 'blob1' not in [b for l in net.layer for b in l.bottom]
    assert [l.name for l in net.layer[:3]] == ['conv1', 'batch_norm1', 'relu1' if name != 'mobilenet_v2' else 'relu6_1']
    assert [l.top[0] for l in net.layer[:2]] == ['conv_blob1', 'batch_norm_blob1']
    assert len({l.top[0] for l in net.layer}) == len(net.layer)  # every layer writes its own blob
    assert all(l.convolution_param.weight_filler.type == 'xavier' and len(l.convolution_param.dilation) == 1
               for l in net.layer if l.type == 'Convolution')
    assert all(l.batch_norm_param.HasField('track_running_stats') for l in net.layer if l.type == 'BatchNorm')
    assert not any(l.type == 'Scale' for l in net.layer)
    assert all(l.eltwise_param.HasField('operation') for l in net.layer if l.type == 'Eltwise')

def test_deeplab_zoo_counts():
    net = parse_prototxt(load_zoo('deeplab_resnet34'))
    types = [l.type for l in net.layer]
    assert (types.count('Convolution'), types.count('BatchNorm'), types.count('ReLU'), types.count('Eltwise'),
            types.count('Pooling')) == (36, 36, 33, 16, 1)
    assert [l.name for l in net.layer if l.type == 'Eltwise'] == [f'add{i}' for i in range(1, 17)]
    pool = next(l for l in net.layer if l.type == 'Pooling')
    assert pool.name == 'max_pool1' and 'round_mode: CEIL' in load_zoo('deeplab_resnet34')
    assert 'relu_param {\n    inplace: true\n  }' in load_zoo('deeplab_resnet34')

@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_graph_has_the_model_structure(name):
    shape = (3, 64, 64)
    gp, gm = Graph.from_prototxt(load_zoo(name), input_shape=shape), Graph.from_module(ZOO[name](), input_shape=shape)
    assert graph_signature(gp) == graph_signature(gm)
    assert [n.name for n in gp] != [n.name for n in gm]  # only the names differ

@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_prototxt_computes_the_model(name):
    torch.manual_seed(0)
    model = _randomize_bn(ZOO[name](), seed=1)
    net = transfer_weights(model, GraphNet(Graph.from_prototxt(load_zoo(name)))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): _close(net(x), model(x))

@pytest.mark.parametrize('name,n_vcns', [('deeplab_resnet34', 36), ('mobilenet_v2', 52), ('mnasnet', 52)])
def test_zoo_compiles_unmodified(name, n_vcns):
    sm = compile_supermodel(load_zoo(name), ['seg', 'depth', 'normal'])
    assert len(sm.vcns) == n_vcns and sm.logits.shape == (3, n_vcns, 3)
    out = sm.set_policy('shared').eval()(torch.randn(1, 3, 64, 64))
    c, s = (512, 9) if name == 'deeplab_resnet34' else (1280, 2)
    assert {t: o.shape for t, o in out.items()} == {t: (1, c, s, s) for t in ('seg', 'depth', 'normal')}
    assert compile_supermodel(zoo_path(name), ['a']).graph == sm.graph  # a path works too

def test_transfer_weights_refuses_other_structures():
    net = GraphNet(Graph.from_prototxt(load_zoo('mnasnet')))
    with pytest.raises(ValueError, match=r"cannot copy 'features_4_layers_0' \(conv\) into 'conv4': size mismatch"):
        transfer_weights(mobilenet_v2_backbone(), net)
    with pytest.raises(ValueError, match=r'parametric nodes .* \(72\), the net .* \(104\)'):
        transfer_weights(deeplab_resnet34(), net)

# ---------------------------------------------------------------- the converter on other graphs
class Zoo(nn.Module):
    ("Every kind the dialect writes: bias, non-square and dilated convs, floor/global pooling, leaky ReLU, concat, "
     "product, fc.")
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, (3, 1), padding=(1, 0), bias=True)
        self.b = nn.Conv2d(6, 6, 3, stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=3)
        self.bn, self.act, self.act6, self.sig = nn.BatchNorm2d(6), nn.LeakyReLU(0.25), nn.ReLU6(), nn.Sigmoid()
        self.pool, self.gpool = nn.AvgPool2d(2, 2), nn.AdaptiveMaxPool2d(1)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(12, 5)
    def forward(self, x):
        y = self.a(x)
        z = self.bn(self.b(self.act(y) + y))  # y is read twice: its ReLU must not be marked in place
        u = torch.cat([self.act6(z), self.sig(z) * z], 1)
        return self.fc(self.drop(torch.flatten(self.gpool(self.pool(u)), 1)))

def test_converter_round_trip_of_every_kind():
    m = _randomize_bn(Zoo())
    g = Graph.from_module(m, input_shape=(3, 16, 12))
    text = converter_prototxt(g, (1, 3, 16, 12), name='zoo')
    for line in ('kernel_h: 3', 'kernel_w: 1', 'pad_h: 1', 'pad_w: 0', 'stride_h: 2', 'stride_w: 1',
                 'dilation: 2\n    dilation: 1', 'round_mode: FLOOR', 'global_pooling: true', 'operation: PROD',
                 'bias_filler', 'group: 3', 'eps: 1e-05', 'negative_slope: 0.25', 'type: "ReLU6"', 'name: "cat1"',
                 'name: "view1"', 'name: "fc1"', 'dropout_ratio: 0.2'):
        assert line in text, line
    net = parse_prototxt(text)
    leaky = next(l for l in net.layer if l.type == 'ReLU')
    assert not leaky.relu_param.HasField('inplace')  # its input is read twice
    gp = Graph.from_prototxt(text)
    assert graph_signature(gp) == graph_signature(g)
    gn = transfer_weights(m, GraphNet(gp)).eval()
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad(): _close(gn(x), m(x))

def test_converter_input_read_twice():
    "Only the first reader of the input uses the converters' 'data' alias; later readers name 'blob1'."
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        def forward(self, x): return self.c1(x) + self.c2(x)
    g = Graph.from_module(Two(), input_shape=(3, 8, 8))
    net = parse_prototxt(converter_prototxt(g, (1, 3, 8, 8)))
    assert [list(l.bottom) for l in net.layer[:2]] == [['data'], ['blob1']]
    assert graph_signature(Graph.from_prototxt(net)) == graph_signature(g)

def test_converter_errors():
    g = Graph.from_module(deeplab_resnet_small())
    with pytest.raises(ValueError, match=r'input_dims must be \(N, C, H, W\) with C = 3'):
        converter_prototxt(g, (1, 4, 8, 8))
    with pytest.raises(ValueError, match='input_dims'): converter_prototxt(g, (3, 8, 8))
    two = Graph([Node('a', 'input', params=dict(shape=(3, 4, 4))), Node('b', 'input', params=dict(shape=(3, 4, 4))),
                 Node('s', 'eltwise', ['a', 'b'], dict(op='sum'))])
    with pytest.raises(GraphError, match='declares one input'): converter_prototxt(two, (1, 3, 4, 4))
    up = Graph([Node('x', 'input', params=dict(shape=(3, 4, 4))),
                Node('up', 'interp', ['x'], dict(mode='nearest', scale=2.))])
    with pytest.raises(GraphError, match="node 'up' has kind 'interp', which the converter dialect cannot write"):
        converter_prototxt(up, (1, 3, 4, 4))

@pytest.mark.parametrize('name', list(ZOO))
def test_standard_prototxt_round_trip_of_the_zoo(name):
    "parse(write(g)) == g for the standard writer on every zoo backbone."
    g = Graph.from_module(ZOO[name](), input_shape=(3, 64, 64))
    assert Graph.from_prototxt(g.to_prototxt()) == g

def test_converter_layers_are_the_standard_layers():
    "One writer: a converter layer is the standard writer's layer plus the converters' fields, under other names."
    g = Graph.from_module(deeplab_resnet_small(), input_shape=(3, 32, 32))
    std = [l for l in parse_prototxt(g.to_prototxt()).layer if not l.name.endswith('_scale')]
    conv = list(parse_prototxt(converter_prototxt(g, (1, 3, 32, 32))).layer)
    assert len(std) == len(conv) == len(g) - 1
    extras = ('weight_filler', 'bias_filler', 'track_running_stats', 'inplace', 'axis')
    for a, b in zip(std, conv):
        for l in (a, b):
            del l.bottom[:], l.top[:]
            l.ClearField('name')
            for f, _ in l.ListFields():
                m = getattr(l, f.name)
                if not hasattr(m, 'ClearField'): continue
                for sub in extras:
                    if sub in m.DESCRIPTOR.fields_by_name: m.ClearField(sub)
                if not m.ListFields(): l.ClearField(f.name)  # e.g. a relu_param that held only `inplace`
        assert a == b, (a, b)
