"""A tiny AutoMTL run (toy data, toy tasks, a 3-VCN network) used by the learner tests as a separate process.

usage: python toy_run.py RUN_DIR [--bn 0|1] [--policy-iters N]   (also under torchrun)"""
import argparse, sys, time
import torch
from automtl_nb.compiler import compile_supermodel, MTLModel, Conv2dNode, BN2dNode, ReLUNode
from automtl_nb.learner import get_config, train_stage, Callback, init_distributed
from automtl_nb.weighting import FixedWeighting

class L1Metrics:
    def __init__(self): self.s, self.n = 0., 0
    def update(self, p, t): self.s += (p - t).abs().sum().item(); self.n += t.numel()
    def compute(self): return {'l1': self.s / max(self.n, 1)}

class L1Task:
    kind = 'depth'
    def __init__(self, name): self.name = name
    def loss(self, p, t): return (p - t).abs().mean()
    def new_metrics(self): return L1Metrics()

class Net(MTLModel):
    "With `bn`, batch norms and shape-changing convs (downsample skips); without, no batch norms (identity skips)."
    def __init__(self, bn):
        super().__init__(in_ch=3)
        c = 8 if bn else 3
        x = self.add(Conv2dNode(c, 3, padding=1, bias=not bn))
        if bn: x = self.add(BN2dNode())
        x = self.add(ReLUNode(), parents=x)
        x = self.add(ReLUNode(), parents=self.add(Conv2dNode(c, 3, padding=1, bias=True), parents=x))
        if bn: self.add(Conv2dNode(1, 1, bias=True), parents=x)

def make_model(bn):
    heads = None if bn else {t: torch.nn.Conv2d(3, 1, 1) for t in 'ab'}
    return compile_supermodel(Net(bn), ['a', 'b'], heads)

class ToyData(torch.utils.data.Dataset):
    tasks = {'a': dict(kind='depth'), 'b': dict(kind='depth')}
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed); self.x = torch.randn(n, 3, 8, 8, generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): x = self.x[i]; return {'img': x, 'a': x[:1].abs() * 2, 'b': (x[1:2] - x[2:3]).abs()}

class ReportCB(Callback):
    "Print each iteration after it is done (the kill test watches this), slowly enough to be killed mid-stage."
    order = 25
    def after_batch(self): print(f'{self.learn.stage} {self.learn.it}', flush=True); time.sleep(0.05)

def main(argv=None):
    p = argparse.ArgumentParser(); p.add_argument('run_dir'); p.add_argument('--bn', type=int, default=1)
    p.add_argument('--policy-iters', type=int, default=16); p.add_argument('--report', type=int, default=1)
    a = p.parse_args(argv)
    init_distributed(); torch.manual_seed(0)
    cfg = get_config('synthetic', tasks=('a', 'b'), batch_size=8, pretrain_iters=6, policy_iters=a.policy_iters,
                     ckpt_every=2, weight_steps=2, policy_steps=2, tau_every=2, lambda_reg=1e-2, lr=1e-2, policy_lr=0.1)
    sm = make_model(a.bn)
    tasks, w = [L1Task('a'), L1Task('b')], FixedWeighting({'a': 1., 'b': 0.5})
    data = {'train': ToyData(64, 0), 'train1': ToyData(48, 1), 'train2': ToyData(16, 2), 'val': ToyData(16, 3)}
    cbs = [ReportCB()] if a.report else []
    for stage in ('pretrain', 'policy'): train_stage(stage, cfg, sm, tasks, w, data, a.run_dir, progress=False, cbs=cbs)

if __name__ == '__main__': main()
