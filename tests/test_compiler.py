"Batched supermodel vs the per-task reference oracle: outputs and gradients in warm-up, search and fixed modes."
import copy, sys
from pathlib import Path
import pytest, torch, torchvision
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from common import PerTaskReference  # the one per-task oracle (bench/common.py)
from automtl_nb.compiler import (compile_supermodel, MTLModel, Conv2dNode, BN2dNode, ReLUNode, PoolNode, EltwiseNode,
                                 ConcatNode, LinearNode)

class Branchy(MTLModel):
    "Strides, a concat, a residual sum, a depthwise conv and a classifier: every batching path."
    def __init__(self):
        super().__init__(in_ch=3)
        a = self.add(ReLUNode(), parents=self.add(BN2dNode(), parents=self.add(Conv2dNode(8, 3, stride=2, padding=1))))
        b = self.add(BN2dNode(), parents=self.add(Conv2dNode(8, 3, padding=1, groups=8)))
        c = self.add(EltwiseNode('sum'), parents=[a, b])
        d = self.add(Conv2dNode(4, 1), parents=c)
        e = self.add(ConcatNode(), parents=[c, d])
        f = self.add(Conv2dNode(16, 3, stride=2, padding=1), parents=e)
        f = self.add(ReLUNode(), parents=self.add(BN2dNode(), parents=f))
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

def _with_weights(sm, mode, W):
    "`sm` in `mode` ('warmup' or 'search') mixing with the fixed weights `W` (T, L, 3) instead of its own."
    sm.set_mode(mode)
    sm.option_weights = lambda: W
    return sm

def _run_both(sm, mode, x, train):
    "Outputs and gradients of the batched supermodel and the reference on identical copies."
    a, b = copy.deepcopy(sm).train(train), copy.deepcopy(sm).train(train)
    W = _weights(sm, mode)
    if mode == 'fixed': a.set_policy(W.argmax(-1))
    else: _with_weights(a, mode, W)
    ref = PerTaskReference(b).train(train)
    ya, yb = a(x), ref(x, W)
    r = {t: torch.randn_like(ya[t]) for t in ya}
    sum((ya[t] * r[t]).sum() for t in ya).backward()
    sum((yb[t] * r[t]).sum() for t in yb).backward()
    return a, b, ref, ya, yb

@pytest.mark.parametrize('mode', ['warmup', 'search', 'fixed'])
@pytest.mark.parametrize('train', [False, True])
def test_batched_equals_reference(mode, train):
    torch.manual_seed(0)
    sm = _diverge(compile_supermodel(Branchy(), ['seg', 'depth', 'normal']))
    x = torch.randn(4, 3, 16, 16)
    a, b, ref, ya, yb = _run_both(sm, mode, x, train)
    for t in sm.tasks: torch.testing.assert_close(ya[t], yb[t], atol=1e-5, rtol=1e-4)
    for k, v in a.vcns.items():  # shared weights: same parameters in both
        for (na, pa), (nb, pb) in zip(v.named_parameters(), b.vcns[k].named_parameters()):
            z = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # an option nobody uses is not run
            if na.startswith(('op.', 'norm.')): torch.testing.assert_close(z(pa), z(pb), atol=1e-4, rtol=1e-3)
    checked = set()
    for (k, v), t in ((kv, t) for kv in a.vcns.items() for t in range(len(sm.tasks))):  # task copies vs ref modules
        g = ref.option(k, 1, t)[0].weight.grad
        if g is not None and g.abs().sum() > 0:
            ga = v.specific_op.weight.grad.view(len(sm.tasks), -1)[t]
            torch.testing.assert_close(ga, g.flatten(), atol=1e-4, rtol=1e-3)
            checked.add(k)
    assert checked  # task-specific gradients were compared for some VCN

def test_per_task_inputs():
    "A (T, bs, C, H, W) input gives each task its own batch."
    sm = _diverge(compile_supermodel(Branchy(), ['a', 'b'])).eval()
    xs = torch.randn(2, 3, 3, 16, 16)
    W = _weights(sm, 'search')
    _with_weights(sm, 'search', W)
    ya, yb = sm(xs), PerTaskReference(sm)(xs, W)
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
    sm2.load_state_dict(sm.state_dict())
    sm2.set_mode('fixed')
    assert torch.equal(sm2.policy, p)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(sm.eval()(x)['a'], sm2.eval()(x)['a'])

# --- search_bn='after_mix': the original's batch norm after the mix ---------------------------------------------

@pytest.mark.parametrize('mode', ['warmup', 'search', 'fixed'])
@pytest.mark.parametrize('train', [False, True])
def test_after_mix_equals_reference(mode, train):
    "Outputs and gradients (shared ops, task copies, task BNs) of the batched after-mix supermodel vs the per-task one."
    torch.manual_seed(0)
    sm = _diverge(compile_supermodel(Branchy(), ['seg', 'depth', 'normal'], search_bn='after_mix'))
    assert sum(v.bn_after_mix for v in sm.vcns.values()) == 3  # the three conv+BN pairs (the 1x1 conv has no BN)
    a, b = copy.deepcopy(sm).train(train), copy.deepcopy(sm).train(train)
    W = _weights(sm, mode)
    if mode == 'fixed': a.set_policy(W.argmax(-1))
    else: _with_weights(a, mode, W)
    ref = PerTaskReference(b).train(train)
    x = torch.randn(4, 3, 16, 16)
    ya, yb = a(x), ref(x, W, warmup=mode == 'warmup')
    for t in sm.tasks: torch.testing.assert_close(ya[t], yb[t], atol=1e-5, rtol=1e-4)
    r = {t: torch.randn_like(ya[t]) for t in ya}
    sum((ya[t] * r[t]).sum() for t in ya).backward()
    sum((yb[t] * r[t]).sum() for t in yb).backward()
    z = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)
    for k, v in a.vcns.items():
        torch.testing.assert_close(z(v.op.weight), z(b.vcns[k].op.weight), atol=1e-4, rtol=1e-3)
        if not v.bn_after_mix: continue
        for t in range(3):
            bn_a = v.specific_norm.weight.grad[t]
            bn_b = ref.norms[f'{k}-{t}'].weight.grad
            torch.testing.assert_close(bn_a, bn_b, atol=1e-4, rtol=1e-3)  # each task trains its own BN
            ga, gb = z(v.specific_op.weight).view(3, -1)[t], z(ref.option(k, 1, t)[0].weight).flatten()
            torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-3)
        assert (v.norm.weight.grad is not None) == (mode == 'warmup')  # the shared BN serves warm-up only

def test_after_mix_per_task_inputs_and_shapes():
    sm = _diverge(compile_supermodel(Branchy(), ['a', 'b'], search_bn='after_mix')).eval()
    xs = torch.randn(2, 3, 3, 16, 16)
    W = _weights(sm, 'search')
    _with_weights(sm, 'search', W)
    ya, yb = sm(xs), PerTaskReference(sm)(xs, W)
    for t in sm.tasks:
        assert ya[t].shape == (3, 6)
        torch.testing.assert_close(ya[t], yb[t], atol=1e-5, rtol=1e-4)

def test_after_mix_state_dict_matches_per_option():
    "The setting moves no parameter: the two search spaces hold the same tensors under the same names."
    a = compile_supermodel(Branchy(), ['a', 'b'])
    b = compile_supermodel(Branchy(), ['a', 'b'], search_bn='after_mix')
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    a.eval().set_policy('specific')
    b.eval().set_policy('specific')
    for t in a.tasks: torch.testing.assert_close(a(x)[t], b(x)[t])  # all specific: conv then task BN either way

def test_after_mix_fixed_all_shared_runs_the_conv_once():
    sm = compile_supermodel(Branchy(), ['a', 'b', 'c'], search_bn='after_mix').set_policy('shared').eval()
    seen = []
    hooks = [v.op.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for v in sm.vcns.values()]
    sm(torch.randn(2, 3, 16, 16))
    for h in hooks: h.remove()
    assert seen[0] == 2  # the first conv reads the shared input once; after the tasks' BNs, per task
