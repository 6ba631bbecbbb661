"""Structure and forward parity with the original AutoMTL code (issue 15): its `MTLModel` and our supermodel, built
from the same prototxt with the same weights, compared on CPU in float64.

Why float64: in train mode every batch norm divides by a batch standard deviation, which amplifies rounding. In
fp32 two equal computations summed in another order (weight-space mixing: conv(x, (W_s + W_t)/2) against
(conv(x, W_s) + conv(x, W_t))/2) end Deeplab-ResNet34 about 1e-5 apart; in float64 they end 1e-11 apart, so a
tolerance of 1e-9 separates a different computation from a different rounding.

    python bench/parity.py --original /work/original               # Deeplab-ResNet34 (adashare), seg + depth, ASPP
    python bench/parity.py --original /work/original --only structure,forward

Checks (one line each, with the largest difference found; exit status 1 if any fails):
- structure: the parameter count of every layer and option (shared, task copies, skip downsample, shared BN, task
  BN) and of every head; the state-dict mapping of `automtl_nb.original` both ways (original → ours → original and
  ours → original → ours give back every tensor exactly; the original's `load_state_dict(strict=True)` takes
  ours);
- forward: equal task outputs (<= 1e-9 relative to the largest output) for the all-shared, all-specific, all-skip
  and three random fixed policies (the original: stage 'mtl', hard=True, i.e. the argmax of its logits), the
  pre-train mean of the options (stage 'pre_train_all'), and the soft Gumbel mix (stage 'mtl', hard=False) with the
  same noise on both sides; each in eval mode (running BN statistics) and in train mode (batch statistics, dropout off);
- regularizer: the original's `policy_reg(task, tau=τ, scale=6)` (softplus of 6·(g_k − g_0) on a soft Gumbel
  sample g, weight (L − depth)/L) against our `policy_regularizer(on='gumbel', scale=6)` on the same logits and
  noise, per task;
  and the layers' depths, which set the weights.
Then the checks other modules add (`CHECK_MODULES`): bench/parity_metrics.py `metric_checks(original_path)` (metrics)
and bench/parity_train.py `train_checks(original_path)` (training), run when their files are there.

How the same Gumbel noise reaches both sides: the original draws it inside each conv node's forward (and again in
`policy_reg`) with `F.gumbel_softmax`, one task at a time; ours draws it once for all tasks and layers. Both are
replaced, for the duration of a check, by the same function of a fixed noise tensor G (T, L, 3):
softmax((logits + G[t, l]) / τ), the original's keyed by its policy parameter (task t, layer l).
"""
import argparse, copy, importlib, sys, time
from pathlib import Path
import torch, torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: parity_metrics, parity_train
TASKS = {'segment_semantic': 19, 'depth_zbuffer': 1}  # CityScapes, as the original's notebooks
RTOL = 1e-9  # float64: see the module docstring
CHECKS = []  # check functions ctx -> [(name, largest difference, passed)]; extend with @check
CHECK_MODULES = [('parity_metrics', 'metric_checks'), ('parity_train', 'train_checks')]  # (module, fn(original_path))


def check(fn):
    "Register `fn(ctx)` as a parity check."
    CHECKS.append(fn)
    return fn


# ---------------------------------------------------------------- building both models
def _original(path):
    "The original's MTLModel and ASPP head classes, imported from the tree at `path`."
    if str(path) not in sys.path: sys.path.insert(0, str(path))
    from framework.mtl_model import MTLModel
    from data.heads.pixel2pixel import ASPPHeadNode
    return MTLModel, ASPPHeadNode


def _perturb(sd, seed):
    "A copy of state dict `sd` with every float tensor moved randomly (task copies then differ from the shared op)."
    g, out = torch.Generator().manual_seed(seed), {}
    for k, v in sd.items():
        if not v.is_floating_point(): out[k] = v.clone(); continue
        r = torch.randn(v.shape, generator=g)
        if k.endswith('running_var'): out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith('running_mean'): out[k] = 0.1 * r
        elif '.policy.' in k: out[k] = r if '.basicOp' not in k else v.clone()
        elif v.dim() == 1 and k.endswith('weight'): out[k] = 1 + 0.2 * r  # BN scale
        elif v.dim() == 1: out[k] = v + 0.1 * r  # biases
        else: out[k] = v + 0.3 * v.std() * r  # conv weights: same scale as the initialisation
    return out


def build(original_path, prototxt=None, hw=(64, 128), bs=2, seed=0):
    "ctx: the original MTLModel and our supermodel of `prototxt` with the same (perturbed) weights, and an input batch,\
    all in float64."
    from automtl_nb.compiler import compile_supermodel
    from automtl_nb.models import make_heads
    from automtl_nb.original import from_original_state_dict
    MTLModel, ASPPHeadNode = _original(original_path)
    prototxt = Path(prototxt or Path(original_path) / 'models' / 'deeplab_resnet34_adashare.prototxt')
    torch.manual_seed(seed)
    orig = MTLModel(str(prototxt), nn.ModuleDict({t: ASPPHeadNode(512, n) for t, n in TASKS.items()}), BNsp=True)
    bn_policies = {k for k, v in orig.state_dict().items() if '.policy.' in k and _is_bn_policy(orig, k)}
    sd = _perturb(orig.state_dict(), seed + 1)
    for k in bn_policies: sd[k] = torch.zeros(3)  # never read, and not kept by our layout: leave them at their init
    orig.load_state_dict(sd)
    names = list(TASKS)
    ours = compile_supermodel(prototxt, names, make_heads(TASKS, 512, kind='aspp'), search_bn='after_mix')
    ours.load_state_dict(from_original_state_dict(orig.state_dict(), ours, names))
    orig.double(); ours.double()
    x = torch.randn(bs, 3, *hw, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return dict(orig=orig, ours=ours, names=names, x=x, original_path=original_path, prototxt=prototxt,
                orig_state=copy.deepcopy(orig.state_dict()), ours_state=copy.deepcopy(ours.state_dict()))


def _is_bn_policy(orig, k):
    return type(orig.net[int(k.split('.')[1])]).__name__ == 'BN2dNode'


def _reset(ctx):
    "Both models back to the start state (train-mode checks move the BN statistics)."
    ctx['orig'].load_state_dict(ctx['orig_state']); ctx['ours'].load_state_dict(ctx['ours_state'])


def _convs(orig): return [n for n in orig.net if n.taskSp and not n.assumeSp]


def _rel(a, b):
    "Largest |a − b| relative to the largest |a|."
    return (a.double() - b.double()).abs().max().item() / max(a.double().abs().max().item(), 1e-12)


# ---------------------------------------------------------------- structure
@check
def structure(ctx):
    "Parameter counts per layer and option, per head, and in total."
    from automtl_nb.graph import n_params
    orig, ours, names = ctx['orig'], ctx['ours'], ctx['names']
    worst, n, layers = 0, 0, [x for x in ours.graph if x.kind != 'input']
    for i, node in enumerate(orig.net):
        kind = type(node).__name__
        if kind not in ('Conv2dNode', 'BN2dNode'): continue
        name = layers[i].name
        if kind == 'Conv2dNode':
            v = ours.vcns[name.replace('.', '__')]
            pairs = [(n_params(node.basicOp), n_params(v.op)),
                     (sum(n_params(node.taskOp[t]) for t in names), n_params(v.specific_op)),
                     (sum(n_params(node.dsOp[t]) for t in names), n_params(v.skip))]
        else:
            v = ours.vcns[ours._alias[name].replace('.', '__')]
            pairs = [(n_params(node.basicOp), n_params(v.norm)),
                     (sum(n_params(node.taskOp[t]) for t in names), n_params(v.specific_norm))]
        worst, n = max([worst] + [abs(a - b) for a, b in pairs]), n + len(pairs)
    heads = [(n_params(orig.headsDict[t]), n_params(ours.heads[t])) for t in names]
    worst_h = max(abs(a - b) for a, b in heads)
    n_bn_pol = sum(3 * len(names) for x in orig.net if type(x).__name__ == 'BN2dNode')
    tot_o, tot_u = n_params(orig) - n_bn_pol, n_params(ours)
    n_convs = len(_convs(orig))
    return [(f'structure: parameters per layer and option ({n} pairs over {n_convs} convs and their BNs)', worst,
             worst == 0),
            (f'structure: parameters per head ({len(names)} ASPP heads)', worst_h, worst_h == 0),
            (f'structure: total parameters, original {tot_o:,} (without its {n_bn_pol} unused BN policy logits) '
             f'vs ours {tot_u:,}', abs(tot_o - tot_u), tot_o == tot_u)]


@check
def mapping(ctx):
    "The state-dict mapping both ways returns every tensor exactly; the original loads ours strictly."
    from automtl_nb.original import from_original_state_dict, to_original_state_dict
    orig, ours, names = ctx['orig'], ctx['ours'], ctx['names']
    osd, usd = orig.state_dict(), ours.state_dict()
    back = to_original_state_dict(ours, names)
    d1 = float('inf')
    if set(back) == set(osd): d1 = max((osd[k].double() - back[k].double()).abs().max().item() for k in osd)
    other = copy.deepcopy(ours)
    with torch.no_grad():
        for p in other.parameters(): p.add_(1.)  # a different state, so that the round trip has to restore it
    again = from_original_state_dict(to_original_state_dict(ours, names), other, names)
    d2 = max((usd[k].double() - again[k].double()).abs().max().item() for k in usd)
    probe = copy.deepcopy(orig)
    try: probe.load_state_dict(back, strict=True); ok3 = True
    except RuntimeError: ok3 = False
    return [(f'mapping: original -> ours -> original, {len(osd)} tensors', d1, d1 == 0),
            (f'mapping: ours -> original -> ours, {len(usd)} tensors', d2, d2 == 0),
            ("mapping: the original's load_state_dict(strict=True) takes to_original_state_dict(ours)",
             0. if ok3 else float('inf'), ok3)]


# ---------------------------------------------------------------- forward
def _modes(ctx):
    "(label, set_mode) pairs: eval mode, and train mode with dropout off on both sides."
    def train(m):
        m.train()
        for d in m.modules():
            if isinstance(d, nn.Dropout): d.eval()
        return m
    return [('eval', lambda m: m.eval()), ('train', train)]


def _compare(ctx, label, run_orig, run_ours):
    "[(name, largest relative difference, passed)] of both sides' task outputs, in eval and in train mode."
    res = []
    for mode, set_mode in _modes(ctx):
        _reset(ctx)
        set_mode(ctx['orig']); set_mode(ctx['ours'])
        with torch.no_grad():
            yo = {t: run_orig(t) for t in ctx['names']}
            yu = run_ours()
        d = max(_rel(yo[t], yu[t]) for t in ctx['names'])
        res.append((f'forward {mode:5}: {label}', d, d <= RTOL))
    _reset(ctx)
    return res


def _set_original_policy(orig, names, P):
    "Make the original's argmax choose `P` (T, L): its policy logits set to one-hot rows."
    with torch.no_grad():
        for l, node in enumerate(_convs(orig)):
            for t, task in enumerate(names): node.policy[task].copy_(nn.functional.one_hot(P[t, l], 3).float())


@check
def forward_fixed(ctx):
    "Fixed policies: all-shared, all-specific, all-skip and three random ones."
    orig, ours, names, x = ctx['orig'], ctx['ours'], ctx['names'], ctx['x']
    T, L = len(names), len(ours.vcns)
    full = lambda k: torch.full((T, L), k, dtype=torch.long)
    policies = [('all-shared', full(0)), ('all-specific', full(1)), ('all-skip', full(2))]
    rand = lambda s: torch.randint(0, 3, (T, L), generator=torch.Generator().manual_seed(s))
    policies += [(f'random policy {s}', rand(s)) for s in (1, 2, 3)]
    res = []
    for label, P in policies:
        def run_orig(t, P=P): _set_original_policy(orig, names, P); return orig(x, 'mtl', t, 1., True)
        res += _compare(ctx, f'fixed {label} (hard=True)', run_orig, lambda P=P: ours.set_policy(P)(x))
    return res


@check
def forward_pretrain(ctx):
    "The pre-train mean of the options (and of the shared and task BN)."
    orig, ours, x = ctx['orig'], ctx['ours'], ctx['x']
    return _compare(ctx, "pre-train mean of options ('pre_train_all' vs warmup)", lambda t: orig(x, 'pre_train_all', t),
                    lambda: ours.set_mode('warmup')(x))


class SameNoise:
    "softmax((logits + G[t, l]) / τ): for the original keyed by its policy parameters, for ours by the logits' shape."
    def __init__(self, orig, names, G):
        self.G = G
        self.where = {id(n.policy[t]): (l, i) for l, n in enumerate(_convs(orig)) for i, t in enumerate(names)}
        self.task = None  # ours: the task whose (1, L, 3) logits the regularizer is given
    def original(self, logits, tau=1., hard=False, eps=1e-10, dim=-1):
        assert not hard
        l, t = self.where[id(logits)]
        return ((logits + self.G[t, l]) / tau).softmax(-1)
    def ours(self, logits, tau=1., hard=False, dim=-1):
        assert not hard
        G = self.G if logits.shape[0] == self.G.shape[0] and self.task is None else self.G[self.task:self.task + 1]
        return ((logits + G) / tau).softmax(-1)


def _patched(noise):
    "Context: the original's F.gumbel_softmax and our gumbel_softmax (compiler, policy) replaced by `noise`."
    import contextlib
    from automtl_nb import compiler, policy
    @contextlib.contextmanager
    def cm():
        saved = nn.functional.gumbel_softmax, compiler.gumbel_softmax, policy.gumbel_softmax
        nn.functional.gumbel_softmax = noise.original
        compiler.gumbel_softmax = policy.gumbel_softmax = noise.ours
        try: yield
        finally: nn.functional.gumbel_softmax, compiler.gumbel_softmax, policy.gumbel_softmax = saved
    return cm()


def _noise(ctx, seed):
    T, L = len(ctx['names']), len(ctx['ours'].vcns)
    u = torch.rand(T, L, 3, generator=torch.Generator().manual_seed(seed)).clamp_min(torch.finfo(torch.float32).tiny)
    return SameNoise(ctx['orig'], ctx['names'], -torch.log(-torch.log(u.double())))


@check
def forward_gumbel(ctx):
    "The soft Gumbel mix of the search (hard=False), the same noise on both sides, at two temperatures."
    orig, ours, x, res = ctx['orig'], ctx['ours'], ctx['x'], []
    for tau in (5., 0.5):
        noise = _noise(ctx, int(tau * 10))
        with _patched(noise):
            res += _compare(ctx, f'soft Gumbel mix, tau={tau:g}, same noise', lambda t: orig(x, 'mtl', t, tau, False),
                            lambda: ours.set_mode('search', tau=tau, hard=False)(x))
    return res


# ---------------------------------------------------------------- regularizer
@check
def regularizer(ctx):
    "The original's policy_reg (soft Gumbel sample, scale 6) vs ours (on='gumbel', scale=6), per task; the depths."
    from automtl_nb.policy import policy_regularizer
    orig, ours, names = ctx['orig'], ctx['ours'], ctx['names']
    depths_o = torch.tensor([n.depth for n in _convs(orig)])
    dd = (depths_o - ours.depths).abs().max().item()
    same_L = orig.max_node_depth() == int(ours.depths.max())
    res = [(f'regularizer: conv depths (1..{int(depths_o.max())}), which set the weights (L - depth)/L', dd,
            dd == 0 and same_L)]
    for tau in (5., 1.):
        noise, worst = _noise(ctx, 100 + int(tau)), 0.
        with _patched(noise):
            for t, task in enumerate(names):
                ro = orig.policy_reg(task, None, tau, scale=6)
                noise.task = t
                ru = policy_regularizer(ours.logits[t:t + 1], ours.depths, on='gumbel', tau=tau, scale=6.)
                noise.task = None
                worst = max(worst, abs(ro.item() - ru.item()) / max(abs(ro.item()), 1e-12))
        res.append((f'regularizer: per task, soft Gumbel sample, scale 6, tau={tau:g}', worst, worst <= RTOL))
    return res


# ---------------------------------------------------------------- running
def parity_checks(original_path, prototxt=None, only=None, hw=(64, 128), bs=2, threads=1):
    "[(check name, largest difference, passed)] of the checks named in `only` (default: all, other modules' included)."
    torch.set_num_threads(threads)
    ctx, res = build(original_path, prototxt, hw, bs), []
    for fn in CHECKS:
        if only is None or fn.__name__ in only or fn.__name__.split('_')[0] in only: res += fn(ctx)
    for mod, fn in CHECK_MODULES:
        key = mod.split('_')[-1]
        if only is not None and key not in only: continue
        if not (Path(__file__).parent / f'{mod}.py').exists():
            print(f'(no bench/{mod}.py: {key} checks not run)')
            continue
        res += [(f'{key}: {n}', d, ok) for n, d, ok in getattr(importlib.import_module(mod), fn)(original_path)]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--original', required=True, help='the unpacked, patched original AutoMTL tree')
    p.add_argument('--prototxt', default=None, help="default: the original's models/deeplab_resnet34_adashare.prototxt")
    p.add_argument('--only', default=None,
                   help='comma-separated: structure, mapping, forward, regularizer, metrics, train')
    p.add_argument('--size', default='64x128', help='input HxW'); p.add_argument('--bs', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args(argv)
    t0 = time.time()
    res = parity_checks(a.original, a.prototxt, a.only.split(',') if a.only else None,
                        tuple(int(s) for s in a.size.split('x')), a.bs, a.threads)
    for name, d, ok in res: print(f"{'ok  ' if ok else 'FAIL'} {d:10.3e}  {name}")
    bad = sum(not ok for _, _, ok in res)
    print(f'{len(res) - bad}/{len(res)} checks passed in {time.time() - t0:.0f} s')
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
