"Deeper checks of `automtl_nb.baselines`: block detection on real backbones, AdaShare's gates, curriculum and losses by hand, MTAN and cross-stitch wiring, exact Standley search, the comparison."
import itertools, math
import pytest
import torch, torch.nn as nn
from automtl_nb.graph import GraphError
from automtl_nb.compiler import to_graph
from automtl_nb.models import deeplab_resnet34, deeplab_resnet, mobilenet_v2_backbone
from automtl_nb.learner import get_config
from automtl_nb.baselines import (residual_blocks, stage_ends, AdaShare, adashare_sharing, adashare_sparsity, MTAN, CrossStitch,
                                  group_scores, best_grouping, compare, compare_table, EXECUTE, SKIP)

TINY = get_config(n_train=40, n_val=8, image_size=(32, 32), batch_size=8, pretrain_iters=2, policy_iters=3, posttrain_iters=2, ckpt_every=100)
SMALL = deeplab_resnet((2, 1), (8, 16), (1, 2))  # two stages, three blocks: 8 channels at the output


def test_blocks_of_real_backbones():
    g = to_graph(deeplab_resnet34())
    blocks = residual_blocks(g)
    assert len(blocks) == 16 and len(stage_ends(g)) == 4
    assert [b.residual == b.input for b in blocks].count(False) == 3  # projections in layers 2, 3, 4 (layer1 keeps 64 channels)
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
    want = sum((4 - l) / 4 * abs(lg[i, l - 1, EXECUTE] - lg[j, l - 1, EXECUTE]) for i in range(3) for j in range(i + 1, 3) for l in range(1, 5))
    assert torch.allclose(adashare_sharing(lg), torch.as_tensor(want))


def test_sparsity_descent_makes_skipping_likelier():
    lg = torch.zeros(2, 3, 2, requires_grad=True)
    adashare_sparsity(lg).backward()
    with torch.no_grad(): p = (lg - lg.grad).softmax(-1)[..., SKIP]
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
    sc = group_scores(tasks, {p: {t: float(torch.randn(1, generator=g)) for t in p} for p in itertools.combinations(tasks, 2)})
    for budget in (1, 2, 3):
        brute = max(sum(max(sc[x][t] for x in S if t in x) for t in tasks) for k in range(1, budget + 1)
                    for S in itertools.combinations(sc, k) if all(any(t in x for x in S) for t in tasks))
        groups, serve, total = best_grouping(sc, tasks, budget)
        assert math.isclose(total, brute) and len(groups) <= budget
        assert math.isclose(sum(sc[serve[t]][t] for t in tasks), total) and all(t in serve[t] for t in tasks)


def test_compare_three_tasks_and_the_weighting_baselines(tmp_path):
    res = compare('single,uncertainty,dwa,standley,automtl-groups', TINY, seeds=(0,), run_dir=tmp_path)
    st = res['standley'][0]
    assert len(st['groups']) <= 2 and {t for g in st['groups'] for t in g} == set(st['metrics']) == {'seg', 'depth', 'tint'}
    assert st['wall_s'] >= res['single'][0]['wall_s']  # Standley also trained every task alone
    ck = torch.load(tmp_path / 'seed0' / 'uncertainty' / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert not torch.allclose(ck['weighting']['log_vars'], torch.full((3,), -0.5))  # Kendall's log σ² are learnt
    ck = torch.load(tmp_path / 'seed0' / 'dwa' / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert 'loss_hist' in ck['weighting']
    table = compare_table(res)
    assert table.splitlines()[0] == 'mean ± std over 1 seed(s)' and 'Δtint %' in table
    with pytest.raises(ValueError, match='at least one seed'): compare('single', TINY, seeds=(), run_dir=tmp_path)
