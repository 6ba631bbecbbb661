"""Weight-space mixing (02_vcn) on whole supermodels: the same outputs and gradients as the options computed apart.

Deeplab-ResNet34 (the shipped prototxt) and torchvision's resnet18, compiled with `search_bn='after_mix'`, in warm-up
(the pre-train mean) and search (a soft Gumbel sample with fixed noise), on one batch shared by the tasks and on a
batch per task, in training mode. Compared in float64: every output, the gradient of every parameter (shared and task
weights, batch norms, skips, policy logits) and every batch-norm statistic agree to 1e-9 relative (the identity is
exact; what is left is rounding). In float32 both computations' outputs are within 2e-5 of the float64 result
(rounding through 36 training-mode batch norms reaches ~1e-5 either way); gradients are not compared there on whole
networks: an activation within float32 rounding of a ReLU's kink (|y| ~ 1e-6, about one in 10^5) flips the ReLU's
mask in one computation and not in the other, which changes a gradient entry by its full size. 02_vcn compares every
gradient in float32 on single VCNs, where there is no such kink."""
import copy
import pytest, torch, torchvision
from automtl_nb.compiler import compile_supermodel
from automtl_nb.models import load_zoo

TAU = 0.5

def _backbone(name):
    "(backbone, per-sample input shape) of a test backbone."
    if name == 'deeplab': return load_zoo('deeplab_resnet34'), (3, 32, 32)  # 4x4 at the end
    return torchvision.models.resnet18(weights=None), (3, 64, 64)  # layer4 at 2x2: batch norms over 8 values

def _supermodel(name, dtype, seed=0):
    "The 2-task after_mix supermodel of `name`, task copies and skips moved away from the shared weights."
    torch.manual_seed(seed)
    net, shape = _backbone(name)
    sm = compile_supermodel(net, ['a', 'b'], search_bn='after_mix', input_shape=shape)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in sm.named_parameters():
            if n != 'logits': p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))
        sm.logits.copy_(torch.randn(sm.logits.shape, generator=g))
    return sm.to(dtype), shape

def _run(sm, x, mode, weight_mix, backward=True):
    "Outputs, parameter gradients and buffers of a copy of `sm` after one forward and backward."
    m = copy.deepcopy(sm).train()
    for v in m.vcns.values(): v.weight_mix = v.weight_mix and weight_mix
    if mode == 'warmup': m.set_mode('warmup')
    else:
        u = torch.rand(m.logits.shape, generator=torch.Generator().manual_seed(7))
        G = -torch.log(-torch.log(u)).to(x.dtype)  # fixed Gumbel noise
        m.set_mode('search')
        m.option_weights = lambda: ((m.logits + G) / TAU).softmax(-1)
    out = m(x)
    if not backward: return out, None, None
    gens = [torch.Generator().manual_seed(i) for i in range(len(out))]
    sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o, g in zip(out.values(), gens)).backward()
    return out, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())

def _rel(a, b, scale):
    "Largest difference relative to the larger of `b`'s largest entry and `scale` (zero gradients hold only rounding)."
    if a is None or b is None: return 0. if a is None and b is None else float('inf')
    return ((a - b).abs().max() / max(b.abs().max().item(), scale)).item()

def _inputs(shape, dtype):
    "A batch of 2 shared by the tasks, and a batch of 2 per task."
    g = torch.Generator().manual_seed(3)
    return {'shared': torch.randn(2, *shape, generator=g).to(dtype),
            'per task': torch.randn(2, 2, *shape, generator=g).to(dtype)}

@pytest.mark.parametrize('name', ['deeplab', 'resnet18'])
def test_weight_space_mix_equals_mixing_outputs_float64(name):
    sm, shape = _supermodel(name, torch.float64)
    assert all(v.weight_mix == (v.op is not None) for v in sm.vcns.values())  # every conv+BN, and resnet's fc
    for mode in ('warmup', 'search'):
        for kind, x in _inputs(shape, torch.float64).items():
            (ya, ga, ba), (yb, gb, bb) = _run(sm, x, mode, True), _run(sm, x, mode, False)
            worst = {f'output {t}': _rel(ya[t], yb[t], 0.) for t in ya}
            scale = 1e-3 * max(g.abs().max().item() for g in gb.values() if g is not None)
            worst.update({f'grad {n}': _rel(ga[n], gb[n], scale) for n in gb})
            worst.update({f'buffer {n}': _rel(ba[n].double(), bb[n].double(), 1e-3) for n in bb})
            k = max(worst, key=worst.get)
            assert worst[k] <= 1e-9, f'{name} {mode} {kind} input: {k} differs by {worst[k]:.2e}'
            assert (gb['logits'] is None) == (mode == 'warmup')  # the policy learns in search only

@pytest.mark.parametrize('name', ['deeplab', 'resnet18'])
def test_weight_space_mix_outputs_float32(name):
    "Float32 outputs as close to the float64 option-by-option mix as float32 allows (either computation: ~1e-5 here)."
    sm, shape = _supermodel(name, torch.float32)
    sm64 = copy.deepcopy(sm).double()
    for mode in ('warmup', 'search'):
        for kind, x in _inputs(shape, torch.float32).items():
            with torch.no_grad():
                truth = _run(sm64, x.double(), mode, False, backward=False)[0]
                ours, apart = (_run(sm, x, mode, on, backward=False)[0] for on in (True, False))
            for t in truth:
                err, err_apart = _rel(ours[t].double(), truth[t], 0.), _rel(apart[t].double(), truth[t], 0.)
                assert err <= 2e-5 and err_apart <= 2e-5, f'{name} {mode} {kind}, {t}: {err:.1e} ({err_apart:.1e})'
