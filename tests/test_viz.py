"Visualisation on a tiny real search: every PNG of plot_run, the policy history, the explorer's parameters, errors."
import json, shutil
from pathlib import Path
import matplotlib; matplotlib.use('Agg')
import matplotlib.image as mpimg
import pytest, torch
from automtl_nb.learner import get_config, run_search, run_posttrain, make_datasets
from automtl_nb.compiler import policy_params
from automtl_nb.derive import load_run
from automtl_nb.cli import main
from automtl_nb.viz import plot_run, read_run, find_runs, run_log, run_model, PolicyExplorer, policy_explorer

FIXED_PLOTS = ['policy', 'sharing_tree', 'task_correlation', 'training_curves']
SEARCH_PLOTS = ['policy', 'sharing_tree', 'task_correlation', 'policy_dist', 'policy_evolution', 'convergence',
                'training_curves']

@pytest.fixture(scope='module')
def job(tmp_path_factory):
    "A main-job-like folder: a tiny AutoMTL search and an all-shared baseline on synthetic scenes."
    d = tmp_path_factory.mktemp('job')
    cfg = get_config('synthetic', tasks=('seg', 'depth'), image_size=(16, 16), n_train=40, n_val=8, batch_size=8,
                     pretrain_iters=2, policy_iters=8, posttrain_iters=2, eval_every=4, ckpt_every=100)
    ds = make_datasets(cfg)
    run_search(cfg, d / 'automtl', ds, progress=False)
    run_posttrain(cfg, 'shared', d / 'all_shared', ds, progress=False)
    return d

def _check_png(path):
    img = mpimg.imread(path)  # (H, W, channels) in [0, 1]
    assert img.shape[0] >= 250 and img.shape[1] >= 500, (path, img.shape)
    assert img.std() > 0.05, f'{path} is (nearly) blank'

def test_plot_run_on_a_search_writes_every_plot(job, tmp_path):
    paths = plot_run(job / 'automtl', tmp_path)
    assert [p.name for p in paths] == [f'{s}.png' for s in SEARCH_PLOTS]
    for p in paths: _check_png(p)

def test_plot_run_on_a_folder_of_runs(job, tmp_path):
    paths = plot_run(job, tmp_path)
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert rel == sorted(['comparison_curves.png'] + [f'automtl/{s}.png' for s in SEARCH_PLOTS] +
                         [f'all_shared/{s}.png' for s in FIXED_PLOTS])
    for p in paths: _check_png(p)

def test_policy_history_of_a_search_ends_at_its_logits(job):
    run = read_run(job / 'automtl')
    assert [r['policy_it'] for r in run.history] == [0, 1, 2, 3, 4]  # 8 iterations alternating 1 + 1; every 1
    last = torch.tensor(run.history[-1]['probs'], dtype=torch.float64)
    torch.testing.assert_close(last, run.logits.double().softmax(-1), atol=1e-6, rtol=0)
    assert run.history[0]['tau'] == 5.0

def test_run_log_has_every_stage(job):
    "metrics.json keeps every stage's evaluations, in training order, after all three stages ran in one directory."
    got = [(e['stage'], e['it']) for e in run_log(job / 'automtl')]
    assert got == [('pretrain', 2), ('policy', 4), ('policy', 8), ('posttrain', 2)]

def test_explorer_counts_the_parameters_of_the_edited_policy(job):
    ex = PolicyExplorer(find_runs(job)).select('automtl')
    res = json.loads((job / 'automtl' / 'results.json').read_text())
    assert ex.params() == res['params']
    sm, layer = run_model(ex.run), ex.run.layers[0]
    ex.toggle('depth', layer, 'specific').toggle('seg', layer, 'specific')
    assert ex.params() == policy_params(sm, ex.policy) and ex.policy[:, 0].tolist() == [1, 1]
    assert ex.select('all_shared').params() == json.loads((job / 'all_shared' / 'results.json').read_text())['params']
    assert 'final sampled policy' in ex.describe() and 'seg: mIoU' in ex.describe()

def test_explorer_without_a_frontend_returns_figures(job):
    figs = policy_explorer(job)
    assert [f.axes[0].get_title().split(',')[0] for f in figs] == ['all_shared', 'automtl']

def test_bad_run_directories_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match='holds no runs'): plot_run(tmp_path, tmp_path / 'out')
    with pytest.raises(FileNotFoundError, match='no directory'): plot_run(tmp_path / 'missing', tmp_path / 'out')
    (tmp_path / 'r').mkdir(); (tmp_path / 'r' / 'policy.json').write_text('{"a": {"l0": "shared"}}')
    with pytest.raises(FileNotFoundError, match='is not a run directory: it has no config.json'):
        plot_run(tmp_path / 'r', tmp_path / 'out')

def _files(d): return {f: f.read_bytes() for f in d.rglob('*') if f.is_file()}

def test_plot_draws_what_derive_builds_and_refuses_an_edited_policy_json(job, tmp_path):
    "The run's policy is the post-train checkpoint's; a hand-edited policy.json is refused by name and left as it is."
    d = tmp_path / 'automtl'
    shutil.copytree(job / 'automtl', d)
    assert torch.equal(read_run(d).policy, load_run(d)[3].policy)
    pol = json.loads((d / 'policy.json').read_text())
    pol['bogus'] = pol.pop('seg')
    (d / 'policy.json').write_text(json.dumps(pol))
    before = _files(d)
    with pytest.raises(ValueError, match=r"automtl/policy.json disagrees with .*automtl/checkpoints/posttrain.pt "
                                         r"\(its tasks \['depth', 'bogus'\] are not the run's \['seg', 'depth'\]\)"):
        plot_run(d, tmp_path / 'out')
    with pytest.raises(SystemExit, match='automtl plot: error: .*policy.json disagrees'): main(['plot', str(d)])
    with pytest.raises(ValueError, match='policy.json disagrees'): plot_run(tmp_path, tmp_path / 'out')  # a job folder
    assert _files(d) == before and not (tmp_path / 'out').exists()

def test_a_changed_option_in_policy_json_is_refused(job, tmp_path):
    d = tmp_path / 'automtl'
    shutil.copytree(job / 'automtl', d)
    pol = json.loads((d / 'policy.json').read_text())
    layer = next(iter(pol['depth']))
    was = pol['depth'][layer]
    pol['depth'][layer] = 'skip' if was != 'skip' else 'shared'
    (d / 'policy.json').write_text(json.dumps(pol))
    now = pol['depth'][layer]
    with pytest.raises(ValueError, match=f"task 'depth' at layer '{layer}' is '{now}' there, '{was}' in the model"):
        read_run(d)

@pytest.mark.parametrize('name,cut', [('checkpoints/posttrain.pt', b''), ('policy_history.json', b'[{"it": 0, '),
                                      ('metrics.json', b'')])
def test_a_broken_file_is_named_and_nothing_is_drawn(job, tmp_path, name, cut):
    d = tmp_path / 'automtl'
    shutil.copytree(job / 'automtl', d)
    (d / name).write_bytes(cut)
    before = _files(d)
    msg = 'cannot be read as a checkpoint' if name.endswith('.pt') else 'is empty' if not cut else 'is not valid JSON'
    with pytest.raises(SystemExit, match=f'automtl plot: error: {d / name} {msg}'): main(['plot', str(d)])
    assert _files(d) == before and not (d / 'plots').exists()
