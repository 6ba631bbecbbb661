("Deeper checks of `automtl_nb.baselines`: block detection on real backbones, AdaShare's gates, curriculum and losses "
 "by hand, MTAN and cross-stitch wiring, exact Standley search, the comparison.")
import itertools, math
import pytest
import torch, torch.nn as nn
from automtl_nb.graph import GraphError
from automtl_nb.compiler import to_graph
from automtl_nb.models import deeplab_resnet34, deeplab_resnet, mobilenet_v2_backbone
import json
from automtl_nb.learner import get_config, Learner, Callback, make_datasets, make_tasks, make_weighting
from automtl_nb.data import make_cityscapes_fixture
from automtl_nb.baselines import (residual_blocks, stage_ends, AdaShare, adashare_sharing, adashare_sparsity, MTAN,
                                  CrossStitch, group_scores, best_grouping, compare, compare_table, BLOCK_EXECUTE,
                                  BLOCK_SKIP, ADASHARE_RECIPES, adashare_recipe, adashare_schedule,
                                  adashare_stage_iters, adashare_setup, make_adashare, run_adashare, make_mtan,
                                  make_cross_stitch)

TINY = get_config(n_train=40, n_val=8, image_size=(32, 32), batch_size=8, pretrain_iters=2, policy_iters=3,
                  posttrain_iters=2, ckpt_every=100)
SMALL = deeplab_resnet((2, 1), (8, 16), (1, 2))  # two stages, three blocks: 8 channels at the output


def test_blocks_of_real_backbones():
    g = to_graph(deeplab_resnet34())
    blocks = residual_blocks(g)
    assert len(blocks) == 16 and len(stage_ends(g)) == 4
    # projections in layers 2, 3, 4 (layer1 keeps 64 channels)
    assert [b.residual == b.input for b in blocks].count(False) == 3
    assert residual_blocks(mobilenet_v2_backbone()) == []  # inverted residuals have no ReLU after the sum
    with pytest.raises(GraphError, match='residual blocks'): AdaShare(to_graph(mobilenet_v2_backbone()), ['a'])


def _ada(tasks='abc'):
    torch.manual_seed(0)
    return AdaShare(to_graph(SMALL), list(tasks), {t: nn.Conv2d(16, 1, 1) for t in tasks})


def test_gated_mode_samples_in_training_and_takes_the_argmax_in_eval():
    m = _ada().set_mode('gated', tau=1.)
    with torch.no_grad(): m.logits.copy_(torch.randn(3, 3, 2))
    g1, g2 = m.block_gates(), m.block_gates()
    assert not torch.equal(g1, g2) and torch.allclose(g1.sum(-1), torch.ones(3, 3))
    m.eval(); assert torch.equal(m.block_gates(), nn.functional.one_hot(m.logits.argmax(-1), 2).float())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(m(x)['a'], m(x)['a'])


def test_curriculum_keeps_early_blocks_executed_and_out_of_the_gradient():
    m = _ada().set_mode('gated', tau=1.); m.n_free = 1
    g = m.block_gates()
    assert torch.equal(g[:, :2], torch.tensor([1., 0.]).expand(3, 2, 2))
    sum(o.sum() for o in m(torch.randn(2, 3, 16, 16)).values()).backward()
    assert torch.equal(m.logits.grad[:, :2], torch.zeros(3, 2, 2)) and m.logits.grad[:, 2].abs().sum() > 0


def test_sharing_loss_by_loops():
    lg = torch.randn(3, 4, 2)
    want = sum((4 - l) / 4 * abs(lg[i, l - 1, BLOCK_EXECUTE] - lg[j, l - 1, BLOCK_EXECUTE])
               for i in range(3) for j in range(i + 1, 3) for l in range(1, 5))
    assert torch.allclose(adashare_sharing(lg), torch.as_tensor(want))


def test_sparsity_descent_makes_skipping_likelier():
    lg = torch.zeros(2, 3, 2, requires_grad=True)
    adashare_sparsity(lg).backward()
    with torch.no_grad(): p = (lg - lg.grad).softmax(-1)[..., BLOCK_SKIP]
    assert (p > 0.5).all()


def test_mtan_attends_each_task_separately_and_trains_every_attention():
    m = MTAN(SMALL, ['a', 'b'], {t: nn.Conv2d(16, 2, 1) for t in 'ab'})
    assert [o for _, o in m.points] == [b.output for b in stage_ends(SMALL)] and len(m.att) == 2
    out = m(torch.randn(2, 3, 16, 16))
    assert out['a'].shape == (2, 2, 3, 3)
    out['a'].sum().backward()
    w = m.att[1].c2.weight.grad.view(2, -1)
    assert w[0].abs().sum() > 0 and w[1].abs().sum() == 0  # task b's attention does not touch task a's output


def test_cross_stitch_units_start_as_convex_mixtures():
    m = CrossStitch(to_graph(SMALL), ['a', 'b', 'c'])
    assert m.stitch.shape == (2, 3, 3) and torch.allclose(m.stitch.sum(-1), torch.ones(2, 3))
    assert torch.allclose(m.stitch[0].diagonal(), torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="only mode is 'fixed'"): m.set_mode('warmup')


def test_grouping_search_is_exact():
    g = torch.Generator().manual_seed(1); tasks = 'abcdef'
    sc = group_scores(tasks, {p: {t: float(torch.randn(1, generator=g)) for t in p}
                              for p in itertools.combinations(tasks, 2)})
    for budget in (1, 2, 3):
        brute = max(sum(max(sc[x][t] for x in S if t in x) for t in tasks) for k in range(1, budget + 1)
                    for S in itertools.combinations(sc, k) if all(any(t in x for x in S) for t in tasks))
        groups, serve, total = best_grouping(sc, tasks, budget)
        assert math.isclose(total, brute) and len(groups) <= budget
        assert math.isclose(sum(sc[serve[t]][t] for t in tasks), total) and all(t in serve[t] for t in tasks)


def test_compare_three_tasks_and_the_weighting_baselines(tmp_path):
    res = compare('single,uncertainty,dwa,standley,automtl-groups', TINY, seeds=(0,), run_dir=tmp_path)
    st = res['standley'][0]
    assert (len(st['groups']) <= 2
            and {t for g in st['groups'] for t in g} == set(st['metrics']) == {'seg', 'depth', 'texture'})
    assert st['wall_s'] >= res['single'][0]['wall_s']  # Standley also trained every task alone
    ck = torch.load(tmp_path / 'seed0' / 'uncertainty' / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert not torch.allclose(ck['weighting']['log_vars'], torch.full((3,), -0.5))  # Kendall's log σ² are learnt
    ck = torch.load(tmp_path / 'seed0' / 'dwa' / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert 'loss_hist' in ck['weighting']
    table = compare_table(res)
    assert table.splitlines()[0] == 'mean ± std over 1 seed(s)' and 'Δtexture %' in table
    with pytest.raises(ValueError, match='at least one seed'): compare('single', TINY, seeds=(), run_dir=tmp_path)


# ================================================================ AdaShare on its own recipe
def _state(r, it, n_blocks=16):
    s = adashare_schedule(r, it, n_blocks)
    return s['stage'], s['phase'], s['p_epoch'], s['n_free']


def test_adashare_recipes_are_the_yaml_values():
    cs, ny, tk = (ADASHARE_RECIPES[k] for k in ('cityscapes', 'nyuv2', 'taskonomy'))
    lengths = [(r['warmup_iters'], r['total_iters'], r['retrain_iters']) for r in (cs, ny, tk)]
    assert lengths == [(4000, 20000, 20000)] * 2 + [(20000, 100000, 30000)]
    regs = [(r['sparsity'], r['sharing'], r['curriculum_speed']) for r in (cs, ny, tk)]
    assert regs == [(0.01, 0.1, 3), (0.001, 0.05, 3), (0.001, 0.005, 1)]
    assert [(r['lr'], r['backbone_lr']) for r in (cs, ny, tk)] == [(1e-4, 1e-3), (1e-3, 1e-3), (1e-4, 1e-4)]
    ny = adashare_recipe(get_config('nyuv2'), {'train1': range(32), 'train2': range(16)})
    assert ny['lambdas'] == {'seg': 1., 'normal': 20., 'depth': 3.}


def test_nyuv2_schedule_by_hand():
    "NYUv2 with train1 636 and train2 159 images: phases of 39 and 9 batches, a cycle of 48 iterations."
    r = adashare_recipe(get_config('nyuv2'), {'train1': range(636), 'train2': range(159)})
    assert (r['weight_phase'], r['policy_phase']) == (39, 9)
    assert _state(r, 1) == ('pretrain', 'weights', 0, 0) and _state(r, 3999)[0] == 'pretrain'
    assert [_state(r, it) for it in (4000, 4038, 4039, 4047, 4048)] == [
        ('policy', 'weights', 0, 1), ('policy', 'weights', 0, 1), ('policy', 'policy', 0, 1),
        ('policy', 'policy', 0, 1), ('policy', 'weights', 1, 1)]
    assert [_state(r, it)[3] for it in (4000 + 3 * 48 - 1, 4000 + 3 * 48,
                                        4000 + 45 * 48 - 1, 4000 + 45 * 48)] == [1, 2, 15, 16]
    assert _state(r, 20000) == ('policy', 'weights', 333, 16)  # 16,000 = 333 · 48 + 16
    assert math.isclose(adashare_schedule(r, 20000)['tau'], 5 * 0.965 ** 333)
    with pytest.raises(ValueError, match=r"iteration 20001 is outside AdaShare's 1..20000"): adashare_schedule(r, 20001)


def test_taskonomy_schedule_by_hand():
    r = adashare_recipe(get_config('taskonomy'))
    assert adashare_stage_iters(r) == {'pretrain': 19999, 'policy': 80001, 'posttrain': 30000}
    assert [_state(r, it) for it in (19999, 20000, 20399, 20400, 20499, 20500)] == [
        ('pretrain', 'weights', 0, 0), ('policy', 'weights', 0, 1), ('policy', 'weights', 0, 1),
        ('policy', 'policy', 0, 1), ('policy', 'policy', 0, 1), ('policy', 'weights', 1, 2)]
    # speed 1: a block per phase
    assert _state(r, 20000 + 15 * 500 - 1)[3] == 15 and _state(r, 20000 + 15 * 500)[3] == 16
    assert _state(r, 100000) == ('policy', 'weights', 160, 16)


def test_the_learner_follows_the_schedule():
    "Phase, free blocks and τ that the policy-stage callbacks set at every iteration equal `adashare_schedule`."
    cfg = get_config(n_train=24, n_val=4, image_size=(16, 16), batch_size=4, tasks=('seg', 'depth'))
    ds = make_datasets(cfg); tasks = make_tasks(cfg, ds['train'])
    r = adashare_recipe(cfg, ds, warmup_iters=5, total_iters=40, weight_phase=2, policy_phase=3, curriculum_speed=2)
    m, wt = make_adashare(cfg, tasks), make_weighting(cfg, tasks)
    seen = []
    class Rec(Callback):
        order = 10
        def before_batch(self): seen.append((self.learn.phase, m.n_free, round(float(m.tau), 12)))
    data, opts, scheds, cbs = adashare_setup(r)('policy', cfg, m, wt, ds)
    assert isinstance(opts['weights'], torch.optim.Adam)  # the synthetic config keeps its own optimizer ...
    sgd = adashare_setup({**r, 'net_optimizer': 'sgd'})('policy', cfg, m, wt, ds)[1]['weights']
    assert isinstance(sgd, torch.optim.SGD)  # ... the recipes use SGD
    Learner(m, tasks, wt, data, opts, scheds, cbs + [Rec()]).fit(12)
    want = [adashare_schedule(r, 5 + j, len(m.blocks)) for j in range(12)]
    assert seen == [(w['phase'], w['n_free'], round(w['tau'], 12)) for w in want]
    assert [p for p, _, _ in seen] == (['weights'] * 2 + ['policy'] * 3 + ['weights'] * 2 + ['policy'] * 3
                                       + ['weights'] * 2)
    assert [n for _, n, _ in seen] == [1] * 10 + [2] * 2  # 2 phases done at iteration 10, speed 2


def test_run_adashare_on_a_cityscapes_fixture_uses_the_recipe(tmp_path):
    root = make_cityscapes_fixture(tmp_path / 'cs', n=10, size=(16, 32))
    cfg = get_config('cityscapes', data_root=str(root), backbone='deeplab_resnet_small', head='dense', batch_size=2,
                     device='cpu', num_workers=0, eval_every=0, ckpt_every=100, data_options={'crop': (16, 16)})
    r = run_adashare(cfg, tmp_path / 'run', progress=False, warmup_iters=3, total_iters=7, retrain_iters=2)
    # train1 8 images, train2 2: epochs of 4 and 1 batches
    assert (r['recipe']['weight_phase'], r['recipe']['policy_phase']) == (4, 1)
    assert r['recipe']['lambdas'] == {'seg': 1., 'depth': 20.} and r['recipe']['sharing'] == 0.1
    ck = lambda s: torch.load(tmp_path / 'run' / 'checkpoints' / f'{s}.pt', weights_only=False)
    its = {s: ck(s)['it'] for s in ('pretrain', 'policy', 'posttrain')}
    assert its == {'pretrain': 2, 'policy': 5, 'posttrain': 2} == adashare_stage_iters(r['recipe'])
    assert json.loads((tmp_path / 'run' / 'adashare_recipe.json').read_text())['weight_phase'] == 4
    assert torch.tensor(r['policy']).shape == (2, 4) and set(r['metrics']) == {'seg', 'depth'}


def test_baselines_average_gradients_under_torchrun(tmp_path):
    "AdaShare's policy stage, MTAN and cross-stitch in 2 gloo processes: different batches, identical parameters after."
    import os, subprocess, sys
    from pathlib import Path
    here = Path(__file__).parent
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    str(here / 'baselines_ddp.py'), str(tmp_path)], check=True, env=env)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    init = {'adashare': make_adashare, 'mtan': make_mtan, 'cross_stitch': make_cross_stitch}
    cfg = get_config(tasks=('seg', 'depth'), n_train=24, n_val=4, image_size=(16, 16))
    tasks = make_tasks(cfg, make_datasets(cfg)['train'])
    for name, build in init.items():
        a, b = r0[name]['synced'], r1[name]['synced']
        # each its own half-batch
        assert len(a['seen']) >= 3 and all(x != y for x, y in zip(a['seen'], b['seen'])), name
        assert a['params'].keys() == b['params'].keys()
        for k in a['params']: torch.testing.assert_close(a['params'][k], b['params'][k], rtol=1e-6, atol=1e-7)
        torch.manual_seed(0)  # as train() seeded it
        start = dict(build(cfg, tasks).named_parameters())
        assert any(not torch.equal(a['params'][k], start[k].detach()) for k in start), name  # it did train
        if name == 'adashare': assert not torch.equal(a['params']['logits'], start['logits'].detach())  # the policy too
        u0, u1 = r0[name]['unsynced']['params'], r1[name]['unsynced']['params']
        # the control: without averaging they drift apart
        assert any(not torch.allclose(u0[k], u1[k]) for k in u0), name
