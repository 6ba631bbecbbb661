"Graph IR: prototxt dialects, blob binding, shape rules, fx conversion, execution and round trips."
import pytest, torch, torch.nn as nn, torchvision
from automtl_nb.graph import Graph, GraphNet, GraphError, Node, build_op
from automtl_nb.prototxt import PrototxtError

CONVERTER = '''name: "tiny"
input: "blob1"
input_dim: 1
input_dim: 3
input_dim: 33
input_dim: 33
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv_blob1"
  convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 group: 1 stride: 2
    weight_filler { type: "xavier" } dilation: 1 } }
layer { name: "batch_norm1" type: "BatchNorm" bottom: "conv_blob1" top: "batch_norm_blob1"
  batch_norm_param { track_running_stats: true eps: 1e-05 } }
layer { name: "relu1" type: "ReLU" bottom: "batch_norm_blob1" top: "relu_blob1" relu_param { inplace: 1 } }
layer { name: "max_pool1" type: "Pooling" bottom: "relu_blob1" top: "max_pool_blob1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 round_mode: CEIL } }
layer { name: "conv2" type: "Convolution" bottom: "max_pool_blob1" top: "conv_blob2"
  convolution_param { num_output: 8 bias_term: false pad: 2 kernel_size: 3 dilation: 2 } }
layer { name: "add1" type: "Eltwise" bottom: "max_pool_blob1" bottom: "conv_blob2" top: "add_blob1"
  eltwise_param { operation: SUM } }
'''

def test_converter_dialect_alias_and_ceil_pooling():
    g = Graph.from_prototxt(CONVERTER)
    assert g.inputs == ['blob1'] and g['conv1'].parents == ['blob1']  # bottom "data" means the declared input
    assert g['conv1'].params['in_ch'] == 3
    assert g['max_pool1'].shape == (8, 9, 9)  # 33 -> conv 17 -> pool 9
    assert g['add1'].shape == (8, 9, 9) and g.outputs == ['add1']

def test_caffe_ceil_pooling_matches_pytorch_module():
    "Caffe rounds pooling up by default; the node's module must produce exactly the size the shape rule predicts."
    txt = CONVERTER.replace('input_dim: 33\ninput_dim: 33', 'input_dim: 224\ninput_dim: 224')
    g = Graph.from_prototxt(txt)
    net = GraphNet(g).eval()
    y = net(torch.randn(1, 3, 224, 224))
    assert tuple(y.shape[1:]) == g['add1'].shape == (8, 57, 57)  # floor rounding would give 56

def test_in_place_layers_rebind_blobs():
    txt = '''input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
layer { name: "s" type: "Sigmoid" bottom: "c" top: "c" }'''
    g = Graph.from_prototxt(txt)
    assert [n.parents for n in g][1:] == [['data'], ['c'], ['r']]

def test_batchnorm_scale_pairs_fold():
    txt = '''input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "sc" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
layer { name: "sc2" type: "Scale" bottom: "c" top: "c2" }'''
    g = Graph.from_prototxt(txt)
    assert [n.kind for n in g] == ['input', 'conv', 'bn', 'relu', 'affine']  # the standalone Scale stays
    assert g['r'].parents == ['bn'] and g['sc2'].params['ch'] == 4

def test_dangling_bottom_names_the_blob():
    txt = CONVERTER.replace('bottom: "conv_blob2"', 'bottom: "conv_blob9"')
    with pytest.raises(GraphError, match="layer 'add1' reads blob 'conv_blob9'"): Graph.from_prototxt(txt)

def test_missing_input_shape():
    txt = ('layer { name: "d" type: "Data" top: "data" }\n'
           'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
           'convolution_param { num_output: 4 kernel_size: 1 } }')
    with pytest.raises(GraphError, match=r"input 'data' has no declared shape: pass input_shape"):
        Graph.from_prototxt(txt)
    assert Graph.from_prototxt(txt, input_shape=(3, 8, 8))['c'].shape == (4, 8, 8)

def test_malformed_prototxt_reports_position():
    with pytest.raises(PrototxtError, match='line 2'): Graph.from_prototxt('input: "data"\nlayer { name: "x" type: }')

def test_channel_mismatch_is_reported():
    nodes = [Node('x', 'input', params=dict(shape=(3, 8, 8))),
             Node('c', 'conv', ['x'], dict(in_ch=4, out_ch=2, kernel=(1, 1), stride=(1, 1), pad=(0, 0), dilation=(1, 1),
                                           groups=1, bias=False))]
    with pytest.raises(GraphError, match="'c' expects in_ch=4 but its input gives 3"): Graph(nodes)

def test_eltwise_shape_mismatch():
    with pytest.raises(GraphError, match='differ in shape'):
        Graph([Node('x', 'input', params=dict(shape=(3, 8, 8))),
               Node('p', 'pool', ['x'], dict(method='max', kernel=(2, 2), stride=(2, 2), pad=(0, 0), global_pool=False,
                                             ceil_mode=False)),
               Node('e', 'eltwise', ['x', 'p'], dict(op='sum'))])

@pytest.mark.parametrize('ctor', [torchvision.models.resnet18, torchvision.models.resnet34,
                                  torchvision.models.mobilenet_v2, torchvision.models.mnasnet1_0])
def test_torchvision_round_trip_and_execution(ctor):
    tv = ctor(weights=None).eval()
    g = Graph.from_module(tv, input_shape=(3, 64, 64))
    g2 = Graph.from_prototxt(g.to_prototxt())
    assert g2 == g and Graph.from_prototxt(g2.to_prototxt()) == g2
    assert [n.shape for n in g2] == [n.shape for n in g]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(GraphNet(g).eval()(x), tv(x))

def test_prototxt_graph_runs_with_loaded_weights():
    "A prototxt backbone built from a PyTorch model computes the same function once the weights are copied over."
    tv = torchvision.models.resnet18(weights=None).eval()
    g = Graph.from_module(tv, input_shape=(3, 32, 32))
    net = GraphNet(Graph.from_prototxt(g.to_prototxt())).eval()
    src = [m for m in tv.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    dst = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for a, b in zip(src, dst): b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), tv(x), rtol=1e-4, atol=1e-5)

def test_unknown_function_names_the_call():
    class M(nn.Module):
        def forward(self, x): return torch.fft.fft2(x).real
    with pytest.raises(GraphError, match="fft2.*MTLModel"): Graph.from_module(M(), input_shape=(3, 8, 8))

def test_interp_zoom_and_upsample():
    txt = '''input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
layer { name: "i" type: "Interp" bottom: "data" top: "i" interp_param { zoom_factor: 2 } }
layer { name: "u" type: "Upsample" bottom: "i" top: "u" upsample_param { scale: 2 } }'''
    g = Graph.from_prototxt(txt)
    assert g['i'].shape == (2, 9, 9) and g['u'].shape == (2, 18, 18)
    assert GraphNet(g)(torch.randn(1, 2, 5, 5)).shape == (1, 2, 18, 18)
    assert Graph.from_prototxt(g.to_prototxt()) == g

def test_float_params_survive_the_float32_prototxt():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.LeakyReLU(0.1), nn.Dropout(0.3))
    g = Graph.from_module(m, input_shape=(3, 4, 4))
    assert Graph.from_prototxt(g.to_prototxt()) == g

def test_traced_functional_interpolate():
    class Up(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2., mode='bilinear', align_corners=False)
    g = Graph.from_module(Up(), input_shape=(3, 4, 4))
    assert g[g.outputs[0]].shape == (3, 8, 8)
