"Batched supermodel vs the per-task reference oracle: outputs and gradients in warm-up, search and fixed modes."
import copy
import pytest, torch, torch.nn as nn, torchvision
from automtl_nb.compiler import compile_supermodel, MTLModel, Conv2dNode, BN2dNode, ReLUNode, PoolNode, EltwiseNode, ConcatNode, LinearNode
from reference import reference_forward, option_modules

class Branchy(MTLModel):
    "Strides, a concat, a residual sum, a depthwise conv and a classifier: every batching path."
    def __init__(self):
        super().__init__(in_ch=3)
        a = self.add(ReLUNode(), parents=self.add(BN2dNode(), parents=self.add(Conv2dNode(8, 3, stride=2, padding=1))))
        b = self.add(BN2dNode(), parents=self.add(Conv2dNode(8, 3, padding=1, groups=8)))
        c = self.add(EltwiseNode('sum'), parents=[a, b])
        d = self.add(Conv2dNode(4, 1), parents=c)
        e = self.add(ConcatNode(), parents=[c, d])
        f = self.add(ReLUNode(), parents=self.add(BN2dNode(), parents=self.add(Conv2dNode(16, 3, stride=2, padding=1), parents=e)))
        self.add(LinearNode(6), parents=self.add(PoolNode(global_pool=True), parents=f))

def _diverge(sm, seed=0):
    "Perturb every weight so task copies and skips differ from the shared ops."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sm.parameters(): p.add_(0.2 * torch.randn(p.shape, generator=g))
    return sm

def _weights(sm, mode, seed=1):
    T, L = len(sm.tasks), len(sm.vcns)
    g = torch.Generator().manual_seed(seed)
    if mode == 'warmup': return torch.full((T, L, 3), 1 / 3)
    if mode == 'search': return torch.softmax(torch.randn(T, L, 3, generator=g), -1)
    return torch.nn.functional.one_hot(torch.randint(0, 3, (T, L), generator=g), 3).float()

def _run_both(sm, mode, x, train):
    "Outputs and gradients of the batched supermodel and the reference on identical copies."
    a, b = copy.deepcopy(sm).train(train), copy.deepcopy(sm).train(train)
    W = _weights(sm, mode)
    if mode == 'fixed': a.set_policy(W.argmax(-1))
    else: a.set_mode(mode); a.option_weights = lambda: W
    mods = option_modules(b)
    for m in mods.values(): m.train(train)
    ya, yb = a(x), reference_forward(b, x, W, mods)
    r = {t: torch.randn_like(ya[t]) for t in ya}
    sum((ya[t] * r[t]).sum() for t in ya).backward(); sum((yb[t] * r[t]).sum() for t in yb).backward()
    return a, b, mods, ya, yb

@pytest.mark.parametrize('mode', ['warmup', 'search', 'fixed'])
@pytest.mark.parametrize('train', [False, True])
def test_batched_equals_reference(mode, train):
    torch.manual_seed(0)
    sm = _diverge(compile_supermodel(Branchy(), ['seg', 'depth', 'normal']))
    x = torch.randn(4, 3, 16, 16)
    a, b, mods, ya, yb = _run_both(sm, mode, x, train)
    for t in sm.tasks: torch.testing.assert_close(ya[t], yb[t], atol=1e-5, rtol=1e-4)
    for k, v in a.vcns.items():  # shared weights: same parameters in both
        for (na, pa), (nb, pb) in zip(v.named_parameters(), b.vcns[k].named_parameters()):
            z = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # an option nobody uses is not run at all
            if na.startswith(('op.', 'norm.')): torch.testing.assert_close(z(pa), z(pb), atol=1e-4, rtol=1e-3)
    checked = set()
    for (k, o, t), m in mods.items():  # task copies: the reference's standalone modules vs the batched slices
        if o == 0: continue
        v = a.vcns[k]
        if o == 1 and m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0:
            ga = v.specific_op.weight.grad.view(len(sm.tasks), -1)[t]
            torch.testing.assert_close(ga, m[0].weight.grad.flatten(), atol=1e-4, rtol=1e-3)
            checked.add(k)
    assert checked  # task-specific gradients were compared for some VCN

def test_per_task_inputs():
    "A (T, bs, C, H, W) input gives each task its own batch."
    sm = _diverge(compile_supermodel(Branchy(), ['a', 'b'])).eval()
    xs = torch.randn(2, 3, 3, 16, 16)
    W = _weights(sm, 'search'); sm.set_mode('search'); sm.option_weights = lambda: W
    ya, yb = sm(xs), reference_forward(sm, xs, W)
    for t in sm.tasks: torch.testing.assert_close(ya[t], yb[t], atol=1e-5, rtol=1e-4)

def test_policy_logits_get_gradients_in_search():
    sm = compile_supermodel(Branchy(), ['a', 'b']).set_mode('search', tau=1.)
    sum(o.sum() for o in sm(torch.randn(2, 3, 16, 16)).values()).backward()
    assert sm.logits.grad is not None and sm.logits.grad.abs().sum() > 0

def test_fixed_policy_only_computes_used_options():
    "Under a fixed all-shared policy no task-specific copy or skip runs."
    sm = compile_supermodel(Branchy(), ['a', 'b']).set_policy('shared').eval()
    calls = []
    for v in sm.vcns.values():
        v.specific_op.register_forward_hook(lambda *a: calls.append(1))
    sm(torch.randn(1, 3, 16, 16))
    assert calls == []

@pytest.mark.parametrize('ctor', [torchvision.models.resnet34, torchvision.models.mobilenet_v2])
def test_torchvision_equivalence(ctor):
    tv = ctor(weights=None).eval()
    sm = compile_supermodel(tv, ['seg', 'depth', 'normal']).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = tv(x)
    s = ref.abs().max()
    torch.testing.assert_close(sm.set_policy('shared')(x)['seg'], ref, atol=0, rtol=0)  # the very same calls
    out = sm.set_policy('specific')(x)
    for t in sm.tasks: torch.testing.assert_close(out[t] / s, ref / s, atol=1e-5, rtol=0)
    assert sm.set_policy('skip')(x)['seg'].shape == ref.shape

def test_state_dict_round_trip_keeps_policy():
    sm = compile_supermodel(Branchy(), ['a', 'b'])
    p = torch.randint(0, 3, (2, len(sm.vcns)))
    sm.set_policy(p)
    sm2 = compile_supermodel(Branchy(), ['a', 'b'])
    sm2.load_state_dict(sm.state_dict()); sm2.set_mode('fixed')
    assert torch.equal(sm2.policy, p)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(sm.eval()(x)['a'], sm2.eval()(x)['a'])
