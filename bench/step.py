"""Seconds per training iteration and peak memory of the three AutoMTL stages: batched supermodel vs the per-task reference.

Stages: pre-train (warm-up, the average of the 3 options), the policy-train weight phase and policy phase (Gumbel-softmax
sampling, τ=5), post-train with a fixed discrete policy: sampled from uniform logits ('posttrain', the worst case: tasks
rarely share) or shaped like a searched one ('posttrain-tail': the first 3/4 of the VCNs shared). One iteration = forward of all tasks on one batch that
carries every task's labels, the summed task losses (+ λ_reg·L_reg in the policy phase), backward, one Adam step, as the
learner does (the batched model with the learner's fused `adam`, the reference with torch's default per-parameter Adam,
as the original code). `--precisions fp32 bf16` also times both in bf16 mixed precision (`learner.predict`: bf16 compute,
fp32 weights, gradients, optimizer state and losses). Times: medians of round-robin repetitions in one process. Memory:
peak RSS of a fresh child process per (implementation, precision, stage, tasks) that builds the model and runs two iterations.

usage: python bench/step.py [--tasks 2 3 5] [--ref-tasks 2 3] [--size 128x256] [--bs 2] [--reps 3] [--stages ...]
                            [--precisions fp32 bf16] [--no-memory]"""
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import set_threads, tasks_for, make_supermodel, make_batch, parse_size, interleaved, peak_rss_gb, run_child, PerTaskReference, tail_policy
from automtl_nb.learner import set_trainable, adam, predict, PRECISIONS
from automtl_nb.policy import gumbel_softmax, policy_regularizer, sample_policy

STAGES = ('pretrain', 'policy-weights', 'policy-policy', 'posttrain', 'posttrain-tail')
LAMBDA_REG, TAU = 5e-4, 5.

def _weight_opt(params, opt=adam): return opt(params, 1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
def _policy_opt(logits, opt=adam): return opt([logits], 1e-2, weight_decay=5e-4)

def fixed_policy(sm, stage, seed=0):
    "Post-train's policy: sampled from uniform logits ('posttrain'), or a searched policy's shape ('posttrain-tail': 3/4 shared)."
    return tail_policy(sm) if stage == 'posttrain-tail' else sample_policy(sm.logits, torch.Generator().manual_seed(seed))

def batched_step(tasks, stage, batch, precision='fp32', seed=0):
    "A closure running one `stage` iteration of the batched supermodel."
    sm = make_supermodel(tasks, seed=seed).train()
    phase = 'policy' if stage == 'policy-policy' else 'weights'
    if stage == 'pretrain': sm.set_mode('warmup')
    elif stage.startswith('posttrain'): sm.set_policy(fixed_policy(sm, stage, seed))
    else: sm.set_mode('search', tau=TAU)
    set_trainable(sm, phase)
    opt = _policy_opt(sm.logits) if phase == 'policy' else _weight_opt([p for n, p in sm.named_parameters() if n != 'logits'])
    def step():
        preds = predict(sm, batch['img'], precision)
        loss = sum(t.loss(preds[t.name], batch[t.name]) for t in tasks)
        if phase == 'policy': loss = loss + LAMBDA_REG * policy_regularizer(sm.logits, sm.depths)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step

def reference_step(tasks, stage, batch, precision='fp32', seed=0):
    "A closure running one `stage` iteration of the plain per-task reference (all parameters always require gradients)."
    sm = make_supermodel(tasks, seed=seed)
    depths, policy = sm.depths, fixed_policy(sm, stage, seed)
    ref = PerTaskReference(sm).train(); del sm
    T, L = ref.logits.shape[:2]
    phase = 'policy' if stage == 'policy-policy' else 'weights'
    plain = torch.optim.Adam  # the original code's optimizer: torch's per-parameter Adam
    opt = _policy_opt(ref.logits, plain) if phase == 'policy' else _weight_opt([p for n, p in ref.named_parameters() if n != 'logits'], plain)
    def forward(x):
        if stage.startswith('posttrain'): return ref(x, policy=policy)
        return ref(x, torch.full((T, L, 3), 1 / 3) if stage == 'pretrain' else gumbel_softmax(ref.logits, TAU))
    def step():
        preds = predict(forward, batch['img'], precision)
        loss = sum(t.loss(preds[t.name], batch[t.name]) for t in tasks)
        if phase == 'policy': loss = loss + LAMBDA_REG * policy_regularizer(ref.logits, depths)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step

IMPLS = {'batched': batched_step, 'reference': reference_step}

def variants(precisions, with_ref):
    "{label: (implementation, precision)} to time: 'batched', 'reference', 'batched-bf16', ..."
    return {k + ('' if p == 'fp32' else f'-{p}'): (k, p) for p in precisions for k in IMPLS if with_ref or k == 'batched'}

def child(label, stage, n_tasks, size, bs):
    "Peak RSS (GB) of building variant `label` and running two `stage` iterations, in this (fresh) process."
    tasks = tasks_for(n_tasks)
    impl, precision = variants(PRECISIONS, True)[label]
    step = IMPLS[impl](tasks, stage, make_batch(tasks, bs, size), precision)
    for _ in range(2): step()
    print(json.dumps({'rss_gb': peak_rss_gb()}))

def time_stage(stage, n_tasks, size, bs, reps, precisions, with_ref):
    "{variant: median s/iteration} of `stage`, the variants interleaved."
    tasks = tasks_for(n_tasks); batch = make_batch(tasks, bs, size)
    return interleaved({k: IMPLS[i](tasks, stage, batch, p) for k, (i, p) in variants(precisions, with_ref).items()}, reps)

def ratios(t):
    "Each batched variant against the reference in the same precision and against the fp32 reference (the original's)."
    pairs = {(b, r) for b in t if b.startswith('batched') for r in ('reference', b.replace('batched', 'reference')) if r in t}
    return {f'{b}/{r}': t[b] / t[r] for b, r in sorted(pairs)}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tasks', type=int, nargs='+', default=[2]); p.add_argument('--ref-tasks', type=int, nargs='*', default=None, help='task counts also timed with the reference (default: all)')
    p.add_argument('--size', default='128x256'); p.add_argument('--bs', type=int, default=2); p.add_argument('--reps', type=int, default=3)
    p.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES); p.add_argument('--threads', type=int, default=2)
    p.add_argument('--precisions', nargs='+', default=['fp32'], choices=PRECISIONS)
    p.add_argument('--no-memory', action='store_true'); p.add_argument('--child', nargs=5, metavar=('IMPL', 'STAGE', 'TASKS', 'SIZE', 'BS'))
    a = p.parse_args(argv); set_threads(a.threads)
    if a.child: impl, stage, n, size, bs = a.child; return child(impl, stage, int(n), parse_size(size), int(bs))
    size, ref_tasks = parse_size(a.size), a.tasks if a.ref_tasks is None else a.ref_tasks
    print(f'step: Deeplab-ResNet34 + ASPP heads, {a.size}, batch {a.bs}, {a.threads} threads, median of {a.reps}')
    rows = []
    for n in a.tasks:
        for stage in a.stages:
            t = time_stage(stage, n, size, a.bs, a.reps, a.precisions, n in ref_tasks)
            mem = {} if a.no_memory else {k: run_child('step.py', [k, stage, n, a.size, a.bs])['rss_gb'] for k in t}
            rs = ratios(t); rows.append((n, stage, rs))
            print(f'{n} tasks {stage:15s} ' + '  '.join(f'{k} {v:6.2f} s' + (f' {mem[k]:.2f} GB' if k in mem else '') for k, v in t.items())
                  + ''.join(f'  {k} = {r:.2f}' for k, r in rs.items()), flush=True)
    for key in (rows[0][2] if rows else {}):
        pol = [rs[key] for n, s, rs in rows if s.startswith('policy') and n == a.tasks[0]]
        if pol: print(f'step: {key} = {max(pol):.2f} (policy-train, worst phase, {a.tasks[0]} tasks)')

if __name__ == '__main__': main()
