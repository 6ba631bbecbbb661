"""Seconds to compile backbones into 3-task supermodels: the Deeplab-ResNet34 prototxt and torchvision models.

For the prototxt, parsing and compiling are timed apart, and next to them the cost of what the original code did on
top of building the backbone: a deep copy of every operator per task followed by re-initialising the copies. All
numbers are medians of `--reps` repetitions, run round-robin.

usage: python bench/compile.py [--reps 5] [--tasks 3] [--threads 2]"""
import argparse, copy, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, torchvision
from common import set_threads, median_times
from automtl_nb.compiler import compile_supermodel, to_graph, plan_vcns
from automtl_nb.graph import build_op
from automtl_nb.models import load_zoo

TORCHVISION = ('resnet34', 'mobilenet_v2', 'mnasnet1_0')

def deepcopy_reinit(graph, n_tasks):
    "The original code's extra work: per operator, a deep copy per task, each re-initialised."
    copies = []
    for n, _ in plan_vcns(graph):
        op = build_op(n)
        for _ in range(n_tasks):
            c = copy.deepcopy(op)
            if hasattr(c, 'reset_parameters'): c.reset_parameters()
            copies.append(c)
    return copies

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--tasks', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args(argv); set_threads(a.threads)
    tasks = [f'task{i}' for i in range(a.tasks)]
    text = load_zoo('deeplab_resnet34'); graph = to_graph(text)
    tv = {k: torchvision.models.get_model(k, weights=None) for k in TORCHVISION}
    fns = {'deeplab_resnet34 parse': lambda: to_graph(text),
           'deeplab_resnet34 prototxt (parse + compile)': lambda: compile_supermodel(text, tasks),
           'original-style deep copies + re-init (on top)': lambda: deepcopy_reinit(graph, a.tasks),
           **{f'torchvision {k} (trace + compile)': (lambda m=m: compile_supermodel(m, tasks)) for k, m in tv.items()}}
    t = median_times(fns, a.reps, warmup=1)
    print(f'compile: {a.tasks} tasks, {a.threads} threads, median of {a.reps}')
    for k, v in t.items(): print(f'  {k:48s} {v:6.3f} s')
    d = t['deeplab_resnet34 prototxt (parse + compile)']
    print(f"compile: deeplab_resnet34 prototxt = {d:.3f} s for {a.tasks} tasks (goal < 0.3 s; "
          f"compile/original-style = {d / (d + t['original-style deep copies + re-init (on top)']):.2f})")

if __name__ == '__main__': main()
