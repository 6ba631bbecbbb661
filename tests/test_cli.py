"The `automtl` command: compile, the main job in a tiny configuration, stage-by-stage training, evaluation, errors."
import json, subprocess, sys
import pytest, torch
from automtl_nb.cli import main

TINY = ['--set', 'n_train=40', '--set', 'n_val=16', '--set', 'image_size=32,32', '--set', 'batch_size=8',
        '--set', 'pretrain_iters=3', '--set', 'policy_iters=4', '--set', 'posttrain_iters=3',
        '--set', 'tasks=seg,depth', '--set', 'ckpt_every=2']

def _run(args, capsys):
    main(args); return capsys.readouterr().out

def test_compile_reports_vcns_params_and_search_space(capsys):
    out = _run(['compile', 'deeplab_resnet34', '--tasks', 'seg,depth,normal', '--input', '3x64x64'], capsys)
    assert 'VCNs (L)            36' in out and '3^(N*L) = 3^108' in out and 'backbone params     21,284,672' in out

def test_compile_errors_are_reported_without_traceback(capsys):
    with pytest.raises(SystemExit, match='automtl compile: error: no prototxt file at nope.prototxt'):
        main(['compile', 'nope.prototxt', '--tasks', 'a'])

def test_main_job_tiny_is_deterministic(tmp_path, capsys):
    out = _run(['run', '--run-dir', str(tmp_path / 'a'), *TINY], capsys)
    for method in ('single-task', 'all-shared', 'random policy', 'AutoMTL w/o Lreg', 'AutoMTL'): assert method in out
    assert 'Δt %' in out
    res = json.loads((tmp_path / 'a' / 'results.json').read_text())
    assert res['single-task']['delta']['all'] == 0
    for f in ('config.json', 'metrics.json', 'metrics.csv', 'policy.json', 'checkpoints/pretrain.pt',
              'checkpoints/policy.pt', 'checkpoints/posttrain.pt'):
        assert (tmp_path / 'a' / 'automtl' / f).exists(), f
    _run(['run', '--run-dir', str(tmp_path / 'b'), *TINY], capsys)
    assert json.loads((tmp_path / 'b' / 'results.json').read_text()) == res  # same seed, same numbers

def test_train_stages_one_by_one_then_eval(tmp_path, capsys):
    d = str(tmp_path / 'r')
    with pytest.raises(SystemExit, match="stage 'pretrain' has not finished"):
        main(['train', '--stage', 'policy', '--run-dir', d, *TINY])
    for s in ('pre', 'policy', 'post'): _run(['train', '--stage', s, '--run-dir', d, *TINY], capsys)
    out = _run(['eval', d], capsys)
    assert set(json.loads(out)) == {'seg', 'depth'}
    out = _run(['derive', d], capsys)
    assert 'single-task (sum)' in out and 'max |derived - supermodel|' in out
    assert sorted(p.name for p in (tmp_path / 'r' / 'derived').iterdir()) == ['derived.pt', 'policy.json']
    assert 'model.torchscript.pt' in _run(['export', d, '--format', 'torchscript', '--input', '3x32x32'], capsys)
    assert (torch.jit.load(str(tmp_path / 'r' / 'derived' / 'model.torchscript.pt'))(torch.zeros(1, 3, 32, 32)).keys()
            == {'seg', 'depth'})

def test_derive_and_export_name_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match='config.json not found'): main(['derive', str(tmp_path)])
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(SystemExit, match='posttrain.pt not found: this run has no post-trained model yet'):
        main(['export', str(tmp_path)])

def test_console_script_is_installed():
    r = subprocess.run(['automtl', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'compile' in r.stdout and 'run' in r.stdout

# --- issue 17: a run directory never lies (each case: the message names the thing, nothing in the run dir changes)
import contextlib, os, shutil, socket
from pathlib import Path
from automtl_nb.rundir import RunDirError

ROOT = Path(__file__).parent.parent

def _refused(args):
    "The one line `automtl` exits with when it refuses `args`."
    with pytest.raises(SystemExit) as e: main(args)
    msg = str(e.value.code)
    assert msg.startswith(f'automtl {args[0]}: error: ') and '\n' not in msg, msg
    return msg

def snapshot(d):
    "Every file under `d` with its bytes and modification time."
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(d).rglob('*')) if p.is_file()}

@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "A finished tiny run made stage by stage with `automtl train`."
    d = tmp_path_factory.mktemp('finished') / 'r'
    for s in ('pre', 'policy', 'post'): main(['train', '--stage', s, '--run-dir', str(d), *TINY])
    return d

@pytest.fixture
def run(finished, tmp_path):
    "A copy of the finished run to try things on."
    shutil.copytree(finished, tmp_path / 'r')
    return tmp_path / 'r'

def _train(stage, d, *extra): return ['train', '--stage', stage, '--run-dir', str(d), *TINY, *extra]

def test_case1_main_job_rerun_with_other_settings_is_refused(tmp_path, capsys):
    d = tmp_path / 'm'
    main(['run', '--run-dir', str(d), *TINY])
    before = snapshot(d)
    msg = _refused(['run', '--run-dir', str(d), *TINY, '--set', 'lambda_reg=0.5', '--set', 'lr=0.01'])
    assert f'{d}/job.json was made with another config: lr 0.001 -> 0.01, lambda_reg 0.01 -> 0.5.' in msg
    assert 'Either use a new run directory, or pass --no-resume' in msg
    assert 'tasks ["seg", "depth"] -> ["seg", "normal"]' in _refused(['run', '--run-dir', str(d), *TINY,
                                                                      '--set', 'tasks=seg,normal'])
    assert snapshot(d) == before

def test_case2_resume_with_other_lr_batch_or_length_is_refused_until_restarted(run, capsys):
    before = snapshot(run)
    assert 'lr 0.001 -> 0.01' in _refused(_train('pre', run, '--set', 'lr=0.01'))
    assert 'batch_size 8 -> 4' in _refused(_train('policy', run, '--set', 'batch_size=4'))
    msg = _refused(_train('post', run, '--set', 'posttrain_iters=5'))
    assert 'posttrain_iters 3 -> 5' in msg and "start it afresh: `automtl train --stage posttrain --restart`" in msg
    assert snapshot(run) == before
    main(_train('post', run, '--set', 'posttrain_iters=5', '--restart'))
    ck = torch.load(run / 'checkpoints' / 'posttrain.pt', weights_only=True)
    assert ck['done'] and ck['it'] == ck['n_iters'] == 5 and ck['config']['posttrain_iters'] == 5

@contextlib.contextmanager
def _held_by_another_process(run):
    "A live process holding `run`'s lock while the block runs (yielded; killed afterwards)."
    holder = ("import sys, time; from automtl_nb.rundir import run_lock; cm = run_lock(sys.argv[1]); cm.__enter__(); "
              "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, '-c', holder, str(run)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': str(ROOT)})
    try:
        assert p.stdout.readline().strip() == 'held'
        yield p
    finally:
        p.kill()
        p.wait()

def test_case3_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(run, capsys):
    with _held_by_another_process(run) as p:
        before = snapshot(run)
        msg = _refused(_train('post', run))
        assert f'{run} is in use by process {p.pid} {socket.gethostname()} (lock file {run}/.lock)' in msg
        assert snapshot(run) == before
    with pytest.warns(UserWarning, match=f'took over {run}/.lock from process {p.pid}'): main(_train('post', run))
    assert not (run / '.lock').exists()

def _unfinish(run, it=1):
    "Make the post-train checkpoint one saved mid-stage, at iteration `it`."
    f = run / 'checkpoints' / 'posttrain.pt'
    ck = torch.load(f, weights_only=True)
    ck['done'], ck['it'] = False, it
    torch.save(ck, f)

@pytest.mark.parametrize('cmd', [['eval'], ['derive'], ['export'], ['plot']])
def test_case4_an_unfinished_stage_is_refused_unless_asked(run, cmd, capsys):
    _unfinish(run)
    before = snapshot(run)
    msg = _refused([*cmd, str(run)])
    assert f"stage 'posttrain' of {run} has not finished (1/3 iterations)" in msg and '--allow-unfinished' in msg
    assert snapshot(run) == before
    if cmd == ['eval']:
        assert set(json.loads(_run(['eval', str(run), '--allow-unfinished'], capsys))) == {'seg', 'depth'}

def test_case5_nan_stops_before_saving_and_the_stage_restarts_with_a_smaller_lr(tmp_path, capsys):
    d = tmp_path / 'nan'
    msg = _refused(_train('pre', d, '--set', 'lr=1e30', '--set', 'ckpt_every=1'))
    assert "non-finite loss for task(s) seg, depth at iteration 1 of stage 'pretrain'" in msg
    assert '`automtl train --stage pretrain --restart --set lr=...`' in msg
    ck = torch.load(d / 'checkpoints' / 'pretrain.pt', weights_only=True)
    assert (ck['it'] == 1 and not ck['done']
            and all(v.isfinite().all() for v in ck['model'].values() if v.is_floating_point()))
    before = snapshot(d)
    assert 'lr 1e+30 -> 0.001' in _refused(_train('pre', d))
    assert snapshot(d) == before
    main(_train('pre', d, '--restart'))
    ck = torch.load(d / 'checkpoints' / 'pretrain.pt', weights_only=True)
    assert ck['done'] and ck['it'] == 3 and ck['config']['lr'] == 1e-3

@pytest.mark.parametrize('content', ['truncated', 'empty', 'random'])
def test_case6_a_broken_checkpoint_is_named_with_what_to_do(run, content, capsys):
    f = run / 'checkpoints' / 'pretrain.pt'
    f.write_bytes({'truncated': f.read_bytes()[:2000], 'empty': b'', 'random': os.urandom(3000)}[content])
    before = snapshot(run)
    msg = _refused(_train('policy', run))
    assert f'{f} cannot be read as a checkpoint' in msg and 'delete it to train its stage afresh' in msg
    assert snapshot(run) == before

def test_case6_a_broken_metrics_log_is_named_before_training(run, capsys):
    f = run / 'metrics.json'
    f.write_text(f.read_text()[:50])
    before = snapshot(run)
    msg = _refused(_train('post', run, '--restart'))
    assert f'{f} is not valid JSON' in msg and 'delete it' in msg
    assert snapshot(run) == before

def test_case6_files_follow_the_umask(finished):
    mask = os.umask(0); os.umask(mask)
    for f in ('checkpoints/posttrain.pt', 'config.json', 'metrics.json', 'policy.json'):
        assert (finished / f).stat().st_mode & 0o777 == 0o666 & ~mask, f

BAD = [(['batch_size=0'], 'config field batch_size must be an integer > 0, got 0'),
       (['batch_size=-1'], 'config field batch_size must be an integer > 0, got -1'),
       (['decay_every=0'], 'config field decay_every must be an integer > 0, got 0'),
       (['weight_steps=0', 'policy_steps=0'], 'config fields weight_steps and policy_steps are both 0'),
       (['tasks='], "config field tasks has task name(s) ['']"), (['tasks=a.b'], "task name(s) ['a.b']"),
       (['pretrain_iters=-5'], 'config field pretrain_iters must be an integer >= 0, got -5'),
       (['ckpt_every=-1'], 'config field ckpt_every must be an integer >= 0, got -1'),
       (['eval_every=-1'], 'config field eval_every must be an integer >= 0, got -1'),
       (['lambda_reg=-1'], 'config field lambda_reg must be a finite number >= 0, got -1.0'),
       (['lambdas=bogus:1'], "config field lambdas names task(s) ['bogus'] that are not among tasks ('seg', 'depth')"),
       (['reg_on=bogus'], "config field reg_on must be one of ('logits', 'softmax', 'gumbel'), got 'bogus'"),
       (['n_train=6'], "split 'train' (stage 'pretrain') has 6 samples, too few for a batch of config field "
                       "batch_size=8: lower batch_size (e.g. --set batch_size=6) or make n_train larger")]
if not torch.cuda.is_available():
    BAD.append((['device=cuda'], "config field device is 'cuda' but torch sees no CUDA GPU"))

@pytest.mark.parametrize('sets,msg', BAD)
def test_case7_bad_settings_are_one_line_before_anything_is_written(tmp_path, sets, msg):
    args = [x for s in sets for x in ('--set', s)]
    assert msg in _refused(_train('pre', tmp_path / 'r', *args))
    assert not (tmp_path / 'r').exists()

def test_case7_debug_shows_the_traceback(tmp_path):
    for argv in (['--debug', *_train('pre', tmp_path, '--set', 'batch_size=0')],
                 _train('pre', tmp_path, '--set', 'batch_size=0', '--debug')):
        with pytest.raises(ValueError, match='config field batch_size must be an integer > 0'): main(argv)

@pytest.fixture
def read_only(run):
    "The run directory made immutable (chattr +i works for root too), made writable again afterwards."
    if subprocess.run(['chattr', '+i', str(run)], capture_output=True).returncode:
        pytest.skip('chattr +i is not available here')
    yield run
    subprocess.run(['chattr', '-i', str(run)], check=True)

def test_case7_a_read_only_run_dir_is_one_line(read_only, capsys):
    before = snapshot(read_only)
    msg = _refused(_train('post', read_only, '--restart'))
    assert f'cannot write {read_only}/.lock' in msg and 'the run directory must be writable' in msg
    assert f'{read_only}/derived' in _refused(['derive', str(read_only)])
    assert set(json.loads(_run(['eval', str(read_only)], capsys))) == {'seg', 'depth'}  # reading needs no writing
    assert snapshot(read_only) == before

def test_case3_every_writing_command_is_refused_while_another_holds_the_dir(run, capsys):
    "`run` and `train` into a dir another process is using: refused by the lock, naming it; nothing changes."
    with _held_by_another_process(run) as p:
        before = snapshot(run)
        for args in (['run', '--run-dir', str(run), *TINY], _train('pre', run, '--restart')):
            assert f'{run} is in use by process {p.pid}' in _refused(args)
        assert snapshot(run) == before

@pytest.mark.parametrize('cmd', [['eval'], ['derive'], ['export']])
@pytest.mark.parametrize('content', ['truncated', 'empty', 'random'])
def test_case6_readers_name_a_broken_posttrain_checkpoint(run, cmd, content):
    f = run / 'checkpoints' / 'posttrain.pt'
    f.write_bytes({'truncated': f.read_bytes()[:2000], 'empty': b'', 'random': os.urandom(3000)}[content])
    before = snapshot(run)
    msg = _refused([*cmd, str(run)])
    assert f'{f} cannot be read as a checkpoint' in msg and 'delete it to train its stage afresh' in msg
    assert snapshot(run) == before

@pytest.mark.parametrize('cmd', [['eval'], ['derive'], ['export'], ['plot']])
def test_case6_readers_name_a_broken_config(run, cmd):
    f = run / 'config.json'
    f.write_text(f.read_text()[:30])
    before = snapshot(run)
    msg = _refused([*cmd, str(run)])
    assert f'{f} is not valid JSON' in msg
    assert snapshot(run) == before

@pytest.mark.parametrize('sets,msg', BAD)
def test_case7_bad_settings_leave_an_existing_run_dir_as_it_is(run, sets, msg):
    "Checked before the run dir is looked at, so a finished run gets the same one line and keeps every byte."
    before = snapshot(run)
    assert msg in _refused(_train('post', run, *[x for s in sets for x in ('--set', s)]))
    assert snapshot(run) == before

def test_case9_a_split_file_leading_out_of_data_root_is_one_line(tmp_path):
    from automtl_nb.data import make_cityscapes_fixture
    root = make_cityscapes_fixture(tmp_path / 'cs', n=2, size=(16, 32))
    d = json.loads((root / 'cityscape.json').read_text())
    d['train'][1][0] = '../../etc/passwd'
    (root / 'cityscape.json').write_text(json.dumps(d))
    msg = _refused(_train('pre', tmp_path / 'r', '--config', 'cityscapes', '--set', f'data_root={root}'))
    assert (f"{root}/cityscape.json: img of entry 1 of split 'train' is '../../etc/passwd', which is outside the "
            f"data root {root}") in msg
    assert not (tmp_path / 'r').exists()
