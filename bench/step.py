"""Seconds per training iteration and peak memory of each AutoMTL stage: ours against the original AutoMTL trainer.

Workload: Deeplab-ResNet34 (prototxt) + one ASPP head per task, seg-19 + depth (more tasks: normal, keypoint, edge),
synthetic 3x128x256 images, batch 2, fp32, 2 threads. Stages: `pretrain` (the mean of the options), the policy-train
weight phase `policy-weights` and policy phase `policy-policy` (soft Gumbel-softmax mix, τ=5), `posttrain` (a fixed
policy sampled from uniform logits) and `posttrain-tail` (a searched policy's shape: the first 3/4 of the VCNs shared).

Implementations (`--impls`):
- `after_mix`: ours with `search_bn='after_mix'`, mixing the shared and task convolutions in weight space (02_vcn):
  what the search runs with batch norm after the mix;
- `per_option`: ours with `search_bn='per_option'` (a batch norm inside each option: no weight-space mixing);
- `original`: the original code's `Trainer.train_step` / `train_step_with_reg` on its `MTLModel` (`--original PATH`,
  see ../shared/original/README.md; 2 tasks), with the optimizers its `pre_train`, `alter_train_with_reg` and
  `post_train` build (Adam; SGD with momentum in the weight phase; Adam on the policy), a batch per task;
- `reference`: the per-task oracle (common.PerTaskReference, torch's per-parameter Adam), standing in for the original
  when it is not given.
One iteration of ours: the forward of all tasks on one batch that carries every task's labels, the summed losses
(+ λ_reg·L_reg in the policy phase), one backward, one step of the learner's fused Adam (on the logits alone in the
policy phase, whose weights take no gradient). The original loops over the tasks, each with its own batch of `--bs`.
Each (implementation, precision, stage) runs in a fresh process: build, one untimed iteration (in the policy-train
stages: one of the other phase first, so that both optimizers hold their state as in the alternating run), then
`--iters` timed iterations (median) and the process's peak RSS. The ratio is ours (fp32) over the
baseline (`original`, else `reference`), both measured in this run, where ours is the placement the default config
runs in that stage (`ours_impl`): `after_mix` in pre-train and policy-train (`search_bn`), `per_option` in post-train
(`posttrain_bn`).

usage: python bench/step.py [--original PATH] [--iters 3] [--stages ...] [--impls ...] [--tasks 2] [--size 128x256]
                            [--bs 2] [--threads 2] [--precisions fp32 bf16] [--rounds 1] [--profile STAGE]"""
import argparse, itertools, json, os, statistics, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # puts this checkout first on sys.path
import torch, torch.nn as nn
from common import set_threads, tasks_for, make_supermodel, make_batch, parse_size, timed, peak_rss_gb, run_child
from common import PerTaskReference, tail_policy, cpu_model
from automtl_nb.learner import set_trainable, adam, predict, PRECISIONS
from automtl_nb.policy import gumbel_softmax, policy_regularizer, sample_policy

STAGES = ('pretrain', 'policy-weights', 'policy-policy', 'posttrain', 'posttrain-tail')
IMPLS = ('after_mix', 'per_option', 'original', 'reference')
def ours_impl(stage):
    "The implementation the ratio is about: the default config's batch norm placement in `stage`."
    return 'per_option' if stage.startswith('posttrain') else 'after_mix'

LAMBDA_REG, TAU, LR, POLICY_LR = 5e-4, 5., 1e-3, 1e-2

def fixed_policy(sm, stage, seed=0):
    "Post-train's policy: sampled from uniform logits ('posttrain'), or a searched shape ('posttrain-tail')."
    if stage == 'posttrain-tail': return tail_policy(sm)
    return sample_policy(sm.logits, torch.Generator().manual_seed(seed))

def _phase(stage): return 'policy' if stage == 'policy-policy' else 'weights'

def _other_phase(stage):
    "The policy-train phase that is not `stage`'s (run once before timing), or None outside policy-train."
    return {'policy-weights': 'policy-policy', 'policy-policy': 'policy-weights'}.get(stage)

# ---------------------------------------------------------------- ours
def ours_step(tasks, stage, batch, precision='fp32', search_bn='after_mix', seed=0):
    "A closure running one `stage` iteration of our supermodel, as the learner runs it (update='joint')."
    sm = make_supermodel(tasks, seed=seed, search_bn=search_bn).train()
    if stage == 'pretrain': sm.set_mode('warmup')
    elif stage.startswith('posttrain'): sm.set_policy(fixed_policy(sm, stage, seed))
    else: sm.set_mode('search', tau=TAU)
    opts = {'weights': adam([p for n, p in sm.named_parameters() if n != 'logits'], LR, betas=(0.5, 0.999),
                            weight_decay=1e-4),
            'policy': adam([sm.logits], POLICY_LR, weight_decay=5e-4)}
    def step(stage=stage):
        phase = _phase(stage)
        set_trainable(sm, phase)
        preds = predict(sm, batch['img'], precision)
        loss = sum(t.loss(preds[t.name], batch[t.name]) for t in tasks)
        if phase == 'policy': loss = loss + LAMBDA_REG * policy_regularizer(sm.logits, sm.depths)
        loss.backward()
        opts[phase].step()
        opts[phase].zero_grad(set_to_none=True)
    return step, sm

def reference_step(tasks, stage, batch, precision='fp32', seed=0):
    "A closure running one `stage` iteration of the per-task oracle (all weights always take gradients)."
    sm = make_supermodel(tasks, seed=seed)
    depths, policy = sm.depths, fixed_policy(sm, stage, seed)
    ref = PerTaskReference(sm).train()
    del sm
    T, L = ref.logits.shape[:2]
    opts = {'weights': torch.optim.Adam([p for n, p in ref.named_parameters() if n != 'logits'], LR, betas=(0.5, 0.999),
                                        weight_decay=1e-4),
            'policy': torch.optim.Adam([ref.logits], POLICY_LR, weight_decay=5e-4)}
    def forward(x, stage):
        if stage.startswith('posttrain'): return ref(x, policy=policy)
        W = torch.full((T, L, 3), 1 / 3) if stage == 'pretrain' else gumbel_softmax(ref.logits, TAU)
        return ref(x, W)
    def step(stage=stage):
        phase = _phase(stage)
        preds = predict(lambda x: forward(x, stage), batch['img'], precision)
        loss = sum(t.loss(preds[t.name], batch[t.name]) for t in tasks)
        if phase == 'policy': loss = loss + LAMBDA_REG * policy_regularizer(ref.logits, depths)
        loss.backward()
        opts[phase].step()
        opts[phase].zero_grad(set_to_none=True)
    return step, ref

# ---------------------------------------------------------------- the original
ORIGINAL_TASKS = {'seg': ('segment_semantic', 19), 'depth': ('depth_zbuffer', 1)}

class _Repeat:
    "A loader that yields the same batch for ever (the original's trainer calls `iter` on it)."
    def __init__(self, b): self.b = b
    def __iter__(self): return itertools.repeat(self.b)

def original_step(path, tasks, stage, batch, seed=0):
    "A closure running one `stage` iteration of the original trainer, as its stage methods run it."
    if [t.name for t in tasks] != list(ORIGINAL_TASKS): raise ValueError('the original is timed on seg + depth only')
    sys.path.insert(0, str(path))
    from framework.mtl_model import MTLModel
    from framework.trainer import Trainer
    from data.heads.pixel2pixel import ASPPHeadNode
    from data.metrics.pixel2pixel_loss import CityScapesCriterions
    torch.manual_seed(seed)
    names = [v[0] for v in ORIGINAL_TASKS.values()]
    heads = nn.ModuleDict({n: ASPPHeadNode(512, c) for n, c in ORIGINAL_TASKS.values()})
    model = MTLModel(str(Path(path) / 'models' / 'deeplab_resnet34_adashare.prototxt'), heads, BNsp=True)
    labels = {'segment_semantic': batch['seg'][:, None].float(), 'depth_zbuffer': batch['depth']}
    loaders = {n: [_Repeat({'input': batch['img'], 'label': labels[n]})] * 3 for n in names}
    big = 10 ** 9
    trainer = Trainer(model, loaders, {n: [] for n in names}, {n: CityScapesCriterions(n) for n in names},
                      {n: None for n in names}, print_iters=big, val_iters=big, save_iters=big)
    lam = {'segment_semantic': 1., 'depth_zbuffer': 1., 'policy': LAMBDA_REG}
    model.train()
    if stage == 'pretrain':  # pre_train: Adam over every parameter
        opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.5, 0.999), weight_decay=1e-4)
        return (lambda stage=stage: trainer.train_step('pre_train_all', opt)), model
    if stage.startswith('posttrain'):  # post_train: the argmax of the policy logits, Adam over the rest
        convs = [n for n in model.net if n.taskSp and not n.assumeSp]
        P = fixed_policy(make_supermodel(tasks, seed=seed), stage, seed)
        with torch.no_grad():
            for l, node in enumerate(convs):
                for t, n in enumerate(names): node.policy[n].copy_(nn.functional.one_hot(P[t, l], 3).float())
        trainer.freeze_policy()
        opt = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=LR, betas=(0.5, 0.999),
                               weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4000, gamma=0.5)
        lam_t = {n: 1. for n in names}
        return (lambda stage=stage: trainer.train_step('mtl', opt, sched, hard=True, loss_lambda=lam_t)), model
    trainer.freeze_policy()  # alter_train_with_reg: Adam on the policy, SGD (momentum) on the network, all trainable
    policy_op = torch.optim.Adam(filter(lambda p: not p.requires_grad, model.parameters()), lr=POLICY_LR,
                                 weight_decay=5e-4)
    network_op = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=LR, momentum=0.9,
                                 weight_decay=1e-4)
    trainer.unfreeze_all_weights()
    def step(stage=stage):
        if _phase(stage) == 'policy':
            trainer.train_step_with_reg('mtl', policy_op, alter_train='policy', tau=TAU, loss_lambda=lam)
        else: trainer.train_step_with_reg('mtl', network_op, alter_train='network', tau=TAU, scale=1, loss_lambda=lam)
    return step, model

# ---------------------------------------------------------------- one measurement per process
def label(impl, precision): return impl if precision == 'fp32' else f'{impl}-{precision}'

def make_step(impl, stage, tasks, batch, precision, original=None):
    "(step closure, model) of `impl`."
    if impl in ('after_mix', 'per_option'): return ours_step(tasks, stage, batch, precision, search_bn=impl)
    if impl == 'reference': return reference_step(tasks, stage, batch, precision)
    if precision != 'fp32': raise ValueError('the original is timed in fp32 only')
    return original_step(original, tasks, stage, batch)

def child(spec):
    "Build, warm up and time one (implementation, precision, stage) in this fresh process; prints JSON."
    a = json.loads(spec)
    set_threads(a['threads'])
    tasks = tasks_for(a['tasks'])
    step, _ = make_step(a['impl'], a['stage'], tasks, make_batch(tasks, a['bs'], a['size']), a['precision'],
                        a.get('original'))
    if _other_phase(a['stage']): step(_other_phase(a['stage']))  # the other phase's optimizer state exists too
    step()
    times = [timed(step) for _ in range(a['iters'])]
    print(json.dumps({'s': statistics.median(times), 'times': times, 'rss_gb': peak_rss_gb()}))

def measure(impl, precision, stage, a):
    "{'s', 'times', 'rss_gb'} of one child process."
    spec = dict(impl=impl, precision=precision, stage=stage, tasks=a.tasks, bs=a.bs, size=parse_size(a.size),
                iters=a.iters, threads=a.threads, original=a.original)
    return run_child('step.py', [json.dumps(spec)])

def summary(stage, res, base):
    "The line `stage: <base> X s, ours Y s, ratio R`, then the other variants and every peak RSS."
    ours = ours_impl(stage)
    b, o = res[base]['s'], res[ours]['s']
    extra = [f'{k} {v["s"]:.2f} s ({v["s"] / b:.2f})' for k, v in res.items() if k not in (base, ours)]
    mem = ', '.join(f'{k} {v["rss_gb"]:.2f} GB' for k, v in res.items())
    head = f'{stage}: {base} {b:.2f} s, ours ({ours}) {o:.2f} s, ratio {o / b:.2f}'
    return head + ''.join(f' | {e}' for e in extra) + f' | peak RSS {mem}'

def profile(stage, a, top=15):
    "A torch.profiler table of one iteration of ours in `stage` (after one untimed iteration)."
    from torch.profiler import profile as prof, ProfilerActivity
    tasks = tasks_for(a.tasks)
    step, _ = ours_step(tasks, stage, make_batch(tasks, a.bs, parse_size(a.size)), search_bn=ours_impl(stage))
    if _other_phase(stage): step(_other_phase(stage))
    step()
    with prof(activities=[ProfilerActivity.CPU]) as p: step()
    print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=top))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--original', default=os.environ.get('AUTOMTL_ORIGINAL'),
                   help='the unpacked original AutoMTL tree (default: $AUTOMTL_ORIGINAL)')
    p.add_argument('--impls', nargs='+', choices=IMPLS, default=None,
                   help='default: after_mix per_option, and original (with --original) or else reference')
    p.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES)
    p.add_argument('--iters', type=int, default=3, help='timed iterations per measurement (median)')
    p.add_argument('--rounds', type=int, default=1, help='measurements per variant, round-robin (median of medians)')
    p.add_argument('--tasks', type=int, default=2)
    p.add_argument('--size', default='128x256')
    p.add_argument('--bs', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--precisions', nargs='+', default=['fp32'], choices=PRECISIONS, help='for ours')
    p.add_argument('--profile', choices=STAGES, help="print a torch.profiler table of one iteration of ours instead")
    p.add_argument('--child', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: return child(a.child)
    set_threads(a.threads)
    if a.profile: return profile(a.profile, a)
    impls = a.impls or ['after_mix', 'per_option', 'original' if a.original else 'reference']
    base = 'original' if 'original' in impls else 'reference' if 'reference' in impls else None
    if base is None: p.error('--impls needs a baseline: original or reference')
    if base == 'original' and not a.original: p.error('--impls original needs --original PATH (or $AUTOMTL_ORIGINAL)')
    print(f'step: Deeplab-ResNet34 + {a.tasks} ASPP heads, 3x{a.size}, batch {a.bs}, {a.threads} threads, '
          f'median of {a.iters} iterations x {a.rounds} round(s); CPU: {cpu_model()}; '
          f'load average {os.getloadavg()[0]:.2f}', flush=True)
    for stage in a.stages:
        ours = [] if ours_impl(stage) in impls else [ours_impl(stage)]
        variants = [(i, pr) for pr in a.precisions for i in impls + ours
                    if not (pr != 'fp32' and i in ('original', 'reference'))]
        runs = {label(*v): [] for v in variants}
        for _ in range(a.rounds):
            for v in variants: runs[label(*v)].append(measure(*v, stage, a))
        res = {k: {'s': statistics.median(r['s'] for r in rs), 'rss_gb': max(r['rss_gb'] for r in rs)}
               for k, rs in runs.items()}
        print(summary(stage, res, base), flush=True)
    print(f'step: load average at the end {os.getloadavg()[0]:.2f}')

if __name__ == '__main__': main()
