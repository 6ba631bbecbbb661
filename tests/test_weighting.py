"Deeper checks of `automtl_nb.weighting`: hand computations, DWA over several epochs, resuming, error messages."
import io, math
import pytest
import torch
from automtl_nb.weighting import (PAPER_LAMBDAS, PAPER_LAMBDA_REG, Weighting, FixedWeighting, UncertaintyWeighting, DWA,
                                  WEIGHTINGS, get_weighting)

TASKS = ['seg', 'normal', 'depth']


def losses(*vals, grad=False):
    return {t: torch.tensor(float(v), requires_grad=grad) for t, v in zip(TASKS, vals)}


def roundtrip(module, fresh):
    "Save `module`'s state through a file-like buffer (weights_only load) into `fresh`."
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


# ---------------------------------------------------------------- constants
def test_paper_constants():
    "Paper Appendix B, Table 7."
    assert PAPER_LAMBDAS == {'cityscapes': {'seg': 1, 'depth': 1}, 'nyuv2': {'seg': 5, 'normal': 20, 'depth': 5},
                             'taskonomy': {'seg': 1, 'normal': 3, 'depth': 2, 'keypoint': 7, 'edge': 7}}
    assert PAPER_LAMBDA_REG == {'cityscapes': 5e-4, 'nyuv2': 1e-3, 'taskonomy': 5e-4}


# ---------------------------------------------------------------- base class
def test_base_class_contract():
    w = Weighting(TASKS)
    assert w.tasks == TASKS
    assert w.epoch_end({'seg': 1.}) is None  # the default hook ignores its input
    with pytest.raises(NotImplementedError, match='must define lambdas'): w(losses(1, 2, 3))
    with pytest.raises(ValueError, match='non-empty'): Weighting([])
    with pytest.raises(ValueError, match='distinct'): Weighting(['a', 'a'])


@pytest.mark.parametrize('make', [lambda: FixedWeighting({t: 1. for t in TASKS}), lambda: UncertaintyWeighting(TASKS),
                                  lambda: DWA(TASKS)])
def test_loss_dict_errors(make):
    w = make()
    with pytest.raises(ValueError, match=r"missing \['depth'\], unexpected \[\]"):
        w({'seg': torch.tensor(1.), 'normal': torch.tensor(1.)})
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['edge'\]"):
        w({**losses(1, 2, 3), 'edge': torch.tensor(1.)})
    with pytest.raises(ValueError, match="loss of task 'normal' must be a scalar tensor"):
        w({**losses(1, 2, 3), 'normal': torch.ones(2, 2)})
    with pytest.raises(ValueError, match="loss of task 'seg' must be a scalar tensor"):
        w({**losses(1, 2, 3), 'seg': 1.0})
    with pytest.raises(TypeError, match='must be a dict'):
        w([torch.tensor(1.)] * 3)


def test_accepts_one_element_losses_and_keeps_dtype():
    w = FixedWeighting({t: 2. for t in TASKS})
    out = w({'seg': torch.tensor([1.]), 'normal': torch.tensor([[2.]]), 'depth': torch.tensor(3.)})
    assert out.shape == () and out.item() == pytest.approx(12.)
    out64 = w({t: torch.tensor(1., dtype=torch.float64) for t in TASKS})
    assert out64.dtype == torch.float64


# ---------------------------------------------------------------- fixed
def test_fixed_hand_computation_and_gradients():
    w = FixedWeighting({'seg': 5, 'normal': 20, 'depth': 5})
    L = losses(0.7, 0.12, 1.3, grad=True)
    total = w(L)
    assert total.item() == pytest.approx(5 * 0.7 + 20 * 0.12 + 5 * 1.3)
    total.backward()
    assert [L[t].grad.item() for t in TASKS] == [5., 20., 5.]
    assert w.weights() == {'seg': 5., 'normal': 20., 'depth': 5.}
    assert list(w.parameters()) == []


def test_fixed_dataset_names_and_subsets():
    assert FixedWeighting('taskonomy').weights() == {'seg': 1., 'normal': 3., 'depth': 2., 'keypoint': 7., 'edge': 7.}
    w = FixedWeighting('nyuv2', tasks=['depth', 'seg'])
    assert w.tasks == ['depth', 'seg'] and w.weights() == {'depth': 5., 'seg': 5.}
    assert w({'seg': torch.tensor(1.), 'depth': torch.tensor(2.)}).item() == pytest.approx(15.)


def test_fixed_errors():
    with pytest.raises(ValueError, match=r"no λ for task\(s\) \['keypoint'\]; λ is given for \['seg', 'depth'\]"):
        FixedWeighting('cityscapes', tasks=['seg', 'keypoint'])
    with pytest.raises(ValueError,
                       match=r"unknown dataset 'nyu'; choose one of \['cityscapes', 'nyuv2', 'taskonomy'\]"):
        FixedWeighting('nyu')
    with pytest.raises(ValueError, match='finite and >= 0'): FixedWeighting({'seg': -1.})
    with pytest.raises(ValueError, match='finite and >= 0'): FixedWeighting({'seg': math.inf})
    with pytest.raises(TypeError, match='must be a dict'): FixedWeighting([1., 2.])
    w = FixedWeighting({'seg': 1.})
    with pytest.raises(ValueError, match=r"unexpected \['depth'\]"):
        w({'seg': torch.tensor(1.), 'depth': torch.tensor(1.)})


# ---------------------------------------------------------------- uncertainty
def test_uncertainty_hand_computation():
    w = UncertaintyWeighting(TASKS)
    assert torch.equal(w.log_vars.detach(), torch.full((3,), -0.5))
    with torch.no_grad(): w.log_vars.copy_(torch.tensor([-0.5, 0.3, 1.2]))
    vals = [0.8, 0.05, 2.5]
    total = w(losses(*vals))
    s = [-0.5, 0.3, 1.2]
    hand = sum(math.exp(-sk) / 2 * Lk + sk / 2 for sk, Lk in zip(s, vals))
    assert total.item() == pytest.approx(hand, rel=1e-6)
    assert w.weights() == pytest.approx({t: math.exp(-sk) / 2 for t, sk in zip(TASKS, s)})
    total.backward()
    want = [0.5 * (1 - math.exp(-sk) * Lk) for sk, Lk in zip(s, vals)]
    assert w.log_vars.grad.tolist() == pytest.approx(want, rel=1e-5)


def test_uncertainty_gradients_reach_losses_and_s_and_optimises():
    w = UncertaintyWeighting(['a', 'b'], init=0.)
    L = {'a': torch.tensor(4., requires_grad=True), 'b': torch.tensor(0.25, requires_grad=True)}
    w(L).backward()
    assert L['a'].grad.item() == pytest.approx(0.5) and (w.log_vars.grad != 0).all()
    # minimising over s alone drives exp(s_k) towards L_k (the optimum of e^{-s}L/2 + s/2)
    opt = torch.optim.Adam(w.parameters(), lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        w({'a': torch.tensor(4.), 'b': torch.tensor(0.25)}).backward()
        opt.step()
    assert w.log_vars.exp().tolist() == pytest.approx([4., 0.25], rel=1e-2)


# ---------------------------------------------------------------- DWA
def dwa_hand(hist, T=2., K=None):
    "λ per epoch by hand, MTAN's rule: 1 for epochs 0 and 1, then K·softmax(L(e-1)/L(e-2) / T)."
    n = len(hist[0])
    K = n if K is None else K
    out = []
    for e in range(len(hist) + 1):
        if e < 2:
            out.append([1.] * n)
            continue
        w = [hist[e - 1][k] / hist[e - 2][k] for k in range(n)]
        z = [math.exp(x / T) for x in w]
        out.append([K * x / sum(z) for x in z])
    return out


HIST = [[2.0, 0.5, 1.0], [1.2, 0.45, 1.0], [0.9, 0.44, 0.7], [0.8, 0.30, 0.6]]


@pytest.mark.parametrize('T,K', [(2., None), (1., None), (5., 1.)])
def test_dwa_hand_computation_over_four_epochs(T, K):
    w = DWA(TASKS, temp=T, K=K)
    expected = dwa_hand(HIST, T, K)
    got = [list(w.weights().values())]
    for h in HIST:
        w.epoch_end(dict(zip(TASKS, h)))
        got.append(list(w.weights().values()))
    for g, e in zip(got, expected): assert g == pytest.approx(e, rel=1e-6)
    assert sum(got[-1]) == pytest.approx(3. if K is None else K)
    assert int(w.n_epochs) == 4
    # the weighted total uses the current λ
    want = sum(l * v for l, v in zip(expected[-1], [1., 2., 3.]))
    assert w(losses(1., 2., 3.)).item() == pytest.approx(want, rel=1e-6)


def test_dwa_slower_task_gets_more_weight_and_accepts_tensors():
    w = DWA(['a', 'b'])
    w.epoch_end({'a': torch.tensor(1.), 'b': torch.tensor(1.)})
    w.epoch_end({'a': torch.tensor(0.5), 'b': torch.tensor(1.)})  # a fell, b did not
    assert w.weights()['b'] > 1 > w.weights()['a']


def test_dwa_errors():
    with pytest.raises(ValueError, match='temp must be > 0'): DWA(TASKS, temp=0.)
    w = DWA(TASKS)
    with pytest.raises(ValueError, match=r"mean losses do not match tasks .*missing \['depth'\]"):
        w.epoch_end({'seg': 1., 'normal': 1.})
    with pytest.raises(ValueError, match='finite and > 0'): w.epoch_end({'seg': 1., 'normal': math.nan, 'depth': 1.})
    with pytest.raises(ValueError, match='finite and > 0'): w.epoch_end({'seg': 1., 'normal': 0., 'depth': 1.})
    assert int(w.n_epochs) == 0  # a rejected call changes nothing


# ---------------------------------------------------------------- registry
def test_get_weighting():
    assert set(WEIGHTINGS) == {'fixed', 'uncertainty', 'dwa'}
    assert isinstance(get_weighting('fixed', TASKS), FixedWeighting)
    assert get_weighting('fixed', TASKS).weights() == dict.fromkeys(TASKS, 1.)
    assert get_weighting('fixed', ['seg', 'depth'], lambdas='cityscapes').weights() == {'seg': 1., 'depth': 1.}
    assert get_weighting('fixed', TASKS, lambdas={'seg': 2, 'normal': 3, 'depth': 4}).weights()['depth'] == 4.
    u = get_weighting('uncertainty', TASKS, init=0.)
    assert isinstance(u, UncertaintyWeighting) and u.weights() == dict.fromkeys(TASKS, 0.5)
    d = get_weighting('dwa', TASKS, temp=3., K=1.)
    assert isinstance(d, DWA) and (d.temp, d.K) == (3., 1.)
    with pytest.raises(ValueError,
                       match=r"unknown weighting 'equal'; choose one of \['fixed', 'uncertainty', 'dwa'\]"):
        get_weighting('equal', TASKS)
    with pytest.raises(TypeError): get_weighting('dwa', TASKS, lambdas={'seg': 1})


# ---------------------------------------------------------------- resuming
def test_dwa_state_round_trip_resumes_identically():
    a = DWA(TASKS)
    for h in HIST[:3]: a.epoch_end(dict(zip(TASKS, h)))
    b = roundtrip(a, DWA(TASKS))
    assert b.weights() == a.weights() and int(b.n_epochs) == 3
    assert torch.equal(b.loss_hist, a.loss_hist)
    for m in (a, b): m.epoch_end(dict(zip(TASKS, HIST[3])))
    assert b.weights() == a.weights()
    expected = dwa_hand(HIST)[-1]
    assert list(b.weights().values()) == pytest.approx(expected, rel=1e-6)


def test_dwa_state_after_one_epoch():
    "Resuming after a single epoch must still need just one more epoch before λ moves."
    a = DWA(['a', 'b'])
    a.epoch_end({'a': 1., 'b': 2.})
    b = roundtrip(a, DWA(['a', 'b']))
    b.epoch_end({'a': 0.5, 'b': 2.})
    assert b.weights()['b'] > b.weights()['a']


def test_uncertainty_state_round_trip():
    a = UncertaintyWeighting(TASKS)
    with torch.no_grad(): a.log_vars.copy_(torch.tensor([0.1, -1., 2.]))
    b = roundtrip(a, UncertaintyWeighting(TASKS))
    assert torch.equal(b.log_vars, a.log_vars) and b.weights() == a.weights()
    assert b(losses(1, 2, 3)).item() == a(losses(1, 2, 3)).item()


def test_fixed_state_round_trip():
    a = FixedWeighting('nyuv2')
    b = roundtrip(a, FixedWeighting(dict.fromkeys(TASKS, 1.)))
    assert b.weights() == {'seg': 5., 'normal': 20., 'depth': 5.}


@pytest.mark.parametrize('cls', [DWA, UncertaintyWeighting])
def test_state_for_other_tasks_is_rejected(cls):
    sd = cls(TASKS).state_dict()
    with pytest.raises(ValueError, match=r"state is for tasks \['seg', 'normal', 'depth'\] "
                                         r"but this weighting has tasks \['seg', 'depth', 'normal'\]"):
        cls(['seg', 'depth', 'normal']).load_state_dict(sd)


def test_moves_with_to_and_follows_the_losses_dtype():
    w = DWA(TASKS).to(torch.float64)
    assert w.loss_hist.dtype == w.lam.dtype == torch.float64 and w.n_epochs.dtype == torch.long
    u = UncertaintyWeighting(TASKS).to(torch.float64)
    assert u.log_vars.dtype == torch.float64
    out = u(losses(1, 2, 3))
    assert out.dtype == torch.float32
    out.backward()
    assert u.log_vars.grad.dtype == torch.float64 and (u.log_vars.grad != 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_gpu():
    dev = torch.device('cuda')
    for w in (FixedWeighting('nyuv2'), UncertaintyWeighting(TASKS), DWA(TASKS)):
        w = w.to(dev)
        w.epoch_end(dict(zip(TASKS, HIST[0])))
        out = w({t: torch.tensor(1., device=dev) for t in TASKS})
        assert out.device.type == 'cuda'
