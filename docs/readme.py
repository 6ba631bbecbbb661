"""Write README.md from nbs/index.ipynb: what `nbdev_readme` does, without Quarto.

Markdown cells are copied, code cells become ```python blocks (cells with `#| hide` and the `default_exp` cell are left
out, other directives are dropped), and image paths are made relative to the repository root.

Usage: `python docs/readme.py [--check]` (`--check`: exit 1 if README.md is not what index.ipynb gives)."""
import argparse, re, sys
from pathlib import Path

from execnb.nbio import read_nb

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r'^\s*#\|\s*(.*)$')

def _directives(src:str) -> list:
    "The `#| ...` directive words of a cell's source"
    return [w for line in src.splitlines() if (m := DIRECTIVE.match(line)) for w in m.group(1).split()]

def _code(src:str) -> str:
    "A code cell's source without its directive lines"
    return '\n'.join(l for l in src.splitlines() if not DIRECTIVE.match(l)).strip()

def readme_text(nb_path:Path=ROOT/'nbs'/'index.ipynb', img_prefix:str='nbs/') -> str:
    "The README text for the notebook at `nb_path`"
    parts = []
    for cell in read_nb(nb_path).cells:
        src, direc = cell.source, _directives(cell.source)
        if cell.cell_type == 'markdown':
            parts.append(re.sub(r'\]\((?!https?:|/|#)([^)\s]+\.(?:png|svg|jpg|gif))', rf']({img_prefix}\1',
                                src.strip()))
        elif cell.cell_type == 'code' and not {'hide', 'default_exp'} & set(direc) and _code(src):
            parts.append(f"```python\n{_code(src)}\n```")
    return '\n\n'.join(parts) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='only check that README.md is up to date')
    a = p.parse_args(argv)
    want, readme = readme_text(), ROOT/'README.md'
    if a.check:
        if readme.read_text() != want:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python docs/readme.py`')
        return
    readme.write_text(want)
    print(f'wrote {readme}')

if __name__ == '__main__': main()
