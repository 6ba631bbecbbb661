"""Inference seconds of the derived multi-task model vs the all-shared and the independent models (batch 1).

All models come from one Deeplab-ResNet34 + ASPP supermodel (`automtl_nb.derive.derive_model`). The derived model's
policy shares the first `--shared-frac` of the VCNs and gives the first task its own copies of the rest (the others
keep sharing): the shape AutoMTL's searched policies take. The bound checked is
derived ≤ all-shared × (1 + f) + 10%, where f is the task-specific ops' share of the all-shared model's MACs.
Also timed: the supermodel itself in fixed mode (batched execution) and the per-task reference, which recomputes the
backbone per task. Medians of `--reps` round-robin runs under `torch.inference_mode`, in fp32 or (`--precision bf16`)
under bf16 autocast (`learner.predict`, as training and evaluation run it).

usage: python bench/inference.py [--size 256x512] [--tasks 2] [--reps 5] [--shared-frac 0.75] [--precision fp32|bf16]"""
import argparse, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, torch.nn as nn
from common import set_threads, tasks_for, make_supermodel, parse_size, median_times, PerTaskReference, tail_policy
from automtl_nb.derive import derive_model
from automtl_nb.learner import PRECISIONS, predict

def macs(sm, x):
    "({vcn index: multiply-accumulates of its operator}, MACs of all heads) of the all-shared model on input `x`."
    per_vcn, head_macs = {}, {}
    count = lambda store, k: lambda m, i, o: store.__setitem__(k, m.weight.numel() * o[0, 0].numel())
    hooks = [v.op.register_forward_hook(count(per_vcn, v.index)) for v in sm.vcns.values() if v.op is not None]
    head_convs = [m for h in sm.heads.values() for m in h.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(count(head_macs, i)) for i, m in enumerate(head_convs)]
    with torch.inference_mode(): sm.set_policy('shared')(x)
    for h in hooks: h.remove()
    return per_vcn, sum(head_macs.values())

def specific_share(policy, per_vcn, heads):
    "MACs that `policy` adds to the all-shared model (task copies, minus shared ops nobody runs), as a share of it."
    extra = sum(n * int((policy[:, i] == 1).sum()) - n * int(not bool((policy[:, i] == 0).any()))
                for i, n in per_vcn.items())
    return extra / (sum(per_vcn.values()) + heads)

def verdict_line(r, frac):
    "The closing line: the derived/all-shared time ratio `r` against the bound 1 + `frac` + 10%, met or NOT met."
    bound = 1 + frac + 0.1
    verdict = 'met' if r <= bound else 'NOT met'
    return f'inference: derived/all-shared = {r:.2f} (bound 1 + {frac:.2f} + 0.10 = {bound:.2f}: {verdict})'

def backbone_conv_calls(model, x):
    "How many times the derived model's backbone convolutions run in one forward pass (heads excluded)."
    calls, hooks = [], []
    for name, m in model.net.named_modules():
        if isinstance(m, nn.Conv2d) and not name.startswith('heads'):
            hooks.append(m.register_forward_hook(lambda *a: calls.append(1)))
    with torch.inference_mode(): model(x)
    for h in hooks: h.remove()
    return len(calls)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='256x512')
    p.add_argument('--tasks', type=int, default=2)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--shared-frac', type=float, default=0.75); p.add_argument('--threads', type=int, default=2)
    p.add_argument('--no-reference', action='store_true', help='skip the slow per-task reference')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS)
    a = p.parse_args(argv); set_threads(a.threads)
    tasks = tasks_for(a.tasks); x = torch.randn(1, 3, *parse_size(a.size))
    sm = make_supermodel(tasks).eval()
    policy = tail_policy(sm, a.shared_frac)
    per_vcn, head_macs = macs(sm, x)
    models = {'independent': derive_model(sm, torch.ones_like(policy)),
              'all-shared': derive_model(sm, torch.zeros_like(policy)),
              'derived': derive_model(sm, policy)}
    n_convs = sum(1 for v in sm.vcns.values() if isinstance(v.op, nn.Conv2d))
    once = backbone_conv_calls(models['all-shared'], x)
    sm_fixed = sm.set_policy(policy)
    nets = {**models, 'supermodel (fixed mode)': sm_fixed}
    if not a.no_reference:
        ref = PerTaskReference(make_supermodel(tasks)).eval()
        nets['per-task reference'] = lambda x: ref(x, policy=policy)
    with torch.inference_mode():
        t = median_times({k: (lambda f=f: predict(f, x, a.precision)) for k, f in nets.items()}, a.reps, warmup=1)
    frac = specific_share(policy, per_vcn, head_macs)
    print(f'inference: Deeplab-ResNet34 + ASPP heads, {a.tasks} tasks, batch 1, {a.size}, {a.precision}, '
          f'{a.threads} threads, median of {a.reps}')
    for k, v in t.items(): print(f'  {k:26s} {v:6.2f} s   vs all-shared {v / t["all-shared"]:.2f}')
    print(f'  all-shared: backbone convolutions run {once} times for {a.tasks} tasks '
          f'({n_convs} in the backbone: computed once = {once == n_convs})')
    print(f'  derived policy: {int((policy == 1).sum())} task-specific (task, VCN) entries, '
          f'{frac:.1%} of the all-shared MACs')
    print(verdict_line(t['derived'] / t['all-shared'], frac))

if __name__ == '__main__': main()
