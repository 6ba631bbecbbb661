"""Training parity with the original AutoMTL code (issue 15): the same iterations on its `Trainer` and on our `Learner`.

From the same weights, with the same batches and the same Gumbel noise, both sides run `--iters` iterations each of
pre-train, policy-train (its original alternation: first `--iters` policy iterations, then `--iters` weight
iterations) and post-train (the argmax policy, hard); ours in `fidelity='original'`. After each part the checks compare
every recorded loss and every parameter (the original's state mapped onto ours). One line per check, with the largest
difference found; exit status 1 if any check fails.

    python bench/parity_train.py --original /work/original                  # Deeplab-ResNet34 (adashare), ASPP heads
    python bench/parity_train.py --original /work/original --prototxt tiny  # 3 convs, no BatchNorm layers

What is made equal on purpose, and why:
- Gumbel noise: drawn from a generator keyed by (task, task step, forward or regularizer) on both sides, by patching
  `torch.nn.functional.gumbel_softmax` in the original and our `gumbel_softmax`: our task-batched forward draws the
  noise of all tasks at once, the original one task at a time, so the global RNG streams cannot match.
- Dropout in the heads is off (p = 0) on both sides, for the same reason: our forward runs every task's head.
- Task losses are the original's criterions on both sides (metric conventions: bench/parity_metrics.py).
- Batch-norm momentum: the original builds each prototxt BatchNorm from its protobuf fields with `str(value)`, so its
  momentum is the float32 default 0.1, i.e. 0.10000000149011612 (its downsampling-skip BNs, built in code, keep 0.1).
  Ours uses 0.1 there, which moves float64 running statistics by ~1e-8 relative after a few steps; the harness gives
  our prototxt BNs the original's value.
- Adam's eps (`--adam-eps`, default 1e-4 on both sides; the original uses torch's 1e-8): Adam divides by
  sqrt(v) + eps, so a gradient that is zero analytically but ~1e-13 of rounding noise in practice (e.g. a conv bias
  before a batch norm) moves its weight by up to lr * noise / eps, i.e. lr/eps = 1e5 times the rounding difference
  between the two sides. With eps = 1e-8 post-train parameters differ by 1.4e-7 (losses by 3e-9); with 1e-4, by ~1e-11.
  The computation compared is the same; only its amplification of rounding differs.
- The original's weights are copied into ours with `automtl_nb.original` (the state-dict mapping of 16_original) when
  it is there; without it only prototxts without BatchNorm layers (`--prototxt tiny`) can be mapped, by `_tiny_map`.
"""
import argparse, copy, importlib, math, sys, tempfile
from pathlib import Path
import torch, torch.nn as nn

TASKS = {'segment_semantic': 19, 'depth_zbuffer': 1}  # CityScapes, as the original's notebooks
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}  # largest difference allowed, relative to the larger magnitude
# Tensors far below this scale are compared in absolute terms (rtol × MAG_FLOOR): the skip BN biases have zero gradient
# analytically (the task BN after the mix removes any per-channel constant) and hold only rounding noise of ~1e-13.
MAG_FLOOR = 1e-3

TINY = '''name: "tiny_nobn"
input: "blob1"
input_dim: 1
input_dim: 3
input_dim: 64
input_dim: 128
layer { name: "conv1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "c1" top: "r1" }
layer { name: "conv2" type: "Convolution" bottom: "r1" top: "c2"
  convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 stride: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "c2" top: "r2" }
layer { name: "conv3" type: "Convolution" bottom: "r2" top: "c3"
  convolution_param { num_output: 16 bias_term: true pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "relu3" type: "ReLU" bottom: "c3" top: "r3" }
'''

def _original(path):
    "The original's MTLModel, Trainer, ASPP head and CityScapes criterion classes, imported from the tree at `path`."
    sys.path.insert(0, str(path))
    from framework.mtl_model import MTLModel
    from framework.trainer import Trainer
    from data.heads.pixel2pixel import ASPPHeadNode
    from data.metrics.pixel2pixel_loss import CityScapesCriterions
    return MTLModel, Trainer, ASPPHeadNode, CityScapesCriterions

# ---------------------------------------------------------------- the same Gumbel noise on both sides
def _noise(t, k, kind, shape):
    "Gumbel(0, 1) noise of task `t`'s `k`-th soft task step, for its forward (`kind` 0) or its regularizer (1)."
    g = torch.Generator().manual_seed(1_000_003 * (2 * k + kind) + 7919 * t + 17)
    u = torch.rand(shape, generator=g).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))

def _mix(logits, g, tau): return ((logits + g) / tau).softmax(-1)

class OriginalNoise:
    "Replaces F.gumbel_softmax in the original: node `l`'s policy of task `t` gets row `l` of `_noise(t, k, kind)`."
    def __init__(self, model, tasks):
        convs = [n for n in model.net if n.taskSp and not n.assumeSp]
        self.where = {id(n.policy[t]): (l, i) for l, n in enumerate(convs) for i, t in enumerate(tasks)}
        self.L, self.calls = len(convs), {}
    def __call__(self, logits, tau=1., hard=False, eps=1e-10, dim=-1):
        assert not hard, 'the original draws hard samples only through argmax'
        l, t = self.where[id(logits)]
        c = self.calls[l, t] = self.calls.get((l, t), -1) + 1  # per task step: the forward's call, then the reg's
        return _mix(logits, _noise(t, c // 2, c % 2, (self.L, 3))[l], tau)

class OursNoise:
    ("Replaces our gumbel_softmax: a forward (all tasks) takes row t of task t's noise, "
     "a regularizer (one task) its own.")
    def __init__(self): self.learn, self.steps = None, {}
    def __call__(self, logits, tau=1., hard=False, dim=-1):
        t = self.learn.task_idx
        if logits.shape[0] > 1:  # the forward: a new task step of task t
            k = self.steps[t] = self.steps.get(t, -1) + 1
            g = torch.zeros_like(logits); g[t] = _noise(t, k, 0, logits.shape[1:])
        else: g = _noise(t, self.steps[t], 1, logits.shape[1:])[None]
        y = _mix(logits, g, tau)
        if not hard: return y
        return torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.) + (y - y.detach())

def _patch_ours(fn):
    "Point every automtl_nb module's `gumbel_softmax` at `fn`; returns the undo list."
    import automtl_nb, pkgutil
    from automtl_nb import policy
    undo = []
    for m in pkgutil.iter_modules(automtl_nb.__path__):
        mod = importlib.import_module(f'automtl_nb.{m.name}')
        if getattr(mod, 'gumbel_softmax', None) is policy.gumbel_softmax:
            undo.append((mod, mod.gumbel_softmax)); mod.gumbel_softmax = fn
    return undo

# ---------------------------------------------------------------- weights: the original's state onto ours
def _tiny_map(orig, ours, tasks):
    "Our state dict holding the original's weights, for backbones without BatchNorm layers (the 'tiny' prototxt)."
    if any(type(n).__name__ == 'BN2dNode' for n in orig.net):
        raise NotImplementedError('this prototxt has BatchNorm layers: '
                                  'its mapping needs automtl_nb.original (16_original)')
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    T = len(tasks)
    def rows(key, t, src):  # task t's block of a task-stacked tensor
        dst = sd[key]; dst.view(T, -1, *dst.shape[1:])[t] = src.reshape(-1, *dst.shape[1:])
    for n in orig.net:
        if not (n.taskSp and not n.assumeSp): continue
        k, v = n.layerName.replace('.', '__'), ours.vcns[n.layerName.replace('.', '__')]
        for p in ('weight', 'bias'):
            if getattr(n.basicOp, p, None) is not None: sd[f'vcns.{k}.op.{p}'] = getattr(n.basicOp, p).detach().clone()
        for t, task in enumerate(tasks):
            for p in ('weight', 'bias'):
                if getattr(n.taskOp[task], p, None) is not None:
                    rows(f'vcns.{k}.specific_op.{p}', t, getattr(n.taskOp[task], p).detach())
            ds = list(n.dsOp[task])
            if isinstance(ds[0], nn.Conv2d):
                rows(f'vcns.{k}.skip.proj.weight', t, ds[0].weight.detach())
                for p in ('weight', 'bias', 'running_mean', 'running_var'):
                    rows(f'vcns.{k}.skip.norm.{p}', t, getattr(ds[1], p).detach())
            sd['logits'][t, v.index] = n.policy[task].detach()
    for task in tasks:
        for p, val in orig.headsDict[task].state_dict().items(): sd[f'heads.{task}.{p}'] = val.clone()
    return sd

def _to_ours(orig, ours, tasks):
    "The original's current state in our layout: with 16_original's mapping if it exists, else `_tiny_map`."
    try: mapping = importlib.import_module('automtl_nb.original')
    except ImportError: return _tiny_map(orig, ours, tasks)
    for name in ('original_to_ours', 'state_to_ours', 'load_original_state'):
        if hasattr(mapping, name): return getattr(mapping, name)(orig, ours)
    return _tiny_map(orig, ours, tasks)

# ---------------------------------------------------------------- data
def _batches(n, bs, hw, seed):
    "`n` batches of random images and CityScapes-like labels (seg with ignore -1, depth >= 0)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 3, *hw, generator=g)
        seg = torch.randint(-1, TASKS['segment_semantic'], (bs, 1, *hw), generator=g).float()
        depth = torch.rand(bs, 1, *hw, generator=g) * (torch.rand(bs, 1, *hw, generator=g) > 0.2)
        out.append({'input': x, 'segment_semantic': seg, 'depth_zbuffer': depth})
    return out

class ListStream:
    "A task's batches from a list, as the original's loader iterator gives them: the list, then one `None`, again."
    def __init__(self, items, task): self.items, self.task, self.k = items, task, 0
    def __next__(self):
        pos = self.k % (len(self.items) + 1); self.k += 1
        if pos == len(self.items): return None
        b = self.items[pos]; return {'img': b['input'], self.task: b[self.task]}
    def state_dict(self): return {'k': self.k}
    def load_state_dict(self, d): self.k = d['k']

class CriterionTask:
    "One of our tasks whose loss is the original's criterion."
    def __init__(self, name, crit): self.name, self.crit = name, crit
    def loss(self, pred, target): return self.crit(pred, target)

# ---------------------------------------------------------------- the run
def _no_dropout(m):
    for d in m.modules():
        if isinstance(d, nn.Dropout): d.p = 0.

def _max_diff(a, b):
    "(largest absolute difference, that difference relative to the larger magnitude of the pair, floored at MAG_FLOOR)."
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.
    return d, d / max(a.double().abs().max().item(), b.double().abs().max().item(), MAG_FLOOR)

def _param_check(part, ref, now, rtol, before=None):
    "(check name, largest difference, passed) over every floating-point parameter and buffer but num_batches_tracked."
    keys = [k for k in now if now[k].is_floating_point() and 'num_batches' not in k]
    k, d, rel = max(((k, *_max_diff(ref[k], now[k])) for k in keys), key=lambda r: r[2])
    moved = sum(not torch.equal(before[k], now[k]) for k in keys) if before is not None else None
    what = f', {moved} of them moved in this part' if before is not None else ''
    ok = rel <= rtol and moved != 0
    return f'{part}: parameters and BN statistics, {len(keys)} tensors{what} (worst: {k})', d, ok

def _loss_check(part, a, b, rtol):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if a.shape != b.shape: return f'{part} ({len(a)} vs {len(b)} steps)', math.inf, False
    d, rel = _max_diff(a, b)
    return f'{part} ({len(a)} steps)', d, rel <= rtol

ORIGINAL_BN_MOMENTUM = float(torch.tensor(0.1, dtype=torch.float32))  # protobuf float32 0.1, read back as a double

def _adam_with_eps(forced):
    "torch.optim.Adam with its eps forced to `forced`, for both sides (see the module docstring)."
    class Adam(torch.optim.Adam):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=None, **kw):
            super().__init__(params, lr, betas, forced, **kw)
    return Adam

def train_checks(original_path, prototxt='deeplab', iters=5, hw=(64, 128), bs=2, n_batches=3, rtol=None, threads=1,
                 dtype=torch.float64, adam_eps=1e-4):
    "[(check name, largest difference, passed)]: losses and parameters after each training part, original vs ours."
    torch.set_num_threads(threads)
    rtol = rtol if rtol is not None else RTOL[dtype]
    old_dtype, old_adam = torch.get_default_dtype(), torch.optim.Adam
    torch.set_default_dtype(dtype)
    if adam_eps is not None: torch.optim.Adam = _adam_with_eps(adam_eps)
    try: return _train_checks(original_path, prototxt, iters, hw, bs, n_batches, rtol)
    finally:
        torch.set_default_dtype(old_dtype)
        torch.optim.Adam = old_adam

def _train_checks(original_path, prototxt, iters, hw, bs, n_batches, rtol):
    MTLModel, Trainer, ASPPHeadNode, Criterions = _original(original_path)
    from automtl_nb.compiler import compile_supermodel
    from automtl_nb.learner import get_config, stage_setup, Learner, Callback, TaskStreams
    from automtl_nb.weighting import get_weighting
    names = list(TASKS)
    if prototxt == 'tiny':
        path, feat = Path(tempfile.mkdtemp()) / 'tiny_nobn.prototxt', 16
        path.write_text(TINY)
    elif prototxt == 'deeplab': path, feat = Path(original_path) / 'models' / 'deeplab_resnet34_adashare.prototxt', 512
    else: path, feat = Path(prototxt), 512
    torch.manual_seed(0)
    heads = nn.ModuleDict({t: ASPPHeadNode(feat, n) for t, n in TASKS.items()})
    orig = MTLModel(str(path), heads, BNsp=True)
    _no_dropout(orig)
    ours = compile_supermodel(path, names, {t: copy.deepcopy(heads[t]) for t in names}, search_bn='after_mix')
    for v in ours.vcns.values():  # the prototxt's BNs: the original's float32 momentum (not the skips' BNs)
        for bn in (v.norm, v.specific_norm):
            if bn is not None: bn.momentum = ORIGINAL_BN_MOMENTUM
    ours.load_state_dict(_to_ours(orig, ours, names))
    res = [_param_check('start', _to_ours(orig, ours, names), ours.state_dict(), rtol)]
    state = lambda: {k: v.clone() for k, v in ours.state_dict().items()}
    start = state()

    # each task has three loaders in the original: train (pre/post-train), train1 (weight steps), train2 (policy steps)
    data = {t: [_batches(n_batches, bs, hw, 10 * i + s) for s in range(3)] for i, t in enumerate(names)}
    crit = {t: Criterions(t) for t in names}
    loaders = {t: [[{'input': b['input'], 'label': b[t]} for b in data[t][s]] for s in range(3)] for t in names}
    big = 10 ** 9
    # policy_update_iters=2: τ decays after every 3 policy iterations (the original's off-by-one, exercised)
    trainer = Trainer(orig, loaders, {t: [] for t in names}, crit, {t: None for t in names},
                      print_iters=big, val_iters=big, save_iters=big, policy_update_iters=2)
    kept, reset = [], trainer.set_train_loss_data_iter
    def keep_and_reset(): kept.append({t: list(v) for t, v in trainer.loss_list.items()}); reset()
    trainer.set_train_loss_data_iter = keep_and_reset  # the original clears its loss lists at the end of each stage
    lam = {'segment_semantic': 1., 'depth_zbuffer': 2., 'policy': 0.05}
    lam_t = {k: lam[k] for k in names}
    cfg = get_config('synthetic', fidelity='original', tasks=tuple(names), batch_size=bs, lambdas=lam_t,
                     lambda_reg=lam['policy'], stage_lr={'pretrain': 1e-4, 'policy': 1e-3}, lr=1e-3, policy_lr=1e-2,
                     tau0=5., tau_gamma=0.965, tau_every=3, weight_steps=iters, policy_steps=iters, decay_every=2,
                     decay_gamma=0.5, weight_decay=1e-4, policy_weight_decay=5e-4)
    tasks, noise = [CriterionTask(t, crit[t]) for t in names], OursNoise()
    class Rec(Callback):
        "Our losses as the original records them: λ·L (pre/post-train), (L, reg, total) in policy-train."
        order = 10  # after PolicyRegCB
        def before_fit(self): noise.learn = self.learn; self.losses, self.snap = {t: [] for t in names}, None
        def after_loss(self):
            l, t = self.learn, names[self.learn.task_idx]
            if l.stage != 'policy': self.losses[t].append(l.loss.item())
            else: self.losses[t].append((l.losses[t].item(), l.reg.item() if l.phase == 'policy' else math.nan,
                                         l.loss.item()))
        def after_batch(self):
            if self.learn.stage == 'policy' and self.learn.it == iters: self.snap = state()
    def ours_stage(stage, n, weighting):
        placeholder = {s: [0] * bs for s in ('train', 'train1', 'train2')}  # the streams are replaced below
        d, opts, scheds, cbs = stage_setup(stage, cfg, ours, weighting, placeholder)
        split = {'weights': 0, 'policy': 2} if stage != 'policy' else {'weights': 1, 'policy': 2}
        d = {ph: TaskStreams({t: ListStream(data[t][split[ph]], t) for t in names}) for ph in d}
        rec = Rec()
        Learner(ours, tasks, weighting, d, opts, scheds, cbs, update='per_task', stage=stage).fit(n, [rec])
        return rec
    undo, real = _patch_ours(noise), nn.functional.gumbel_softmax
    nn.functional.gumbel_softmax = OriginalNoise(orig, names)
    try:
        # 1. pre-train: every VCN the mean of its options; each task's raw loss (no λ in the original); Adam; no decay
        trainer.pre_train(iters=iters, lr=1e-4)
        rec = ours_stage('pretrain', iters, get_weighting('fixed', names))
        res += [_loss_check(f'pre-train: {t} losses', kept[-1][t], rec.losses[t], rtol) for t in names]
        res.append(_param_check('pre-train', _to_ours(orig, ours, names), ours.state_dict(), rtol, start))
        # 2. policy-train: `iters` policy iterations on train2 (Adam on the logits, Gumbel x6 regularizer), then `iters`
        #    weight iterations on train1 (SGD); the state is compared between the two phases too
        snap, calls, step, pre = {}, [0], trainer.train_step_with_reg, state()
        def counted(*a, **k):
            step(*a, **k); calls[0] += 1
            if calls[0] == iters: snap['state'] = _to_ours(orig, ours, names)
        trainer.train_step_with_reg = counted
        trainer.alter_train_with_reg(iters=2 * iters, policy_network_iters=(iters, iters),
                                     policy_lr=1e-2, network_lr=1e-3, tau=5., tau_ratio=0.965, loss_lambda=lam)
        rec = ours_stage('policy', 2 * iters, get_weighting('fixed', names, lambdas=lam_t))
        for t in names:
            o, u = kept[-1][t], rec.losses[t]
            n = len([r for r in u if not math.isnan(r[1])])  # the policy phase's steps come first
            res.append(_loss_check(f'policy phase: {t} (loss, reg, total)', [list(r) for r in o[:n]],
                                   [list(r) for r in u[:n]], rtol))
            res.append(_loss_check(f'weights phase: {t} task loss', [r[0] for r in o[n:]], [r[0] for r in u[n:]], rtol))
        res.append(_param_check('policy phase', snap['state'], rec.snap, rtol, pre))
        res.append(_param_check('weights phase', _to_ours(orig, ours, names), ours.state_dict(), rtol, rec.snap))
        pol = state()
        # 3. post-train: the argmax policy, hard; Adam with StepLR(2, 0.5) stepped per iteration
        ours.set_policy(ours.logits.detach().argmax(-1))
        trainer.post_train(iters=iters, lr=1e-3, loss_lambda=lam_t, decay_lr_freq=2, decay_lr_rate=0.5)
        rec = ours_stage('posttrain', iters, get_weighting('fixed', names, lambdas=lam_t))
        res += [_loss_check(f'post-train: {t} losses', kept[-1][t], rec.losses[t], rtol) for t in names]
        res.append(_param_check('post-train', _to_ours(orig, ours, names), ours.state_dict(), rtol, pol))
    finally:
        nn.functional.gumbel_softmax = real
        for mod, fn in undo: mod.gumbel_softmax = fn
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--original', required=True, help='the unpacked, patched original AutoMTL tree')
    p.add_argument('--prototxt', default='deeplab',
                   help="'deeplab' (the original's Deeplab-ResNet34), 'tiny', or a path")
    p.add_argument('--iters', type=int, default=5); p.add_argument('--rtol', type=float, default=None)
    p.add_argument('--dtype', default='float64', choices=('float64', 'float32'))
    p.add_argument('--adam-eps', type=float, default=1e-4, help="Adam's eps on both sides (the original's: 1e-8)")
    a = p.parse_args(argv)
    res = train_checks(a.original, a.prototxt, a.iters, rtol=a.rtol, dtype=getattr(torch, a.dtype), adam_eps=a.adam_eps)
    for name, d, ok in res: print(f"{'ok  ' if ok else 'FAIL'} {d:10.3e}  {name}")
    return 0 if all(ok for _, _, ok in res) else 1

if __name__ == '__main__': sys.exit(main())
