"The `automtl` command: compile, the main job in a tiny configuration, stage-by-stage training, evaluation, errors."
import json, subprocess, sys
import pytest, torch
from automtl_nb.cli import main

TINY = ['--set', 'n_train=40', '--set', 'n_val=16', '--set', 'image_size=32,32', '--set', 'batch_size=8', '--set', 'pretrain_iters=3',
        '--set', 'policy_iters=4', '--set', 'posttrain_iters=3', '--set', 'tasks=seg,depth', '--set', 'ckpt_every=2']

def _run(args, capsys):
    main(args); return capsys.readouterr().out

def test_compile_reports_vcns_params_and_search_space(capsys):
    out = _run(['compile', 'deeplab_resnet34', '--tasks', 'seg,depth,normal', '--input', '3x64x64'], capsys)
    assert 'VCNs (L)            36' in out and '3^(N*L) = 3^108' in out and 'backbone params     21,284,672' in out

def test_compile_errors_are_reported_without_traceback(capsys):
    with pytest.raises(SystemExit, match='automtl compile: error: no prototxt file at nope.prototxt'): main(['compile', 'nope.prototxt', '--tasks', 'a'])

def test_main_job_tiny_is_deterministic(tmp_path, capsys):
    out = _run(['run', '--run-dir', str(tmp_path / 'a'), *TINY], capsys)
    for method in ('single-task', 'all-shared', 'random policy', 'AutoMTL w/o Lreg', 'AutoMTL'): assert method in out
    assert 'Δt %' in out
    res = json.loads((tmp_path / 'a' / 'results.json').read_text())
    assert res['single-task']['delta']['all'] == 0
    for f in ('config.json', 'metrics.json', 'metrics.csv', 'policy.json', 'checkpoints/pretrain.pt', 'checkpoints/policy.pt', 'checkpoints/posttrain.pt'):
        assert (tmp_path / 'a' / 'automtl' / f).exists(), f
    _run(['run', '--run-dir', str(tmp_path / 'b'), *TINY], capsys)
    assert json.loads((tmp_path / 'b' / 'results.json').read_text()) == res  # same seed, same numbers

def test_train_stages_one_by_one_then_eval(tmp_path, capsys):
    d = str(tmp_path / 'r')
    with pytest.raises(SystemExit, match="stage 'pretrain' has not finished"): main(['train', '--stage', 'policy', '--run-dir', d, *TINY])
    for s in ('pre', 'policy', 'post'): _run(['train', '--stage', s, '--run-dir', d, *TINY], capsys)
    out = _run(['eval', d], capsys)
    assert set(json.loads(out)) == {'seg', 'depth'}
    out = _run(['derive', d], capsys)
    assert 'single-task (sum)' in out and 'max |derived - supermodel|' in out
    assert sorted(p.name for p in (tmp_path / 'r' / 'derived').iterdir()) == ['derived.pt', 'policy.json']
    assert 'model.torchscript.pt' in _run(['export', d, '--format', 'torchscript', '--input', '3x32x32'], capsys)
    assert torch.jit.load(str(tmp_path / 'r' / 'derived' / 'model.torchscript.pt'))(torch.zeros(1, 3, 32, 32)).keys() == {'seg', 'depth'}

def test_derive_and_export_name_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match='config.json not found'): main(['derive', str(tmp_path)])
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(SystemExit, match='posttrain.pt not found: this run has no post-trained model yet'): main(['export', str(tmp_path)])

def test_console_script_is_installed():
    r = subprocess.run(['automtl', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'compile' in r.stdout and 'run' in r.stdout
