"""Run notebooks in place and save their outputs, so the docs site can show them.

Cells are skipped the way `nbdev_test` skips them: cells flagged with a `tst_flags` directive from settings.ini
(`#| slow`, `#| gpu`), `#| eval: false` cells and the closing `nbdev_export()` cell. Skipped cells are saved with no
outputs. Each notebook runs in a fresh Python process from its own folder, with matplotlib's Agg backend; the saved
notebooks are cleaned with `nbdev_clean`.

Usage: `python docs/exec_nbs.py [NOTEBOOK_OR_FOLDER ...] [--n_workers N] [--flags slow]` (default: every notebook in
nbs/). `--flags` runs the cells with those flags too, as `nbdev_test --flags` does: that is how a tutorial's full
(slow) run saves its real outputs.
"""
import argparse, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.clean import nbdev_clean
from nbdev.config import get_config
from nbdev.process import extract_directives

def skip_cell(cell, skip_flags:set) -> bool:
    "Whether `nbdev_test` would skip `cell`: not code, flagged with one of `skip_flags`, `eval: false`, or nbdev_export"
    if cell.cell_type != 'code': return True
    if 'nbdev_export' + '(' in cell.source: return True
    direc = extract_directives(cell, remove=False)
    if direc.get('eval:', [''])[0].lower() == 'false': return True
    return bool(skip_flags & direc.keys())

def exec_nb(fn:Path, skip_flags:set) -> str|None:
    "Execute notebook `fn` in place, skipping cells like `nbdev_test`; return the error text, or None on success"
    os.environ.setdefault('MPLBACKEND', 'Agg')
    fn = Path(fn).resolve()
    nb = read_nb(fn)
    def _preproc(cell):
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
        return skip_cell(cell, skip_flags)
    shell = CaptureShell(fn)
    cwd = Path.cwd()
    try:
        os.chdir(fn.parent)
        shell.run_all(nb, exc_stop=True, preproc=_preproc)
    except Exception: return shell.prettytb(fname=fn)
    finally: os.chdir(cwd)
    write_nb(nb, fn)
    nbdev_clean.__wrapped__(fname=str(fn))

def find_nbs(paths) -> list[Path]:
    "Notebooks named in `paths` (files or folders, searched recursively), skipping `_`- and `.`-prefixed names"
    res = []
    for p in map(Path, paths):
        if not p.exists(): raise FileNotFoundError(f"exec_nbs: {p} does not exist (give notebooks or folders)")
        if p.is_dir(): res += [f for f in sorted(p.rglob('*.ipynb'))
                              if not any(o.startswith(('_', '.')) for o in f.relative_to(p).parts)]
        elif p.suffix == '.ipynb': res.append(p)
        else: raise ValueError(f"exec_nbs: {p} is not a notebook (.ipynb) or a folder")
    return res

def exec_in_subprocess(fn:Path, flags=()) -> str|None:
    "Run `exec_nb` on `fn` in a fresh interpreter (IPython takes over `__main__`); return its error text or None"
    res = subprocess.run([sys.executable, __file__, '--one', str(fn), '--flags', *flags],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else res.stderr + res.stdout

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('paths', nargs='*', help="notebooks or folders (default: nbs_path from settings.ini)")
    ap.add_argument('--n_workers', type=int, default=min(2, os.cpu_count() or 1), help="notebooks run at once")
    ap.add_argument('--flags', nargs='*', default=[], help="test flags whose cells run too, e.g. slow")
    ap.add_argument('--one', help=argparse.SUPPRESS)  # internal: execute this notebook in the current process
    args = ap.parse_args(argv)
    cfg = get_config()
    if args.one:
        err = exec_nb(args.one, set(cfg.tst_flags.split()) - set(args.flags))
        if err: sys.stderr.write(err)
        return 1 if err else 0
    fns = find_nbs(args.paths or [cfg.nbs_path])
    with ThreadPoolExecutor(max(1, args.n_workers)) as ex:
        errs = list(ex.map(lambda f: exec_in_subprocess(f, args.flags), fns))
    failed = [(fn, e) for fn, e in zip(fns, errs) if e is not None]
    for fn, e in failed: sys.stderr.write(f"\n=== {fn} failed; it was not changed ===\n{e}\n")
    print(f"exec_nbs: {len(fns) - len(failed)} notebooks executed, {len(failed)} failed")
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
