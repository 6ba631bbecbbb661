"Deeper checks of `automtl_nb.policy`: hand computations, sampling statistics, error messages, edge cases."
import json, math
import pytest
import torch
import torch.nn.functional as F
from automtl_nb.policy import (SHARED, SPECIFIC, SKIP, OPTIONS, gumbel_softmax, TauSchedule, depth_weights,
                               policy_regularizer, sample_policy, argmax_policy, policy_to_onehot, policy_to_json,
                               policy_from_json, policy_summary)

# A tiny (2 tasks, 3 layers, 3 options) policy used by the hand computations
L3 = [[[0.5, -1.0, 2.0], [0.0, 0.3, -0.7], [1.5, 1.0, 0.2]],
      [[-0.2, 0.4, 0.1], [2.0, -2.0, 0.0], [0.0, 0.0, 0.0]]]
DEPTHS = [1, 2, 3]


def softplus(x): return math.log1p(math.exp(x))
def softmax(v): e = [math.exp(x) for x in v]; return [x / sum(e) for x in e]
def hand_reg(P, depths, scale=1., L=None):
    "Paper eq. 2 written with plain Python math over nested lists P[task][layer][option]."
    L = max(depths) if L is None else L
    return sum((L - depths[l]) / L * (softplus(scale * (row[1] - row[0])) + softplus(scale * (row[2] - row[0])))
               for task in P for l, row in enumerate(task))


# ---------------------------------------------------------------- constants
def test_options():
    assert (SHARED, SPECIFIC, SKIP) == (0, 1, 2)
    assert OPTIONS == ('shared', 'specific', 'skip')


# ---------------------------------------------------------------- gumbel_softmax
@pytest.mark.parametrize('dim', [-1, 0, 1])
def test_hard_is_exact_onehot(dim):
    torch.manual_seed(0)
    lg = torch.randn(3, 3, 3) * 3
    y = gumbel_softmax(lg, tau=0.7, hard=True, dim=dim)
    assert set(y.unique().tolist()) <= {0., 1.}
    assert torch.equal(y.sum(dim), torch.ones(3, 3))


def test_soft_is_distribution_and_keeps_dtype_device():
    lg = torch.randn(4, 5, 3, dtype=torch.float64)
    y = gumbel_softmax(lg, tau=2.)
    assert y.dtype == torch.float64 and y.device == lg.device and y.shape == lg.shape
    assert torch.allclose(y.sum(-1), torch.ones(4, 5, dtype=torch.float64))
    assert (y > 0).all()


@pytest.mark.parametrize('hard', [False, True])
def test_gradients_reach_all_logits(hard):
    torch.manual_seed(1)
    lg = torch.randn(2, 6, 3, requires_grad=True)
    (gumbel_softmax(lg, tau=1., hard=hard) * torch.randn(2, 6, 3)).sum().backward()
    assert (lg.grad != 0).all()


def test_straight_through_gradient_equals_soft_gradient():
    lg = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.randn(2, 4, 3)
    grads = []
    for hard in (False, True):
        lg.grad = None
        torch.manual_seed(5)  # the same Gumbel noise in both modes
        (gumbel_softmax(lg, tau=0.8, hard=hard) * w).sum().backward()
        grads.append(lg.grad.clone())
    assert torch.allclose(grads[0], grads[1])
    torch.manual_seed(5)
    soft = gumbel_softmax(lg, tau=0.8)
    torch.manual_seed(5)
    hard = gumbel_softmax(lg, tau=0.8, hard=True)
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))


@pytest.mark.parametrize('tau', [0.3, 1., 5.])
def test_hard_argmax_frequencies_match_softmax(tau):
    torch.manual_seed(0)
    lg = torch.tensor([[1.5, 0., -0.5], [0., 0., 0.], [-1., 2., 0.5]])
    freq = gumbel_softmax(lg.expand(10_000, 3, 3), tau=tau, hard=True).mean(0)  # (3, 3)
    assert (freq - lg.softmax(-1)).abs().max() < 0.02


def test_seeded_reproducible():
    lg = torch.randn(2, 3, 3)
    torch.manual_seed(42); a = gumbel_softmax(lg)
    torch.manual_seed(42); b = gumbel_softmax(lg)
    c = gumbel_softmax(lg)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_small_tau_nearly_onehot_large_tau_nearly_uniform():
    torch.manual_seed(0)
    lg = torch.tensor([0.5, 0., -0.5]).expand(1000, 3)
    top = gumbel_softmax(lg, tau=1e-3).max(-1).values
    assert (top > 0.99).float().mean() > 0.99  # a tie of two Gumbel draws within ~τ is rare but possible
    assert gumbel_softmax(lg, tau=1e3).max(-1).values.max() < 0.35


def test_gumbel_bad_tau():
    for tau in (0., -1.):
        with pytest.raises(ValueError, match='tau must be > 0'):
            gumbel_softmax(torch.zeros(3), tau=tau)


# ---------------------------------------------------------------- TauSchedule
def test_tau_schedule_hand_values():
    s = TauSchedule()
    assert (s.tau0, s.gamma, s.every, s.min_tau) == (5., 0.965, 100, 0.)
    assert s(0) == 5. and s(99) == 5.
    assert s(100) == pytest.approx(4.825)
    assert s(250) == pytest.approx(5 * 0.965 ** 2)
    assert s(1000) == pytest.approx(5 * 0.965 ** 10)
    assert TauSchedule(tau0=1., gamma=0.5, every=10, min_tau=0.2)(35) == pytest.approx(0.2)
    assert TauSchedule(tau0=1., gamma=0.5, every=10, min_tau=0.1)(25) == pytest.approx(0.25)
    assert isinstance(s(123), float)


def test_tau_schedule_original_code_values():
    "REFERENCE.md: τ ≈ 1.25 after 4000 (CityScapes) and ≈ 0.147 after 10,000 (NYUv2) policy iterations."
    s = TauSchedule(every=101)
    assert s(4000) == pytest.approx(1.25, abs=0.01)
    assert s(10_000) == pytest.approx(0.147, abs=0.001)


@pytest.mark.parametrize('kw,msg', [(dict(tau0=0.), 'tau0 must be > 0'), (dict(gamma=0.), 'gamma must be in'),
                                    (dict(gamma=1.1), 'gamma must be in'), (dict(every=0), 'every must be an integer'),
                                    (dict(every=2.5), 'every must be an integer'), (dict(min_tau=-1.), 'min_tau')])
def test_tau_schedule_bad_args(kw, msg):
    with pytest.raises(ValueError, match=msg): TauSchedule(**kw)


def test_tau_schedule_negative_step():
    with pytest.raises(ValueError, match='step must be >= 0'): TauSchedule()(-5)


# ---------------------------------------------------------------- depth_weights
def test_depth_weights():
    assert torch.allclose(depth_weights([1, 2, 3]), torch.tensor([2 / 3, 1 / 3, 0.]))
    assert torch.allclose(depth_weights(torch.tensor([3, 1, 1])), torch.tensor([0., 2 / 3, 2 / 3]))
    assert torch.allclose(depth_weights([1, 33], max_depth=33), torch.tensor([32 / 33, 0.]))
    assert depth_weights([1, 2]).dtype == torch.float32
    w64 = depth_weights([1, 2, 3], dtype=torch.float64)
    assert w64.dtype == torch.float64 and w64[0].item() == 2 / 3  # exact in double precision


@pytest.mark.parametrize('depths,kw,exc,msg', [
    ([0, 1], {}, ValueError, 'depths must lie in 1..1'),
    ([1, 5], dict(max_depth=4), ValueError, 'depths must lie in 1..4'),
    ([], {}, TypeError, 'non-empty'), ([1.5], {}, TypeError, 'ints'), ([[1, 2]], {}, TypeError, '1-D')])
def test_depth_weights_errors(depths, kw, exc, msg):
    with pytest.raises(exc, match=msg): depth_weights(depths, **kw)


# ---------------------------------------------------------------- policy_regularizer
def test_regularizer_logits_hand_computation():
    got = policy_regularizer(torch.tensor(L3), DEPTHS)
    assert got.shape == ()
    assert got.item() == pytest.approx(hand_reg(L3, DEPTHS), rel=1e-6)
    assert (policy_regularizer(torch.tensor(L3), DEPTHS, scale=6.).item()
            == pytest.approx(hand_reg(L3, DEPTHS, 6.), rel=1e-6))
    assert (policy_regularizer(torch.tensor(L3), DEPTHS, max_depth=5).item()
            == pytest.approx(hand_reg(L3, DEPTHS, L=5), rel=1e-6))


def test_regularizer_hand_value_is_what_we_think():
    "Spot-check the hand formula itself on one entry: task 0, layer 0, weight 2/3."
    assert hand_reg([[L3[0][0]]], [1], L=3) == pytest.approx(2 / 3 * (softplus(-1.5) + softplus(1.5)))


def test_regularizer_softmax_hand_computation():
    P = [[softmax(row) for row in task] for task in L3]
    got = policy_regularizer(torch.tensor(L3, dtype=torch.float64), DEPTHS, on='softmax', scale=6.)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hand_reg(P, DEPTHS, 6.), rel=1e-9)


def test_regularizer_gumbel_uses_a_fresh_soft_sample():
    lg = torch.tensor(L3)
    torch.manual_seed(7); g = gumbel_softmax(lg, tau=2.5).tolist()
    torch.manual_seed(7); got = policy_regularizer(lg, DEPTHS, on='gumbel', tau=2.5, scale=6.)
    assert got.item() == pytest.approx(hand_reg(g, DEPTHS, 6.), rel=1e-5)
    assert policy_regularizer(lg, DEPTHS, on='gumbel', tau=2.5, scale=6.).item() != pytest.approx(got.item())


def test_regularizer_gradient_pushes_sharing_at_shallow_layers():
    lg = torch.zeros(2, 5, 3, requires_grad=True)
    policy_regularizer(lg, [1, 2, 3, 4, 5]).backward()
    g0 = lg.grad[..., SHARED]  # (n_tasks, n_layers)
    assert (g0[:, :-1] < 0).all() and (lg.grad[:, :-1, 1:] > 0).all()
    assert (g0.abs().diff(dim=1) < 0).all()  # strongest at the input, decreasing with depth
    assert torch.equal(lg.grad[:, -1], torch.zeros(2, 3))  # the deepest layer has weight 0
    # the logits' gradient for one entry, by hand: -(L-l)/L * (σ(P1-P0) + σ(P2-P0))
    lg = torch.tensor(L3, requires_grad=True)
    policy_regularizer(lg, DEPTHS).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))
    p0, p1, p2 = L3[1][1]
    assert lg.grad[1, 1, 0].item() == pytest.approx(-(1 / 3) * (sig(p1 - p0) + sig(p2 - p0)), rel=1e-5)


@pytest.mark.parametrize('on', ['softmax', 'gumbel'])
def test_regularizer_gradient_sign_other_inputs(on):
    torch.manual_seed(0)
    lg = torch.zeros(3, 4, 3, requires_grad=True)
    policy_regularizer(lg, [1, 2, 3, 4], on=on, tau=1., scale=6.).backward()
    assert (lg.grad[:, :-1, SHARED] < 0).all()


def test_regularizer_matches_a_loop_reference():
    "The vectorised form equals a plain loop over tasks and layers, with shared depths and max_depth."
    torch.manual_seed(0)
    lg = torch.randn(4, 50, 3)
    depths = torch.randint(1, 41, (50,))
    got = policy_regularizer(lg, depths, scale=2., max_depth=40)
    ref = sum((40 - int(depths[l])) / 40 * (F.softplus(2 * (lg[i, l, 1] - lg[i, l, 0]))
                                            + F.softplus(2 * (lg[i, l, 2] - lg[i, l, 0])))
              for i in range(4) for l in range(50))
    assert torch.allclose(got, ref)


def test_regularizer_errors():
    lg = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match=r"on='prob' is not supported; "
                                         r"choose one of \['logits', 'softmax', 'gumbel'\]"):
        policy_regularizer(lg, DEPTHS, on='prob')
    with pytest.raises(ValueError, match='2 depths for 3 layers'):
        policy_regularizer(lg, [1, 2])
    with pytest.raises(ValueError, match=r'shape \(n_tasks, n_layers, 3\)'):
        policy_regularizer(torch.zeros(2, 3, 2), DEPTHS)
    with pytest.raises(TypeError, match='float tensor'):
        policy_regularizer(torch.zeros(2, 3, 3, dtype=torch.long), DEPTHS)


# ---------------------------------------------------------------- discrete policies
def test_sample_policy_frequencies_match_softmax():
    lg = torch.tensor(L3)
    gen = torch.Generator().manual_seed(0)
    draws = sample_policy(lg.repeat(5000, 1, 1), gen)  # 5000 copies of the 2 tasks as rows: (10000, 3)
    assert draws.dtype == torch.long and draws.shape == (10_000, 3)
    freq = F.one_hot(draws.view(5000, 2, 3), 3).float().mean(0)  # (2, 3, 3)
    assert (freq - lg.softmax(-1)).abs().max() < 0.025


def test_sample_policy_reproducible():
    lg = torch.randn(3, 36, 3)
    a = sample_policy(lg, torch.Generator().manual_seed(10))
    b = sample_policy(lg, torch.Generator().manual_seed(10))
    c = sample_policy(lg, torch.Generator().manual_seed(40))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3); d = sample_policy(lg)
    torch.manual_seed(3); e = sample_policy(lg)
    assert torch.equal(d, e)


def test_sample_policy_no_grad_and_is_a_sample_not_argmax():
    lg = torch.zeros(1, 200, 3, requires_grad=True)
    p = sample_policy(lg, torch.Generator().manual_seed(0))
    assert not p.requires_grad
    assert set(p.unique().tolist()) == {0, 1, 2}  # argmax of ties would always be 0


def test_argmax_and_onehot():
    lg = torch.tensor(L3)
    a = argmax_policy(lg)
    assert a.tolist() == [[2, 1, 0], [1, 0, 0]]
    oh = policy_to_onehot(a)
    assert oh.shape == (2, 3, 3) and oh.dtype == torch.float32
    assert torch.equal(argmax_policy(oh), a)
    assert policy_to_onehot(torch.tensor([[1]]), n_ops=2).tolist() == [[[0., 1.]]]


def test_onehot_errors():
    with pytest.raises(ValueError, match='must lie in 0..2'): policy_to_onehot(torch.tensor([[-1, 0]]))
    with pytest.raises(TypeError, match='integer tensor'): policy_to_onehot([[0, 1]])
    with pytest.raises(TypeError, match='integer tensor'): policy_to_onehot(torch.tensor([[0.]]))


# ---------------------------------------------------------------- JSON
TASKS, LAYERS = ['seg', 'normal', 'depth'], ['conv1', 'layer1.0.conv1', 'layer1.0.conv2', 'head']
POL = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1], [0, 0, 0, 2]])


def test_json_round_trip_through_a_file(tmp_path):
    d = policy_to_json(POL, TASKS, LAYERS)
    assert d['normal'] == {'conv1': 'shared', 'layer1.0.conv1': 'specific', 'layer1.0.conv2': 'specific',
                           'head': 'specific'}
    assert list(d) == TASKS and list(d['seg']) == LAYERS
    f = tmp_path / 'policy.json'
    f.write_text(json.dumps(d))
    back = policy_from_json(json.loads(f.read_text()), TASKS, LAYERS)
    assert back.dtype == torch.long and torch.equal(back, POL)
    assert torch.equal(policy_from_json(json.loads(f.read_text())), POL)


def test_json_reorders_to_requested_names_and_accepts_int_layers():
    d = policy_to_json(POL, TASKS, LAYERS)
    got = policy_from_json(d, tasks=['depth', 'seg', 'normal'], layers=LAYERS[::-1])
    assert torch.equal(got, POL[[2, 0, 1]].flip(1))
    d2 = json.loads(json.dumps(policy_to_json(POL, TASKS, range(4))))
    assert torch.equal(policy_from_json(d2, TASKS, range(4)), POL)


def test_json_accepts_lists_and_numpy():
    import numpy as np
    assert policy_to_json(np.array([[0, 2]]), ['a'], ['x', 'y']) == {'a': {'x': 'shared', 'y': 'skip'}}
    assert policy_to_json([[1]], ['a'], ['x']) == {'a': {'x': 'specific'}}


def test_json_mismatch_errors():
    d = policy_to_json(POL, TASKS, LAYERS)
    with pytest.raises(ValueError, match=r"policy tasks do not match: missing \['edge'\], unexpected \['depth'\]"):
        policy_from_json(d, tasks=['seg', 'normal', 'edge'])
    with pytest.raises(ValueError, match=r"missing \['keypoint'\], unexpected \[\]"):
        policy_from_json(d, tasks=TASKS + ['keypoint'])
    with pytest.raises(ValueError, match=r"layers of task 'seg' do not match: missing \['fc'\], unexpected \['head'\]"):
        policy_from_json(d, layers=LAYERS[:3] + ['fc'])
    bad = json.loads(json.dumps(d)); del bad['depth']['head']
    with pytest.raises(ValueError, match=r"layers of task 'depth' do not match: missing \['head'\]"):
        policy_from_json(bad)
    bad = json.loads(json.dumps(d)); bad['seg']['conv1'] = 'shard'
    with pytest.raises(ValueError, match=r"unknown policy option\(s\) 'shard'; "
                                         r"allowed: \['shared', 'specific', 'skip'\]"):
        policy_from_json(bad)
    with pytest.raises(ValueError, match='non-empty'): policy_from_json({})


def test_to_json_errors():
    with pytest.raises(ValueError, match='3 tasks and 3 layers'): policy_to_json(POL, TASKS, LAYERS[:3])
    with pytest.raises(ValueError, match='must lie in 0..2'): policy_to_json(torch.tensor([[3]]), ['a'], ['x'])
    with pytest.raises(TypeError, match='argmax_policy'): policy_to_json(torch.zeros(3, 4, 3), TASKS, LAYERS)


# ---------------------------------------------------------------- summary
def test_policy_summary():
    s = policy_summary(POL, TASKS, LAYERS).splitlines()
    assert s[0].split() == ['layer'] + TASKS
    assert s[2].split() == ['layer1.0.conv1', 'shared', 'specific', 'shared']
    assert s[-1].split() == ['shared', '50%', '25%', '75%']
    assert len(s) == len(LAYERS) + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_on_gpu():
    dev = torch.device('cuda')
    lg = torch.tensor(L3, device=dev, requires_grad=True)
    y = gumbel_softmax(lg, hard=True)
    assert y.device == lg.device and torch.equal(y.sum(-1), torch.ones(2, 3, device=dev))
    for on in ('logits', 'softmax', 'gumbel'):
        r = policy_regularizer(lg, DEPTHS, on=on)
        assert r.device == lg.device
    policy_regularizer(lg, torch.tensor(DEPTHS, device=dev)).backward()
    assert (lg.grad[:, :-1, SHARED] < 0).all()
    assert policy_regularizer(lg, DEPTHS).item() == pytest.approx(hand_reg(L3, DEPTHS), rel=1e-5)
    # the same CPU generator seed gives the same policy whatever device the logits are on
    a = sample_policy(lg, torch.Generator().manual_seed(10))
    b = sample_policy(lg.detach().cpu(), torch.Generator().manual_seed(10))
    assert a.device == lg.device and torch.equal(a.cpu(), b)
    assert argmax_policy(lg).device == lg.device
