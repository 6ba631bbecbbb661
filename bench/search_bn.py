"""Search quality and wall time of the two search-time batch-norm placements on the synthetic benchmark.

`search_bn='per_option'` puts a batch norm inside each option (shared, task-specific); `'after_mix'` (the original's
placement) mixes the options' convolutions and then applies the task's batch norm, which lets 02_vcn mix in weight
space. Post-train and the derived model are the same for both (a batch norm per chosen option), so the question is
only which finds better policies, and how fast.

For every seed: the single-task networks once (the Δ baseline, which does not depend on the placement), then one
AutoMTL search (pre-train, policy-train, post-train from fresh weights) per placement, all with the `automtl run`
preset (`--config`, `--set` as in the CLI). Prints per seed and placement: Δt on val and test (%), parameters, the
policy's shared layers and the wall time of the search; then mean ± std over seeds. Choose on val; report test.

usage: python bench/search_bn.py [--seeds 0,1,2] [--config synthetic] [--set k=v ...] [--run-dir /tmp/search_bn]"""
import argparse, json, os, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # puts this checkout first on sys.path
from common import cpu_model
from automtl_nb.learner import get_config, make_datasets
from automtl_nb.cli import parse_overrides
from automtl_nb.metrics import delta_vs
from automtl_nb.policy import SHARED
from automtl_nb.sweep import search_run, single_task_runs

PLACEMENTS = ('per_option', 'after_mix')

def one_seed(cfg, run_dir):
    "{placement: {'val', 'test', 'params', 'shared', 's'}} for one seed's config."
    datasets = make_datasets(cfg)
    single = single_task_runs(cfg, datasets, run_dir / 'single')
    out = {}
    for bn in PLACEMENTS:
        t0 = time.time()
        r = search_run(cfg.replace(search_bn=bn), run_dir / bn, datasets)
        out[bn] = {s: delta_vs(r[s], single[s])['all'] for s in ('val', 'test') if s in r}
        out[bn] |= dict(params=r['params'], shared=sum(all(o == SHARED for o in col) for col in zip(*r['policy'])),
                        s=time.time() - t0)
    return out

def _ms(xs): return f'{statistics.mean(xs):+.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.:.2f}'

def summary(res):
    "Mean ± std over seeds of each placement's Δt (val, test), parameters and search time, as text lines."
    lines = []
    for bn in PLACEMENTS:
        rs = [r[bn] for r in res.values()]
        lines.append(f"{bn:<11} Δt val {_ms([r['val'] for r in rs])} %, Δt test {_ms([r['test'] for r in rs])} %, "
                     f"params {statistics.mean(r['params'] for r in rs):,.0f}, "
                     f"search {statistics.mean(r['s'] for r in rs):.0f} s")
    return lines

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--config', default='synthetic')
    p.add_argument('--set', nargs='*', default=[], help='config overrides, as in `automtl run --set`')
    p.add_argument('--run-dir', default='/tmp/search_bn')
    a = p.parse_args(argv)
    base = get_config(a.config, **parse_overrides(a.set))
    print(f'search_bn: {a.config}, tasks {",".join(base.tasks)}, seeds {a.seeds}; CPU: {cpu_model()}, '
          f'{os.cpu_count()} cores', flush=True)
    res = {}
    for s in map(int, a.seeds.split(',')):
        res[s] = one_seed(base.replace(seed=s), Path(a.run_dir) / f'seed{s}')
        for bn, r in res[s].items():
            print(f"seed {s} {bn:<11} Δt val {r['val']:+.2f} %, test {r['test']:+.2f} %, params {r['params']:,}, "
                  f"shared layers {r['shared']}, search {r['s']:.0f} s", flush=True)
    print('\n'.join(summary(res)))
    (Path(a.run_dir) / 'search_bn.json').write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
