"""Build the docs website offline into `_docs/`: nbdev's processed notebooks rendered by Sphinx + myst-nb + Furo.

Quarto users get the same site from `nbdev_docs` (configured by nbs/_quarto.yml). This build needs no Quarto:
1. nbdev's own doc processors (`nbdev.serve.proc_nbs`) write `_proc/`: hidden and export cells dropped, `show_doc`
   added and run for every exported name, the title cell turned into YAML front matter.
2. `docs/nbdev2myst.py` rewrites `_proc/` into Sphinx input in `docs_src/site/`, adds the sidebar sections and the
   generated API page.
3. MathJax 3 is installed from npm into `docs_src/npm/` (once) and served from the site itself: no CDN.
4. `sphinx-build` renders the site with the outputs saved in the notebooks (see docs/exec_nbs.py).

Usage: `python docs/build.py [--out DIR] [--strict]`.
"""
import argparse, os, shutil, subprocess, sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
SCRATCH = ROOT/'docs_src'
MATHJAX_VERSION = '3.2.2'
# The part of the npm package the site loads: the combined TeX/MathML component, its fonts and lazily loaded parts
MATHJAX_PARTS = ['tex-mml-chtml.js', 'output/chtml/fonts', 'input/tex/extensions', 'ui', 'a11y', 'adaptors', 'sre']

def npm_mathjax(npm_dir:Path=SCRATCH/'npm', version:str=MATHJAX_VERSION) -> Path:
    "Path of the MathJax `es5` folder, installed from the npm registry into `npm_dir` unless already there"
    pkg = npm_dir/'node_modules'/'mathjax'
    if not _installed_version(pkg) == version:
        npm = shutil.which('npm')
        if npm is None: raise RuntimeError("docs build: npm is needed to install MathJax 3 (`apt-get install npm`)")
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, 'install', '--prefix', str(npm_dir), '--no-audit', '--no-fund', '--no-save',
                        f'mathjax@{version}'], check=True, stdout=subprocess.DEVNULL)
    return pkg/'es5'

def _installed_version(pkg:Path) -> str|None:
    import json
    f = pkg/'package.json'
    return json.loads(f.read_text())['version'] if f.exists() else None

def copy_mathjax(es5:Path, dest:Path):
    "Copy the parts of MathJax the site loads from `es5` into `dest`"
    for part in MATHJAX_PARTS:
        src = es5/part
        if src.is_dir(): shutil.copytree(src, dest/part)
        elif src.exists(): (dest/part).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dest/part)

def process_nbs() -> Path:
    "Run nbdev's doc processors over the notebooks into `_proc/` (without the Quarto install `nbdev_proc_nbs` does)"
    from nbdev.serve import proc_nbs
    try: return proc_nbs(force=True)
    except Exception as e:
        raise RuntimeError(f"docs build: nbdev's doc processors failed: {e}\nnbdev runs every cell that contains an "
            "import (and no others, besides exports and show_doc) to render show_doc; a cell that also uses names "
            "from other cells fails there: move its imports to the notebook's imports cell or to a cell of their own"
        ) from e

def sphinx_build(src:Path, out:Path, strict:bool=False):
    "Render the Sphinx sources in `src` into `out` with docs/conf.py"
    cmd = [sys.executable, '-m', 'sphinx', '-q', '-b', 'html', '-E', '-c', str(DOCS), '-d', str(SCRATCH/'doctrees'),
           str(src), str(out)]
    if strict: cmd += ['-W', '--keep-going']
    subprocess.run(cmd, check=True)

def doc_base() -> str:
    "Where nbdev's doc links point: `doc_host` + `doc_baseurl` from settings.ini"
    from nbdev.config import get_config
    cfg = get_config()
    return cfg.doc_host.rstrip('/') + '/' + cfg.doc_baseurl.strip('/')

def build(out:Path=ROOT/'_docs', strict:bool=False) -> Path:
    "Build the website into `out` and return it"
    sys.path[:0] = [str(DOCS), str(ROOT)]  # this checkout's package, not another installed copy
    from nbdev2myst import write_site
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    es5 = npm_mathjax()
    proc = process_nbs()
    site, static = SCRATCH/'site', SCRATCH/'static'  # docs/conf.py serves `static` beside docs/static
    for d in (site, static):
        if d.exists(): shutil.rmtree(d)
    write_site(proc, site, base=doc_base())
    copy_mathjax(es5, static/'mathjax')
    html = SCRATCH/'html'  # myst-nb writes its output images beside the Sphinx output folder: keep them in SCRATCH
    for d in (html, out):
        if d.exists(): shutil.rmtree(d)
    sphinx_build(site, html, strict=strict)
    shutil.move(html, out)
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, default=ROOT/'_docs', help="where the site is written (default: _docs/)")
    ap.add_argument('--strict', action='store_true', help="fail on any Sphinx warning")
    args = ap.parse_args(argv)
    out = build(args.out.resolve(), strict=args.strict)
    print(f"docs: site written to {out}/index.html")

if __name__ == '__main__': main()  # the guard matters: proc_nbs starts worker processes
