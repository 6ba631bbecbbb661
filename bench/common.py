"""Shared workload, oracle and measurement helpers for the bench/ scripts (and the tests that check them).

The workload is the one of issue 7: the Deeplab-ResNet34 prototxt backbone with one ASPP head per task,
CityScapes-shaped tasks (seg-19, depth, then Taskonomy's normal, keypoint, edge for 3-5 tasks), synthetic images and
labels.
The bench measures this checkout: its root goes first on `sys.path`, ahead of any installed `automtl_nb`."""
import json, os, platform, resource, subprocess, sys
from pathlib import Path
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path[:1]: sys.path.insert(0, str(ROOT))
import torch
from automtl_nb.compiler import compile_supermodel, to_graph
from automtl_nb.derive import timed, median_times  # the package's one way to time (10_derive)
from automtl_nb.metrics import Task
from automtl_nb.models import load_zoo, make_heads

TASKS = (Task('seg', 'seg', 19), Task('depth', 'depth'), Task('normal', 'normal'), Task('keypoint', 'keypoint'),
         Task('edge', 'edge'))

def set_threads(n=2):
    "Pin torch to `n` intra-op threads (the issue's machine has 2)."
    torch.set_num_threads(n)

def tasks_for(n):
    "The first `n` benchmark tasks."
    if not 1 <= n <= len(TASKS): raise ValueError(f'between 1 and {len(TASKS)} tasks are supported, got {n}')
    return list(TASKS[:n])

def make_supermodel(tasks, head='aspp', seed=0, search_bn='per_option'):
    "The Deeplab-ResNet34 (prototxt) supermodel with one `head` per task."
    torch.manual_seed(seed)
    graph = to_graph(load_zoo('deeplab_resnet34'))
    heads = make_heads({t.name: t.n_out for t in tasks}, graph[graph.outputs[0]].shape[0], kind=head)
    return compile_supermodel(graph, [t.name for t in tasks], heads, search_bn=search_bn)

def make_batch(tasks, bs, size, seed=0):
    "A synthetic batch {'img': (bs, 3, H, W), task: labels} with every task's labels."
    g = torch.Generator().manual_seed(seed)
    h, w = size
    b = {'img': torch.randn(bs, 3, h, w, generator=g)}
    for t in tasks:
        if t.kind == 'seg': b[t.name] = torch.randint(0, t.n_out, (bs, h, w), generator=g)
        elif t.kind == 'normal': b[t.name] = torch.nn.functional.normalize(torch.randn(bs, 3, h, w, generator=g), dim=1)
        else: b[t.name] = torch.rand(bs, t.n_out, h, w, generator=g) + 0.1
    return b

def parse_size(s):
    "'128x256' -> (128, 256)."
    h, w = s.lower().split('x')
    return int(h), int(w)

def peak_rss_gb():
    "Peak resident memory of this process so far, in GB (VmHWM: unlike ru_maxrss it does not inherit the parent's)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024 / 1e9  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # not Linux (KiB on Linux, bytes on macOS)

def run_child(script, args, timeout=1800):
    "Run `python bench/<script> --child ...` in a fresh process; returns the JSON object it prints last."
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    cmd = [sys.executable, str(BENCH_DIR / script), '--child', *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode: raise RuntimeError(f'{script} child {args} failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])

class PerTaskReference(torch.nn.Module):
    """The plain per-task supermodel, the oracle for the batched one: each task walks the backbone graph alone, each
    option a standalone module (`VCN.option_module`), mixed output by output; under `search_bn='after_mix'` the
    task's batch norm (`VCN.norm_module`) follows the mixture (in warm-up, the mean with the shared batch norm)."""
    def __init__(self, sm): # the batched `Supermodel` whose modules and weights this shares or copies
        super().__init__()
        self.graph, self.tasks, self.output, self._alias = sm.graph, sm.tasks, sm.output, sm._alias
        self.ops, self.heads, self.logits = sm.ops, sm.heads, sm.logits
        T = len(sm.tasks)
        self.vcns = {k: (v.index, v.bn_after_mix) for k, v in sm.vcns.items()}
        self.options = torch.nn.ModuleDict({f'{k}-{o}-{t}': v.option_module(o, t, with_norm=False)
                                            for k, v in sm.vcns.items() for o in range(3) for t in range(T)})
        after = {k: v for k, v in sm.vcns.items() if v.bn_after_mix}
        self.norms = torch.nn.ModuleDict({f'{k}-{t}': v.norm_module(t) for k, v in after.items() for t in range(T)})
        self.shared_norms = torch.nn.ModuleDict({k: v.norm for k, v in after.items()})
    def option(self, key, o, t): return self.options[f'{key}-{o}-{t}']
    def forward(self, x, # (bs, C, H, W) seen by every task, or (T, bs, C, H, W)
                W=None, # (T, L, 3) mixing weights, or None with `policy`
                policy=None, # (T, L) options of a fixed policy: each task runs only its option
                warmup=False): # 'after_mix' warm-up: the task's BN averaged with the shared one
        "{task: output}, task by task."
        outs = {}
        for t, task in enumerate(self.tasks):
            env = {self.graph.inputs[0]: x if x.dim() == 4 else x[t]}
            for n in self.graph:
                if n.kind == 'input': continue
                if n.name in self._alias:  # a batch norm fused into its conv's VCN
                    env[n.name] = env[self._alias[n.name]]
                    continue
                key, xs = n.name.replace('.', '__'), [env[p] for p in n.parents]
                if key not in self.vcns:
                    env[n.name] = self.ops[key].fn(*xs)
                    continue
                i, after = self.vcns[key]
                if policy is not None: y = self.option(key, int(policy[t, i]), t)(xs[0])
                else: y = sum(W[t, i, o] * self.option(key, o, t)(xs[0]) for o in range(3))
                if after:
                    norm = self.norms[f'{key}-{t}']
                    y = (norm(y) + self.shared_norms[key](y)) / 2 if warmup else norm(y)
                env[n.name] = y
            outs[task] = self.heads[task](env[self.output])
        return outs

def tail_policy(sm, shared_frac=0.75):
    "(T, L): every task shares the first `shared_frac` of the VCNs, then task 0 has its own copies (a searched shape)."
    T, L = len(sm.tasks), len(sm.vcns)
    p = torch.zeros(T, L, dtype=torch.long)
    p[0, round(shared_frac * L):] = 1
    return p

def cpu_model():
    "The CPU's model name (lscpu), or what the platform says."
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()
