"Deeper checks of automtl_nb.prototxt: schema fidelity, the model-zoo dialect, every error path, Caffe geometry."
import json, re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from automtl_nb.prototxt import *

NB = Path(__file__).resolve().parents[1] / 'nbs' / '00_prototxt.ipynb'

# A net in the dialect of the AutoMTL model zoo (PyTorch->Caffe converter output), written for these tests.
ZOO = '''name: "zoo_style"
input: "blob1"
input_dim: 2
input_dim: 3
input_dim: 64
input_dim: 64
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv_blob1"
  convolution_param {
    num_output: 16
    bias_term: false
    pad: 3
    kernel_size: 7
    group: 1
    stride: 2
    weight_filler {
      type: "xavier"
    }
    dilation: 1
  }
}
layer {
  name: "batch_norm1"
  type: "BatchNorm"
  bottom: "conv_blob1"
  top: "batch_norm_blob1"
  batch_norm_param {
    track_running_stats: true
    eps: 1e-05
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "batch_norm_blob1"
  top: "relu_blob1"
  relu_param {
    inplace: 1
  }
}
layer {
  name: "max_pool1"
  type: "Pooling"
  bottom: "relu_blob1"
  top: "max_pool_blob1"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
    pad: 1
    round_mode: CEIL
  }
}
layer {
  name: "conv2"
  type: "Convolution"
  bottom: "max_pool_blob1"
  top: "conv_blob2"
  convolution_param {
    num_output: 16
    bias_term: false
    pad: 2
    kernel_size: 3
    group: 16
    stride: 1
    weight_filler {
      type: "xavier"
    }
    engine: CAFFE
    dilation: 2
  }
}
layer {
  name: "batch_norm2"
  type: "BatchNorm"
  bottom: "conv_blob2"
  top: "batch_norm_blob2"
  param {
    lr_mult: 0
    decay_mult: 0
  }
  batch_norm_param {
    track_running_stats: true
    eps: 1e-5
  }
}
# a comment between layers, as in the MobileNetV2 prototxt
layer {
  name: "add1"
  type: "Eltwise"
  bottom: "max_pool_blob1"
  bottom: "batch_norm_blob2"
  top: "add_blob1"
  eltwise_param {
    operation: SUM
  }
}
layer {
  name: "relu2"
  type: "ReLU"
  bottom: "add_blob1"
  top: "relu_blob2"
}
layer { name: "sum2" type: "Eltwise" bottom: "relu_blob2" bottom: "relu_blob2" top: "sum_blob2" }
'''

EVERY = '''name: "every_layer"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.017 mirror: true crop_size: 32 mean_value: [104, 117, 123] }
  data_param { source: "train_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "input" type: "Input" top: "img" input_param { shape { dim: 2 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "img" top: "conv1" param { lr_mult: 1 decay_mult: 1 }
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" }
                      bias_filler { type: "constant" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "split1" type: "Split" bottom: "conv1" top: "a" top: "b" }
layer { name: "relu6" type: "ReLU6" bottom: "a" top: "r6" }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "sig" top: "tanh" }
layer { name: "max" type: "Eltwise" bottom: "r6" bottom: "tanh" top: "max" eltwise_param { operation: MAX } }
layer { name: "wsum" type: "Eltwise" bottom: "r6" bottom: "tanh" top: "wsum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -1 } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "wsum" top: "cat" concat_param { axis: 1 } }
layer { name: "deconv" type: "Deconvolution" bottom: "cat" top: "up"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "up" top: "pool"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 } }
layer { name: "interp" type: "Interp" bottom: "pool" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "upsample" type: "Upsample" bottom: "interp" top: "ups" upsample_param { scale: 2 } }
layer { name: "gpool" type: "Pooling" bottom: "ups" top: "gpool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "gpool" top: "flat" flatten_param { axis: 1 } }
layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" dropout_param { dropout_ratio: 0.3 } }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc"
  inner_product_param { num_output: 10 bias_term: false } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''

def layer(net, name): return next(l for l in net.layer if l.name == name)

def fields(msg): return {f.name: f for f in CAFFE_MESSAGES[msg].DESCRIPTOR.fields}

# ---------------------------------------------------------------- schema

@pytest.mark.parametrize('msg,field,number', [
    ('NetParameter', 'name', 1), ('NetParameter', 'input', 3), ('NetParameter', 'input_dim', 4),
    ('NetParameter', 'input_shape', 8), ('NetParameter', 'layer', 100), ('BlobShape', 'dim', 1),
    ('LayerParameter', 'bottom', 3), ('LayerParameter', 'top', 4), ('LayerParameter', 'param', 6),
    ('LayerParameter', 'convolution_param', 106), ('LayerParameter', 'pooling_param', 121),
    ('LayerParameter', 'batch_norm_param', 139), ('LayerParameter', 'scale_param', 142),
    ('LayerParameter', 'input_param', 143), ('LayerParameter', 'eltwise_param', 110),
    ('ConvolutionParameter', 'kernel_size', 4), ('ConvolutionParameter', 'stride', 6),
    ('ConvolutionParameter', 'dilation', 18), ('ConvolutionParameter', 'group', 5),
    ('ConvolutionParameter', 'engine', 15), ('PoolingParameter', 'kernel_size', 2),
    ('PoolingParameter', 'round_mode', 13), ('PoolingParameter', 'global_pooling', 12),
    ('BatchNormParameter', 'eps', 3), ('ScaleParameter', 'bias_term', 4), ('ConcatParameter', 'axis', 2),
    ('ParamSpec', 'lr_mult', 3), ('InnerProductParameter', 'num_output', 1),
])
def test_bvlc_field_numbers(msg, field, number):
    assert fields(msg)[field].number == number

def test_caffe_defaults():
    c = CAFFE_MESSAGES
    assert c['ConvolutionParameter']().bias_term is True and c['ConvolutionParameter']().group == 1
    p = c['PoolingParameter']()
    assert (p.pool, p.round_mode, p.stride, p.pad) == (PoolMethod.MAX, RoundMode.CEIL, 1, 0)
    bn = c['BatchNormParameter']()
    assert bn.eps == pytest.approx(1e-5) and bn.moving_average_fraction == pytest.approx(0.999)
    assert c['EltwiseParameter']().operation == EltwiseOp.SUM
    assert c['DropoutParameter']().dropout_ratio == pytest.approx(0.5)
    assert c['ScaleParameter']().bias_term is False and c['InnerProductParameter']().bias_term is True
    assert c['FillerParameter']().type == 'constant' and c['ParamSpec']().lr_mult == 1.0

def test_repeated_and_optional_labels():
    conv, pool = CAFFE_MESSAGES['ConvolutionParameter'](), CAFFE_MESSAGES['PoolingParameter']()
    assert not any(isinstance(getattr(conv, f), int) for f in ('kernel_size', 'stride', 'pad', 'dilation'))  # repeated
    assert all(isinstance(getattr(pool, f), int) for f in ('kernel_size', 'stride', 'pad'))  # single values
    assert fields('BlobShape')['dim'].type == fields('BlobShape')['dim'].TYPE_INT64

def test_proto_text_in_notebook_matches_schema():
    md = '\n'.join(''.join(c['source']) for c in json.loads(NB.read_text())['cells'] if c['cell_type'] == 'markdown')
    proto = re.search(r'```protobuf\n(.*?)```', md, re.S).group(1)
    doc = {}
    for block in re.finditer(r'message (\w+) \{(.*?)\n\}', proto, re.S):
        doc[block.group(1)] = [(m[2], int(m[3]), m[1], m[0])
                               for m in re.findall(r'(optional|repeated) (\w+) (\w+) = (\d+)', block.group(2))]
    assert doc == {m: [(f, n, t, l) for f, n, t, l, _ in rows] for m, rows in CAFFE_SCHEMA.items()}

def test_private_pool_does_not_clash():
    again = build_caffe_messages()  # a second build must not conflict with the first
    assert again['NetParameter'] is not NetParameter
    assert NetParameter.DESCRIPTOR.full_name == 'caffe.NetParameter'

# ---------------------------------------------------------------- building in code

def test_programmatic_net_with_enums():
    net = NetParameter(name='x')
    l = net.layer.add()
    l.name, l.type = 'pool', 'Pooling'
    l.bottom.append('data')
    l.top.append('pool')
    l.pooling_param.pool = PoolMethod.AVE
    l.pooling_param.round_mode = 'FLOOR'  # by name
    l.pooling_param.kernel_size = 3
    e = net.layer.add(name='sum', type='Eltwise', bottom=['pool', 'pool'], top=['s'])
    e.eltwise_param.operation = EltwiseOp.PROD
    net.input.append('data')
    net.input_dim.extend([1, 3, 9, 9])
    assert check_net(net) is net
    assert pool_geometry(l) == dict(method='ave', kernel=(3, 3), stride=(1, 1), pad=(0, 0), global_pool=False,
                                    ceil_mode=False)
    assert parse_prototxt(net_to_text(net)) == net
    assert 'pool: AVE' in net_to_text(net) and 'round_mode: FLOOR' in net_to_text(net)
    with pytest.raises(ValueError): l.pooling_param.pool = 'MEAN'

# ---------------------------------------------------------------- the model-zoo dialect

def test_zoo_dialect():
    net = parse_prototxt(ZOO)
    assert net.name == 'zoo_style' and len(net.layer) == 9
    assert net_inputs(net) == {'blob1': [2, 3, 64, 64]}
    assert list(layer(net, 'conv1').bottom) == ['data']  # not the declared 'blob1': resolved by the graph
    assert layer(net, 'relu1').relu_param.inplace is True
    bn = layer(net, 'batch_norm2')
    assert bn.batch_norm_param.track_running_stats and bn.batch_norm_param.eps == pytest.approx(1e-5)
    assert bn.param[0].lr_mult == 0 and bn.param[0].decay_mult == 0
    assert conv_geometry(layer(net, 'conv1')) == dict(num_output=16, kernel=(7, 7), stride=(2, 2), pad=(3, 3),
                                                      dilation=(1, 1), groups=1, bias=False)
    g = conv_geometry(layer(net, 'conv2'))
    assert (g['groups'], g['dilation'], g['pad']) == (16, (2, 2), (2, 2))
    assert pool_geometry(layer(net, 'max_pool1'))['ceil_mode'] is True
    assert not layer(net, 'sum2').HasField('eltwise_param')
    assert layer(net, 'sum2').eltwise_param.operation == EltwiseOp.SUM  # Caffe's default
    assert parse_prototxt(net_to_text(net)) == net

def test_every_layer_type():
    net = parse_prototxt(EVERY)
    assert {l.type for l in net.layer} == set(SUPPORTED_LAYERS)
    assert net_inputs(net) == {'data': None, 'label': None, 'img': [2, 3, 32, 32]}
    assert list(layer(net, 'data').transform_param.mean_value) == [104, 117, 123]
    assert layer(net, 'data').data_param.backend == CAFFE_MESSAGES['DataParameter'].LMDB
    assert list(layer(net, 'wsum').eltwise_param.coeff) == [0.5, -1]
    assert conv_geometry(layer(net, 'deconv'))['kernel'] == (4, 4)
    assert pool_geometry(layer(net, 'pool')) == dict(method='ave', kernel=(3, 2), stride=(2, 1), pad=(1, 0),
                                                     global_pool=False, ceil_mode=True)
    assert pool_geometry(layer(net, 'gpool'))['kernel'] is None
    assert layer(net, 'interp').interp_param.zoom_factor == 2 and layer(net, 'upsample').upsample_param.scale == 2
    assert parse_prototxt(net_to_text(net)) == net

def test_legacy_input_shape_and_input_layer():
    a = parse_prototxt('input: "a" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                       'input: "b" input_shape { dim: 1 dim: 1 }\n'
                       'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }')
    assert net_inputs(a) == {'a': [1, 3, 8, 8], 'b': [1, 1]}
    b = parse_prototxt('layer { name: "in" type: "Input" top: "x" top: "y" '
                       'input_param { shape { dim: 1 dim: 3 } shape { dim: 1 dim: 2 } } }\n'
                       'layer { name: "cat" type: "Concat" bottom: "x" bottom: "y" top: "c" }')
    assert net_inputs(b) == {'x': [1, 3], 'y': [1, 2]}
    c = parse_prototxt('input: "a"\nlayer { name: "r" type: "ReLU" bottom: "a" top: "a" }')
    assert net_inputs(c) == {'a': None}

# ---------------------------------------------------------------- errors

def err(src):
    with pytest.raises(PrototxtError) as e: parse_prototxt(src)
    return e.value

def test_syntax_error_position_and_text():
    e = err(ZOO.replace('    num_output: 16\n    bias_term: false\n    pad: 3',
                        '    num_ouput: 16\n    bias_term: false\n    pad: 3'))
    assert (e.line, e.column) == (13, 5)
    assert 'line 13, column 5' in str(e) and 'num_ouput' in str(e) and 'Did you mean "num_output"' in str(e)
    assert '   13 |     num_ouput: 16' in str(e)
    e = err('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU" bottom: "x" top: "y"\n  relu_param { inplace: maybe }\n}')
    assert (e.line, e.column) == (5, 25) and 'maybe' in str(e)
    e = err('layer { name: "a" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MEAN } }')
    assert (e.line, e.column) == (1, 78) and 'no value named MEAN' in str(e)
    e = err('layer { name: "a" type: "ReLU" bottom: "x" top: "y" }}')
    assert (e.line, e.column) == (1, 54)
    assert isinstance(e, ValueError)

def test_unknown_type_names_layer_line_and_supported_types():
    e = err(ZOO.replace('type: "ReLU"\n  bottom: "batch_norm_blob1"',
                        'type: "LeakyReLU"\n  bottom: "batch_norm_blob1"'))
    assert (e.line, e.column) == (35, 1)
    assert "layer #2 'relu1' has unknown type 'LeakyReLU'" in str(e)
    assert 'supported types: ' + ', '.join(SUPPORTED_LAYERS) in str(e)

@pytest.mark.parametrize('src,msg', [
    ('layer { type: "ReLU" bottom: "x" top: "y" }', 'layer #0 has no name'),
    ('layer { name: "r" bottom: "x" top: "y" }', "layer #0 'r' has no type; supported types: Input"),
    ('layer { name: "r" type: "ReLU" bottom: "x" }', "layer #0 'r' (ReLU) has no top"),
    ('layer { name: "r" type: "ReLU" top: "x" }', "layer #0 'r' (ReLU) has no bottom"),
    ('layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { kernel_size: 3 } }',
     "layer 'c' (Convolution): convolution_param.num_output is missing"),
    ('layer { name: "d" type: "Deconvolution" bottom: "x" top: "y" }',
     "layer 'd' (Deconvolution): convolution_param.num_output is missing"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "y" }',
     "layer #0 'f' (InnerProduct): inner_product_param.num_output is missing"),
    ('layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 } }',
     "layer 'c' (Convolution): kernel_size (or kernel_h/kernel_w) is required"),
    ('layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\nlayer { name: "r" type: "ReLU" bottom: "y" top: "z" }',
     "line 2, column 1: layer #1 'r': duplicate layer name"),
    ('name: "empty"', 'the net has no layers'),
    ('input: "a" input_dim: 1 input_dim: 3 input_dim: 8\nlayer { name: "r" type: "ReLU" bottom: "a" top: "b" }',
     '3 input_dim for 1 input(s): need 4 per input'),
    ('input: "a" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 input_shape { dim: 1 }\n'
     'layer { name: "r" type: "ReLU" bottom: "a" top: "b" }',
     'either as input_shape or as input_dim, not both'),
    ('input: "a" input: "b" input_shape { dim: 1 }\nlayer { name: "r" type: "ReLU" bottom: "a" top: "b" }',
     '1 input_shape for 2 input(s)'),
    ('layer { name: "in" type: "Input" top: "x" top: "y" top: "z" input_param { shape { dim: 1 } shape { dim: 2 } } }',
     "layer 'in' (Input): 2 shapes for 3 tops"),
    ('input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1\nlayer { name: "in" type: "Input" top: "x" }',
     "layer 'in' (Input): input 'x' is declared twice"),
])
def test_layer_and_input_errors(src, msg):
    assert msg in str(err(src))

def test_layer_error_line_points_at_layer():
    src = ('name: "n"\n# layer { in a comment }\nlayer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
           '  layer {\n name: "b"\n type: "Nope" }')
    e = err(src)
    assert (e.line, e.column) == (4, 3) and "layer #1 'b' has unknown type 'Nope'" in str(e)

# ---------------------------------------------------------------- sources

def test_sources(tmp_path):
    f = tmp_path / 'zoo.prototxt'
    f.write_text(ZOO)
    ref = parse_prototxt(ZOO)
    assert parse_prototxt(f) == ref and parse_prototxt(str(f)) == ref
    with pytest.raises(FileNotFoundError, match='no such prototxt file'):
        parse_prototxt(str(tmp_path / 'missing.prototxt'))
    with pytest.raises(FileNotFoundError): parse_prototxt(tmp_path / 'missing.prototxt')
    with pytest.raises(TypeError, match='expected prototxt text'): parse_prototxt(ZOO.encode())
    with pytest.raises(PrototxtError, match='line 1, column 1'): parse_prototxt('x' * 5000)  # too long to be a path

# ---------------------------------------------------------------- geometry

def conv(text):
    return parse_prototxt('layer { name: "c" type: "Convolution" bottom: "x" top: "y" '
                          'convolution_param { num_output: 4 ' + text + ' } }').layer[0]

@pytest.mark.parametrize('text,key,val', [
    ('kernel_size: 3', 'kernel', (3, 3)), ('kernel_size: 3 kernel_size: 5', 'kernel', (3, 5)),
    ('kernel_h: 1 kernel_w: 7', 'kernel', (1, 7)), ('kernel_size: 3', 'stride', (1, 1)),
    ('kernel_size: 3 stride: 2', 'stride', (2, 2)), ('kernel_size: 3 stride: 2 stride: 1', 'stride', (2, 1)),
    ('kernel_size: 3 stride_h: 2 stride_w: 3', 'stride', (2, 3)), ('kernel_size: 3', 'pad', (0, 0)),
    ('kernel_size: 3 pad: 1', 'pad', (1, 1)), ('kernel_size: 3 pad_h: 2', 'pad', (2, 0)),
    ('kernel_size: 3 pad: 1 pad: 0', 'pad', (1, 0)), ('kernel_size: 3', 'dilation', (1, 1)),
    ('kernel_size: 3 dilation: 2', 'dilation', (2, 2)), ('kernel_size: 3 dilation: 2 dilation: 4', 'dilation', (2, 4)),
    ('kernel_size: 3', 'groups', 1), ('kernel_size: 3 group: 2', 'groups', 2), ('kernel_size: 3', 'bias', True),
    ('kernel_size: 3 bias_term: false', 'bias', False),
])
def test_conv_spellings(text, key, val):
    assert conv_geometry(conv(text))[key] == val

@pytest.mark.parametrize('text,msg', [
    ('kernel_size: 3 kernel_size: 3 kernel_size: 3', 'kernel_size takes 1 or 2 values (h, w), got 3'),
    ('kernel_h: 3', 'kernel_h and kernel_w go together'),
    ('kernel_size: 3 kernel_w: 3', 'give either kernel_size or kernel_h/kernel_w, not both'),
    ('kernel_size: 3 stride_h: 2', 'stride_h and stride_w go together'),
    ('kernel_size: 3 stride: 1 stride_h: 2 stride_w: 2', 'give either stride or stride_h/stride_w'),
    ('kernel_size: 3 pad: 1 pad_w: 2', 'give either pad or pad_h/pad_w'),
    ('kernel_size: 0', 'kernel_size must be >= 1'), ('kernel_size: 3 stride: 0', 'stride must be >= 1'),
    ('kernel_size: 3 dilation: 0', 'dilation must be >= 1'),
    ('kernel_size: 3 group: 3', 'group 3 must be >= 1 and divide num_output 4'),
])
def test_conv_geometry_errors(text, msg):
    with pytest.raises(PrototxtError, match=re.escape(msg)): conv_geometry(conv(text))
    e = err('layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
            + text + ' } }')
    assert "layer 'c' (Convolution)" in str(e) and e.line == 1  # caught at parse time too

def pool(text):
    return parse_prototxt(f'layer {{ name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {text} }} }}'
                          ).layer[0]

def test_pool_geometry_spellings():
    assert pool_geometry(pool('kernel_size: 2')) == dict(method='max', kernel=(2, 2), stride=(1, 1), pad=(0, 0),
                                                         global_pool=False, ceil_mode=True)
    hw = pool('pool: AVE kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0')
    assert pool_geometry(hw)['kernel'] == (3, 1)
    assert pool_geometry(pool('kernel_size: 2 round_mode: FLOOR'))['ceil_mode'] is False
    assert pool_geometry(pool('kernel_size: 2 ceil_mode: false'))['ceil_mode'] is False
    assert pool_geometry(pool('kernel_size: 2 ceil_mode: true round_mode: CEIL'))['ceil_mode'] is True
    assert pool_geometry(pool('global_pooling: true'))['kernel'] is None

@pytest.mark.parametrize('text,msg', [
    ('pool: STOCHASTIC kernel_size: 2', 'pool STOCHASTIC is not supported'),
    ('global_pooling: true kernel_size: 2', 'global_pooling takes no kernel size'),
    ('global_pooling: true stride: 2', 'global_pooling needs stride 1 and pad 0'),
    ('kernel_size: 2 pad: 2', 'pad (2, 2) must be smaller than kernel (2, 2)'),
    ('stride: 2', 'kernel_size (or kernel_h/kernel_w) is required'),
    ('kernel_size: 2 round_mode: CEIL ceil_mode: false', 'round_mode CEIL contradicts ceil_mode False'),
])
def test_pool_geometry_errors(text, msg):
    with pytest.raises(PrototxtError, match=re.escape(msg)): parse_prototxt(
        f'layer {{ name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {text} }} }}')

def test_geometry_rejects_wrong_layer_type():
    net = parse_prototxt(ZOO)
    with pytest.raises(PrototxtError, match="layer 'relu1' \\(ReLU\\): conv_geometry needs"):
        conv_geometry(layer(net, 'relu1'))
    with pytest.raises(PrototxtError, match='pool_geometry needs a Pooling layer'): pool_geometry(layer(net, 'conv1'))

# ---------------------------------------------------------------- pooling output size

@pytest.mark.parametrize('args,ceil,floor', [
    ((112, 3, 2, 1), 57, 56),   # (112+2-3)/2 = 55.5
    ((113, 3, 2, 1), 57, 57),   # (113+2-3)/2 = 56
    ((32, 3, 2, 1), 17, 16),    # the tiny nets' stem pool: 31/2 = 15.5
    ((6, 3, 2, 0), 3, 2),       # 3/2 = 1.5
    ((7, 2, 2, 0), 4, 3),       # 5/2 = 2.5
    ((5, 2, 2, 1), 3, 3),       # ceil gives 4, but window 4 would start at 6 >= 5+1: Caffe drops it
    ((4, 3, 3, 1), 2, 2),       # ceil(3/3)+1 = 2; 3 < 4+1 keeps it
    ((8, 1, 1, 0), 8, 8),
])
def test_caffe_pool_out_by_hand(args, ceil, floor):
    assert caffe_pool_out(*args) == ceil and caffe_pool_out(*args, ceil_mode=False) == floor

def torch_out(n, k, s, p, ceil):
    return F.max_pool2d(torch.zeros(1, 1, n, 1), (k, 1), (s, 1), (p, 0), ceil_mode=ceil).shape[2]

def test_caffe_pool_out_matches_pytorch():
    grid = [(n, k, s, p) for n in range(1, 40) for k in range(1, 8) for s in range(1, k + 1)
            for p in range(k // 2 + 1) if n + 2 * p >= k]
    assert sum(caffe_pool_out(*g) != caffe_pool_out(*g, ceil_mode=False) for g in grid) > 100  # rounding matters
    for ceil in (True, False):
        assert [caffe_pool_out(*g, ceil_mode=ceil) for g in grid] == [torch_out(*g, ceil) for g in grid]

def test_caffe_pool_out_known_difference_from_pytorch():
    # kernel < stride without padding: Caffe keeps a last window that starts past the input, PyTorch drops it
    assert caffe_pool_out(4, 1, 2, 0) == 3 and torch_out(4, 1, 2, 0, True) == 2
    assert caffe_pool_out(4, 1, 2, 0, ceil_mode=False) == torch_out(4, 1, 2, 0, False) == 2

@pytest.mark.parametrize('args', [(0, 1, 1, 0), (3, 0, 1, 0), (3, 1, 0, 0), (3, 1, 1, -1), (2, 5, 1, 1)])
def test_caffe_pool_out_invalid(args):
    with pytest.raises(ValueError, match='invalid pooling'): caffe_pool_out(*args)

# ---------------------------------------------------------------- text round trip

def test_round_trip_is_stable():
    for src in (ZOO, EVERY):
        net = parse_prototxt(src)
        text = net_to_text(net)
        assert parse_prototxt(text) == net and net_to_text(parse_prototxt(text)) == text
    assert 'inplace: true' in net_to_text(parse_prototxt(ZOO))
