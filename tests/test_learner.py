"Learner: exact resume after a real kill, data parallelism, non-finite losses."
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest, torch

HERE = Path(__file__).parent
ROOT = HERE.parent  # the working tree: the subprocesses import this checkout's automtl_nb, not an installed one
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(HERE)]), 'OMP_NUM_THREADS': '1'}

def test_subprocesses_import_this_checkout():
    r = subprocess.run([sys.executable, '-c', 'import automtl_nb; print(automtl_nb.__file__)'], env=ENV,
                       capture_output=True, text=True, check=True, cwd='/')
    assert Path(r.stdout.strip()).resolve() == (ROOT / 'automtl_nb' / '__init__.py').resolve()

def _final_model(run_dir, stage='policy'):
    ck = torch.load(Path(run_dir) / 'checkpoints' / f'{stage}.pt', weights_only=True)
    assert ck['done'] and ck['stage'] == stage
    return ck['model']

def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f'{k}: {m}')

def test_resume_after_sigkill_mid_stage_matches_uninterrupted(tmp_path):
    subprocess.run([sys.executable, str(HERE / 'toy_run.py'), str(tmp_path / 'full'), '--report', '0'],
                   check=True, env=ENV)
    p = subprocess.Popen([sys.executable, str(HERE / 'toy_run.py'), str(tmp_path / 'killed')], stdout=subprocess.PIPE,
                         text=True, env=ENV)
    for line in p.stdout:  # kill during policy-train, after at least one mid-stage checkpoint
        if line.split() == ['policy', '7']: p.send_signal(signal.SIGKILL); break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    ck = torch.load(tmp_path / 'killed' / 'checkpoints' / 'policy.pt', weights_only=True)
    assert not ck['done'] and 0 < ck['it'] < 16  # really interrupted mid-stage
    subprocess.run([sys.executable, str(HERE / 'toy_run.py'), str(tmp_path / 'killed'), '--report', '0'],
                   check=True, env=ENV)
    _assert_same(_final_model(tmp_path / 'full'), _final_model(tmp_path / 'killed'), rtol=0, atol=0)
    full, killed = (json.loads((tmp_path / d / 'policy_history.json').read_text()) for d in ('full', 'killed'))
    assert [r['policy_it'] for r in full] == list(range(9))  # 16 iterations alternating 2 + 2: 8 policy iterations
    assert killed == full  # the history was checkpointed and continued, not restarted

def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    ("torchrun with 2 CPU processes (gloo) gives the weights of 1 process on the same global batch "
     "(no BN: per-process statistics).")
    subprocess.run([sys.executable, str(HERE / 'toy_run.py'), str(tmp_path / 'one'), '--bn', '0', '--policy-iters', '8',
                    '--report', '0'], check=True, env=ENV)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    str(HERE / 'toy_run.py'), str(tmp_path / 'two'), '--bn', '0', '--policy-iters', '8',
                    '--report', '0'], check=True, env=ENV)
    _assert_same(_final_model(tmp_path / 'one'), _final_model(tmp_path / 'two'), rtol=1e-4, atol=1e-5)

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import get_config, train_stage, Callback, NonFiniteLossError
    from automtl_nb.weighting import FixedWeighting
    class Poison(Callback):
        order = -20
        def after_loss(self):
            if self.learn.it == 5:
                self.learn.losses['b'] = self.learn.losses['b'] * float('inf')
                self.learn.loss = sum(self.learn.losses.values())
    cfg = get_config('synthetic', tasks=('a', 'b'), batch_size=8, pretrain_iters=10, ckpt_every=2)
    sm = toy_run.make_model(1)
    data = {'train': toy_run.ToyData(64, 0), 'val': toy_run.ToyData(16, 3)}
    tasks = [toy_run.L1Task('a'), toy_run.L1Task('b')]
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) b at iteration 5 of stage 'pretrain'"):
        train_stage('pretrain', cfg, sm, tasks, FixedWeighting({'a': 1., 'b': 1.}), data, tmp_path, progress=False,
                    cbs=[Poison()])
    ck = torch.load(tmp_path / 'checkpoints' / 'pretrain.pt', weights_only=True)
    assert ck['it'] == 4 and not ck['done']
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())

def test_dwa_epochs_are_resumed_exactly(tmp_path):
    "The DWA weighting's per-epoch loss sums are checkpointed: stopping mid-epoch and resuming changes nothing."
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import get_config, train_stage, Callback, CancelFitException
    from automtl_nb.weighting import DWA
    cfg = get_config('synthetic', tasks=('a', 'b'), batch_size=8, pretrain_iters=30, ckpt_every=1, weighting='dwa')
    data = {'train': toy_run.ToyData(64, 0), 'val': toy_run.ToyData(16, 3)}  # 8 iterations per epoch
    tasks = [toy_run.L1Task('a'), toy_run.L1Task('b')]
    def run(d, cbs=()):
        torch.manual_seed(0)
        sm, w = toy_run.make_model(1), DWA(['a', 'b'])
        return train_stage('pretrain', cfg, sm, tasks, w, data, d, progress=False, cbs=cbs), w
    class Stop(Callback):
        order = 30
        def after_batch(self):
            if self.learn.it == 21: raise CancelFitException()
    _, w_full = run(tmp_path / 'full')
    run(tmp_path / 'cut', [Stop()])
    _, w_cut = run(tmp_path / 'cut')
    assert w_full.weights() != {'a': 1., 'b': 1.}  # DWA did adapt
    assert w_full.weights() == w_cut.weights()
    _assert_same(_final_model(tmp_path / 'full', 'pretrain'), _final_model(tmp_path / 'cut', 'pretrain'),
                 rtol=0, atol=0)

def _toy_stage(run_dir, stage='pretrain', **cfg_kw):
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import get_config, train_stage
    from automtl_nb.weighting import FixedWeighting
    cfg = get_config('synthetic', tasks=('a', 'b'), batch_size=8, pretrain_iters=12, ckpt_every=4, **cfg_kw)
    torch.manual_seed(0)
    sm = toy_run.make_model(1)
    data = {'train': toy_run.ToyData(64, 0), 'val': toy_run.ToyData(16, 3)}
    return train_stage(stage, cfg, sm, [toy_run.L1Task('a'), toy_run.L1Task('b')], FixedWeighting({'a': 1., 'b': 1.}),
                       data, run_dir, progress=False)

def test_bf16_training_keeps_fp32_state_and_tracks_fp32(tmp_path):
    "Mixed precision: same run as fp32 up to bf16 rounding; checkpointed weights and Adam state stay fp32."
    fp32, bf16 = _toy_stage(tmp_path / 'fp32'), _toy_stage(tmp_path / 'bf16', precision='bf16')
    ck = torch.load(tmp_path / 'bf16' / 'checkpoints' / 'pretrain.pt', weights_only=True)
    assert {v.dtype for v in ck['model'].values() if v.is_floating_point()} == {torch.float32}
    assert {s['exp_avg'].dtype for s in bf16.opts['weights'].state.values()} == {torch.float32}
    a, b = fp32.log[-1]['metrics'], bf16.log[-1]['metrics']
    for t in a: assert abs(a[t]['l1'] - b[t]['l1']) < 0.05 * a[t]['l1'], (t, a[t], b[t])
    # bf16 did run
    assert fp32.model.state_dict()['vcns.conv1.op.weight'].ne(bf16.model.state_dict()['vcns.conv1.op.weight']).any()

def test_unknown_precision_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        _toy_stage(tmp_path, precision='fp16')
    assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.json').exists()

def _faithful_stage(run_dir, stage, cbs=(), **cfg_kw):
    "One toy-run stage in fidelity='original' (per-task steps, SGD in policy-train, Gumbel regularizer, lr drop)."
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import get_config, train_stage
    from automtl_nb.weighting import FixedWeighting
    cfg = get_config('synthetic', fidelity='original', tasks=('a', 'b'), batch_size=8, pretrain_iters=8,
                     policy_iters=12, posttrain_iters=8, ckpt_every=2, weight_steps=2, policy_steps=2, tau_every=2,
                     lambda_reg=1e-2, lr=1e-2, policy_lr=0.1, policy_lr_drop_at=7,
                     lr_decay_stages=('pretrain', 'policy', 'posttrain'), decay_every=3, **cfg_kw)
    torch.manual_seed(0)
    sm = toy_run.make_model(1)
    if stage == 'posttrain': sm.set_policy(torch.tensor([[0, 1, 2], [2, 0, 1]]))
    data = {'train': toy_run.ToyData(20, 0), 'train1': toy_run.ToyData(20, 1), 'train2': toy_run.ToyData(12, 2),
            'val': toy_run.ToyData(8, 3)}
    w = FixedWeighting({'a': 1., 'b': 0.5})
    return train_stage(stage, cfg, sm, [toy_run.L1Task('a'), toy_run.L1Task('b')], w, data, run_dir, progress=False,
                       cbs=cbs)

@pytest.mark.parametrize('stage', ['pretrain', 'policy', 'posttrain'])
def test_per_task_stage_resumes_exactly(tmp_path, stage):
    ("Stopped mid-stage (mid-epoch of the per-task loaders, after the policy lr drop) and resumed: "
     "the same weights, bit for bit.")
    from automtl_nb.learner import Callback, CancelFitException, TaskRowsOptimizer, TaskStreams
    class Stop(Callback):
        order = 30
        def after_batch(self):
            if self.learn.it == 9 if stage == 'policy' else self.learn.it == 5: raise CancelFitException()
    full = _faithful_stage(tmp_path / 'full', stage)
    assert isinstance(full.opts['weights'], TaskRowsOptimizer) and isinstance(full.data['weights'], TaskStreams)
    if stage == 'policy':
        assert type(full.opts['weights'].opt) is torch.optim.SGD and full.opts['policy'].param_groups[0]['lr'] == 1e-3
    cut = _faithful_stage(tmp_path / 'cut', stage, cbs=[Stop()])
    assert cut.it in (5, 9)
    _faithful_stage(tmp_path / 'cut', stage)
    _assert_same(_final_model(tmp_path / 'full', stage), _final_model(tmp_path / 'cut', stage), rtol=0, atol=0)

def test_per_task_posttrain_leaves_unchosen_options_alone(tmp_path):
    "Under a fixed policy, an option no task chose keeps its initial weights; a task's copy it did not choose too."
    sys.path.insert(0, str(HERE))
    import toy_run
    torch.manual_seed(0)
    init = toy_run.make_model(1).state_dict()
    learn = _faithful_stage(tmp_path, 'posttrain')
    sd, names = learn.model.state_dict(), list(learn.model.vcns)
    # policy [[0, 1, 2], [2, 0, 1]]: VCN 0 is shared by a, skipped by b; b never uses VCN 0's own copy
    k = names[0]
    assert not torch.equal(sd[f'vcns.{k}.op.weight'], init[f'vcns.{k}.op.weight'])
    spec = sd[f'vcns.{k}.specific_op.weight']
    # nobody chose 'specific' at VCN 0
    torch.testing.assert_close(spec, init[f'vcns.{k}.specific_op.weight'], rtol=0, atol=0)

def test_per_task_is_refused_with_a_learned_weighting(tmp_path):
    with pytest.raises(ValueError, match=r"update='per_task' weighs each task's loss by a fixed λ; "
                                         r"weighting='dwa' needs update='joint'"):
        _faithful_stage(tmp_path, 'pretrain', weighting='dwa')

@pytest.mark.skipif(not os.environ.get('AUTOMTL_ORIGINAL'),
                    reason='AUTOMTL_ORIGINAL does not point to the original AutoMTL tree (the oracle)')
def test_training_equals_the_original_trainer():
    ("bench/parity_train.py on the BN-free backbone, in float64: every loss and parameter equal to the original's "
     "(≤ 1e-9 relative).")
    sys.path.insert(0, str(HERE.parent / 'bench'))
    from parity_train import train_checks
    # iteration 3: loaders run out
    res = train_checks(os.environ['AUTOMTL_ORIGINAL'], 'tiny', iters=3, hw=(32, 64), n_batches=2)
    assert len(res) == 13 and all(ok for _, _, ok in res), [r for r in res if not r[2]]

# --- issue 18, "Tests that bite": what the search hands to post-train, what each phase moves, which split each reads,
# and that evaluating leaves training alone.

def _tiny_backbone(d, n=3):
    "A prototxt backbone of `n` conv-BN-ReLU blocks (4 channels, 3×8×8 input): a whole `run_search` takes a second."
    lines = ['name: "tiny"', 'input: "data"', *(f'input_dim: {k}' for k in (1, 3, 8, 8))]
    x = 'data'
    for i in range(1, n + 1):
        conv = 'convolution_param { num_output: 4 bias_term: false pad: 1 kernel_size: 3 }'
        lines += [f'layer {{ name: "conv{i}" type: "Convolution" bottom: "{x}" top: "conv{i}" {conv} }}',
                  f'layer {{ name: "bn{i}" type: "BatchNorm" bottom: "conv{i}" top: "bn{i}" }}',
                  f'layer {{ name: "relu{i}" type: "ReLU" bottom: "bn{i}" top: "relu{i}" }}']
        x = f'relu{i}'
    (f := Path(d) / 'tiny.prototxt').write_text('\n'.join(lines) + '\n')
    return f

def _toy_sets(train1=16, train2=12):
    sys.path.insert(0, str(HERE))
    import toy_run
    return {'train': toy_run.ToyData(16, 0), 'train1': toy_run.ToyData(train1, 1), 'train2': toy_run.ToyData(train2, 2),
            'val': toy_run.ToyData(8, 3)}

def test_search_posttrains_the_seeded_sample_of_the_final_logits_from_fresh_weights(tmp_path):
    ("run_search post-trains sample_policy(final logits, Generator().manual_seed(seed)), "
     "from weights seeded with seed + 1.")
    from automtl_nb.learner import get_config, run_search, make_model, make_tasks
    from automtl_nb.policy import sample_policy, argmax_policy, policy_to_json
    ds, run = _toy_sets(), tmp_path / 'run'
    cfg = get_config('synthetic', tasks=('a', 'b'), backbone=str(_tiny_backbone(tmp_path)), batch_size=8, seed=3,
                     pretrain_iters=2, policy_iters=8, posttrain_iters=0, ckpt_every=0, policy_lr=0.5)
    res = run_search(cfg, run, datasets=ds, progress=False)
    searched, post = _final_model(run, 'policy'), _final_model(run, 'posttrain')
    logits = searched['logits']
    mine = sample_policy(logits, torch.Generator().manual_seed(cfg.seed))
    assert not torch.equal(mine, sample_policy(logits, torch.Generator().manual_seed(cfg.seed + 1)))  # the seed matters
    assert not torch.equal(mine, argmax_policy(logits))  # and a sample is not the argmax here
    assert torch.equal(post['policy'], mine)
    assert res['policy'] == json.loads((run / 'results.json').read_text())['policy'] == mine.tolist()
    torch.manual_seed(cfg.seed + 1)
    fresh = make_model(cfg, make_tasks(cfg, ds['train']), stage='posttrain').set_policy(mine)
    names = [v.name for v in fresh.vcns.values()]
    written = json.loads((run / 'policy.json').read_text())
    assert written == json.loads(json.dumps(policy_to_json(mine, ['a', 'b'], names)))
    _assert_same(post, fresh.state_dict(), rtol=0, atol=0)  # zero post-train iterations: the fresh model, bit for bit
    convs = [k for k, v in post.items() if v.dim() == 4 and k in searched and searched[k].shape == v.shape]
    assert convs and not any(torch.equal(post[k], searched[k]) for k in convs)  # not the searched weights

def _toy_policy(run_dir, fidelity='ours', cbs=(), datasets=None, **kw):
    "The toy network's policy-train stage alone: 16 iterations alternating 2 weight and 2 policy iterations."
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import get_config, train_stage
    from automtl_nb.weighting import FixedWeighting
    cfg = get_config('synthetic', fidelity=fidelity, tasks=('a', 'b'), batch_size=8, policy_iters=16, weight_steps=2,
                     policy_steps=2, tau_every=2, lambda_reg=1e-2, lr=1e-2, policy_lr=0.1, **{'ckpt_every': 4, **kw})
    torch.manual_seed(0)
    sm = toy_run.make_model(1)
    tasks, w = [toy_run.L1Task('a'), toy_run.L1Task('b')], FixedWeighting({'a': 1., 'b': .5})
    return train_stage('policy', cfg, sm, tasks, w, datasets or _toy_sets(), run_dir, progress=False, cbs=cbs)

def _is_bn_stat(k): return k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))

@pytest.mark.parametrize('fidelity', ['ours', 'original'])
def test_each_phase_moves_only_its_own_parameters(tmp_path, fidelity):
    """A policy iteration leaves every network weight bit-identical, a weight iteration the logits; neither leaves a
    gradient behind for the other. Batch-norm running statistics *do* move in policy iterations: `Learner.fit` keeps the
    model in train mode for the whole stage (as the original's trainer, which calls `model.train()` before both phases),
    so the policy phase's forward passes update them like the weight phase's."""
    from automtl_nb.learner import Callback
    class Snap(Callback):
        order = 40  # before_batch: after AlternateCB has set the phase
        def before_fit(self): self.steps = []
        def before_batch(self): self.before = {k: v.clone() for k, v in self.learn.model.state_dict().items()}
        def after_batch(self):
            after = self.learn.model.state_dict()
            moved = {k for k, v in after.items() if not torch.equal(v, self.before[k])}
            grads = {n for n, p in self.learn.model.named_parameters() if p.grad is not None}
            self.steps.append((self.learn.phase, moved, grads))
    snap = Snap()
    learn = _toy_policy(tmp_path, fidelity, cbs=[snap])
    params = {n for n, _ in learn.model.named_parameters()}
    weights = params - {'logits'}
    assert [p[0] for p in snap.steps] == (['policy'] * 2 + ['weights'] * 2 if fidelity == 'original' else
                                          ['weights'] * 2 + ['policy'] * 2) * 4
    for i, (phase, moved, grads) in enumerate(snap.steps):
        assert not grads, (i, grads)  # no gradient left to leak into the other phase's next step
        if phase == 'policy': assert not moved & weights, (i, moved & weights)
        else: assert 'logits' not in moved, i
        if moved & params:  # a batch was trained on (a per-task loader that ran out skips the iteration)
            assert any(map(_is_bn_stat, moved)), (i, phase, moved)  # train mode: running statistics move in both phases
    pol = [m for ph, m, _ in snap.steps if ph == 'policy']
    assert sum('logits' in m for m in pol) >= 4  # the policy phase did train the logits ...
    assert sum(bool(m & weights) for ph, m, _ in snap.steps if ph == 'weights') >= 4  # ... the weight phase the weights

class _Tagged(torch.utils.data.Dataset):
    "`ds`, appending `split` to `log` for every sample it serves."
    def __init__(self, ds, split, log): self.ds, self.split, self.log, self.tasks = ds, split, log, ds.tasks
    def __len__(self): return len(self.ds)
    def __getitem__(self, i): self.log.append(self.split); return self.ds[i]

@pytest.mark.parametrize('fidelity', ['ours', 'original'])
def test_policy_train_reads_train1_for_weights_and_train2_for_the_policy(tmp_path, fidelity):
    "Every sample that a weight iteration trains on comes from train1; every one a policy iteration trains on, train2."
    from automtl_nb.learner import Callback
    log = []
    class Mark(Callback):
        order = 40
        def before_batch(self): log.append(('start', self.learn.phase))
        def after_batch(self): log.append(('end',))
    ds = {k: _Tagged(v, k, log) for k, v in _toy_sets().items()}
    _toy_policy(tmp_path, fidelity, cbs=[Mark()], datasets=ds)
    served, phase = {'weights': [], 'policy': []}, None
    for e in log:
        if isinstance(e, tuple): phase = e[1] if e[0] == 'start' else None
        elif phase: served[phase].append(e)
    assert set(served['weights']) == {'train1'}, set(served['weights'])
    assert set(served['policy']) == {'train2'}, set(served['policy'])
    assert len(served['weights']) >= 8 * 8 and len(served['policy']) >= 8 * 6  # 8 iterations each, batches of 8
    assert 'val' in log  # the end-of-stage evaluation, outside any iteration

def test_evaluate_in_search_mode_restores_the_model_and_leaves_the_rng_alone():
    "evaluate scores the argmax policy; mode, τ, policy, train mode, BN statistics and torch's RNG stay as they were."
    import copy
    sys.path.insert(0, str(HERE))
    import toy_run
    from automtl_nb.learner import evaluate
    from automtl_nb.policy import argmax_policy
    torch.manual_seed(0)
    sm = toy_run.make_model(1).set_mode('search', tau=2.5).train()
    with torch.no_grad(): sm.logits.normal_()
    sm.policy.copy_((argmax_policy(sm.logits) + 1) % 3)  # a stored policy unlike the argmax
    tasks, ds, x = [toy_run.L1Task('a'), toy_run.L1Task('b')], toy_run.ToyData(8, 3), torch.randn(4, 3, 8, 8)
    before, state, rng = copy.deepcopy(sm), copy.deepcopy(sm.state_dict()), torch.get_rng_state()
    res = evaluate(sm, tasks, ds, bs=4)
    assert res == evaluate(copy.deepcopy(before).set_policy(argmax_policy(before.logits)), tasks, ds, bs=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (sm.training, sm.mode, sm.tau) == (True, 'search', 2.5)
    _assert_same(sm.state_dict(), state, rtol=0, atol=0)
    torch.manual_seed(1)
    y = sm(x)
    torch.manual_seed(1)
    y0 = before(x)
    _assert_same(y, y0, rtol=0, atol=0)  # the next training forward is the one it would have been (same Gumbel noise)

@pytest.mark.parametrize('fidelity', ['ours', 'original'])
def test_mid_stage_evaluation_in_a_resumed_stage_changes_nothing(tmp_path, fidelity):
    """Policy-train evaluated every 3 iterations, stopped after iteration 10 and resumed from its checkpoint at 8, ends
    with the weights of a run that never evaluated mid-stage and logs the evaluations of an uninterrupted one."""
    from automtl_nb.learner import Callback, CancelFitException
    class Stop(Callback):
        order = 30
        def after_batch(self):
            if self.learn.it == 10: raise CancelFitException()
    _toy_policy(tmp_path / 'quiet', fidelity)
    full = _toy_policy(tmp_path / 'full', fidelity, eval_every=3)
    cut = _toy_policy(tmp_path / 'cut', fidelity, cbs=[Stop()], eval_every=3)
    assert cut.it == 10 and [r['it'] for r in cut.log] == [3, 6, 9]  # it evaluated after its last checkpoint (8)
    resumed = _toy_policy(tmp_path / 'cut', fidelity, eval_every=3)
    assert [r['it'] for r in resumed.log] == [3, 6, 9, 12, 15, 16]
    assert resumed.log == full.log
    final = _final_model(tmp_path / 'quiet', 'policy')
    _assert_same(final, _final_model(tmp_path / 'full', 'policy'), rtol=0, atol=0)
    _assert_same(final, _final_model(tmp_path / 'cut', 'policy'), rtol=0, atol=0)
