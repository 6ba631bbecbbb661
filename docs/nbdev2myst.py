"""Turn nbdev's processed notebooks (`_proc/`) into Sphinx + myst-nb sources: one page per notebook, the sidebar
sections and a generated API page.

What nbdev leaves for Quarto and myst-nb reads differently:
- the title cell became raw YAML front matter: it becomes an H1 and a description paragraph;
- `#| echo: false`, `#| output: false` and `#| include: false` are comments in the source: they become myst-nb's
  `remove-input` / `remove-output` tags or drop the cell;
- `show_doc` output is markdown meant for Quarto: it becomes a markdown cell (a real section with a link target),
  without its leading `---`, with `_` escaped in the heading and the `[source]` link marked by a class;
- the nbdev-only cell key `has_sd` is not valid nbformat: it is dropped, and cells get ids.
"""
import importlib, inspect, json, re, shutil
from pathlib import Path

import yaml

SECTIONS = [  # (sidebar caption, notebook file name pattern), in reading order
    ('Concepts', r'[01]\d'), ('Tutorials', r'2\d'), ('Benchmarks', r'3\d'), ('More', r'')]
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_SOURCE_LINK = re.compile(r'^\[source\]\((\S+?)\)\{[^}]*\}\s*$', re.M)
_SD_HEADING = re.compile(r'^(#{2,6}) (\S+)\s*$', re.M)

def split_directives(source:str) -> tuple[dict, str]:
    "The leading `#| key: value` directives of a code cell's `source`, and the code after them"
    lines, dirs = source.splitlines(keepends=True), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        dirs[m.group(1)] = m.group(2)
        lines.pop(0)
    return dirs, ''.join(lines)

def front_matter(cell:dict) -> dict:
    "The YAML front matter nbdev put in a raw `---` cell, or {} for any other cell"
    src = ''.join(cell['source']).strip()
    if cell['cell_type'] != 'raw' or not src.startswith('---'): return {}
    return yaml.safe_load(src.strip('-')) or {}

def md_cell(text:str) -> dict:
    "A markdown cell holding `text`"
    return dict(cell_type='markdown', metadata={}, source=text)

def title_cell(fm:dict) -> dict:
    "The page's H1 and its description, from nbdev's front matter `fm`"
    res = f"# {fm['title']}\n"
    if fm.get('description'): res += f"\n{{.description}}\n{fm['description']}\n"
    return md_cell(res)

def label(page:str, name:str) -> str:
    "The Sphinx link target of the documentation of `name` on `page`"
    return 'api-' + re.sub(r'[^0-9a-z]+', '-', f"{page}-{name}".lower()).strip('-')

def show_doc_markdown(md:str, page:str) -> tuple[str, list[str]]:
    "Rewrite nbdev's `show_doc` markdown `md` for MyST; also return the names it documents"
    md = re.sub(r'^\s*---\s*\n', '', md)
    md = _SOURCE_LINK.sub(r'[source](\1){.sd-source}', md)
    names = _SD_HEADING.findall(md)
    def _heading(m): return f"({label(page, m.group(2))})=\n{m.group(1)} {m.group(2).replace('_', chr(92) + '_')}"
    return _SD_HEADING.sub(_heading, md), [n for _, n in names]

def _markdown_output(cell:dict) -> str|None:
    for o in cell.get('outputs', []):
        if 'text/markdown' in o.get('data', {}): return ''.join(o['data']['text/markdown'])

def convert_cell(cell:dict, page:str) -> tuple[list[dict], list[str]]:
    "The myst-nb cells for one `_proc` cell of `page`, and the names documented by it"
    if fm := front_matter(cell): return [title_cell(fm)], []
    if cell['cell_type'] == 'markdown' and ''.join(cell['source']).startswith('<!-- WARNING: THIS FILE WAS AUTOGEN'):
        return [], []
    cell = {k: v for k, v in cell.items() if k != 'has_sd'}
    if cell['cell_type'] != 'code': return [cell], []
    dirs, code = split_directives(''.join(cell['source']))
    if dirs.get('include') == 'false': return [], []
    md = _markdown_output(cell) if dirs.get('output') == 'asis' else None
    if md is not None and dirs.get('echo') == 'false':
        text, names = show_doc_markdown(md, page)
        return [md_cell(text)], names
    tags = [t for k, t in (('echo', 'remove-input'), ('output', 'remove-output')) if dirs.get(k) == 'false']
    cell = dict(cell, source=code, metadata=dict(cell.get('metadata', {}), tags=tags) if tags else cell['metadata'])
    return [cell], []

def convert_nb(nb:dict, page:str) -> tuple[dict, str, list[str]]:
    "The myst-nb notebook for the `_proc` notebook `nb` of `page`, its title, and the names it documents"
    cells, names, title = [], [], page
    for c in nb['cells']:
        title = front_matter(c).get('title', title)
        new, documented = convert_cell(c, page)
        cells += new
        names += documented
    for i, c in enumerate(cells): c.setdefault('id', f'c{i}')
    meta = {k: v for k, v in nb['metadata'].items() if k != 'widgets'}  # ipywidgets state would load js from a CDN
    return dict(nb, cells=cells, metadata=meta, nbformat=4, nbformat_minor=5), title, names

_MD_LINK = re.compile(r'\]\((https?://[^)\s]+)\)')
_FENCE = re.compile(r'(```.*?```)', re.S)
_CODE_LINK = re.compile(r'\[(`[^`\n]+`)\]\([^)\s]+\)')

def unlink_code(text:str) -> str:
    ("`text` with the markdown links that nbdev's link processor put inside fenced code (a show_doc signature's "
     "parameter comments) turned back into the plain `name` they were made from")
    return ''.join(_CODE_LINK.sub(r'\1', part) if part.startswith('```') else part for part in _FENCE.split(text))

def site_links(text:str, base:str, pages:set, labels:set) -> str:
    ("`text` with its markdown links into the docs published at `base` pointed inside this site "
     "(a show_doc target or a page)")
    def _local(m):
        url = m.group(1)
        if not url.startswith(base): return m.group(0)
        page, _, anchor = url[len(base):].strip('/').partition('#')
        page = page.removesuffix('.html') or 'index'
        if page not in pages: raise ValueError(f"docs: a link points at {url}, but no notebook makes the page {page!r}")
        target = label(page, anchor) if anchor else None
        return f'](#{target})' if target in labels else f']({page}.ipynb)'
    return _MD_LINK.sub(_local, unlink_code(text))

def _local_links(nb:dict, base:str, pages:set, labels:set):
    "Point the links of `nb`'s markdown cells and markdown outputs inside the site (see `site_links`), in place"
    for c in nb['cells']:
        if c['cell_type'] == 'markdown': c['source'] = site_links(''.join(c['source']), base, pages, labels)
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}):
                o['data']['text/markdown'] = site_links(''.join(o['data']['text/markdown']), base, pages, labels)

def page_name(nb:dict, fn:Path) -> str:
    "The page's file name without suffix: nbdev's `output-file` (so URLs match the Quarto site), else the notebook's"
    for c in nb['cells']:
        if out := front_matter(c).get('output-file'): return Path(out).with_suffix('').as_posix()
    return fn.stem

def section_of(fn:Path) -> str:
    "The sidebar caption of notebook `fn`, from its numeric file name prefix"
    return next(cap for cap, pat in SECTIONS if re.match(pat, fn.name))

def toctree(caption:str, entries:list[str]) -> str:
    "A hidden MyST toctree: one sidebar section"
    return f"```{{toctree}}\n:hidden:\n:caption: {caption}\n\n" + '\n'.join(entries) + "\n```\n"

def public_names(mod_name:str) -> list[str]:
    "The names in the `__all__` of module `mod_name`"
    return list(getattr(importlib.import_module(mod_name), '__all__', []))

def summary(obj) -> str:
    "First line of the docstring of a function or class `obj`; for other objects, their type"
    if not callable(obj): return f"constant (`{type(obj).__name__}`)"
    doc = (inspect.getdoc(obj) or '').strip()
    return doc.splitlines()[0] if doc else ('class' if inspect.isclass(obj) else 'function')

def api_page(mod_pages:dict[str, str|None], documented:dict[str, str]) -> str:
    "Markdown of the API page: each module's public names, linked to their `show_doc` targets in `documented`"
    res = ["# API\n", "Every public name of each module (its `__all__`), linked to its documentation.\n"]
    for mod_name, page in mod_pages.items():
        mod = importlib.import_module(mod_name)
        res.append(f"\n## `{mod_name}`\n")
        if page: res.append(f"Documented in {{doc}}`{page}`.\n")
        res.append("\n| name | summary |\n|---|---|")
        for n in public_names(mod_name):
            ref = f"{{ref}}`{n} <{documented[n]}>`" if n in documented else f"`{n}`"
            res.append(f"| {ref} | {summary(getattr(mod, n)).replace('|', chr(92) + '|')} |")
        res.append('')
    return '\n'.join(res)

def lib_modules(lib_name:str) -> dict[str, str]:
    "Each documented module of `lib_name` mapped to its page, from nbdev's `_modidx`"
    d = importlib.import_module(f'{lib_name}._modidx').d['syms']
    res = {}
    for mod, syms in d.items():
        pages = [Path(v[0].split('#')[0]).with_suffix('').as_posix() for v in syms.values() if v[0]]
        res[mod] = pages[0] if pages else None
    return res

def write_site(proc:Path, site:Path, lib_name:str='automtl_nb', base:str|None=None) -> dict:
    """Write the Sphinx sources for the `_proc` notebooks in `proc` into `site`; return {page: title}.
    Links into the docs published at `base` (nbdev's `doc_host` + `doc_baseurl`) are pointed inside the site, and
    `_notebooks.json` maps each page to the notebook it comes from (for the theme's view/edit links)."""
    site.mkdir(parents=True, exist_ok=True)
    fns = sorted((f for f in proc.rglob('*.ipynb')
                  if not any(p.startswith(('_', '.')) for p in f.relative_to(proc).parts)),
                 key=lambda f: (f.stem != 'index', f.relative_to(proc).as_posix()))
    if not fns or fns[0].stem != 'index': raise FileNotFoundError(f"docs: no index.ipynb among the notebooks in {proc}")
    titles, documented, toc = {}, {}, {cap: [] for cap, _ in SECTIONS}
    nbs, sources = {}, {}
    for fn in fns:
        nb = json.loads(fn.read_text(encoding='utf-8'))
        page = page_name(nb, fn)
        sources[page] = fn.relative_to(proc).as_posix()
        nbs[page], titles[page], names = convert_nb(nb, page)
        for n in names: documented.setdefault(n, label(page, n))
        if fn.stem != 'index': toc[section_of(fn)].append(page)
    order = {page: i for i, page in enumerate(titles)}
    mods = lib_modules(lib_name)
    mods = {m: mods[m] if mods[m] in titles else None
            for m in sorted(mods, key=lambda m: (order.get(mods[m], len(order)), m))}
    (site/'api.md').write_text(api_page(mods, documented), encoding='utf-8')
    index = nbs['index']
    trees = ([toctree('Getting started', ['Overview <self>'])]
             + [toctree(cap, pages) for cap, pages in toc.items() if pages])
    index['cells'].append(dict(md_cell('\n'.join(trees + [toctree('API', ['api'])])), id='toctree'))
    if base:
        for nb in nbs.values(): _local_links(nb, base, set(nbs), set(documented.values()))
    (site/'_notebooks.json').write_text(json.dumps(sources, indent=1), encoding='utf-8')
    for page, nb in nbs.items():
        dest = site/f'{page}.ipynb'
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
    copy_assets(proc, site)
    return titles

ASSETS = ('.png', '.svg', '.jpg', '.jpeg', '.gif')

def copy_assets(proc:Path, site:Path):
    "Copy the images the notebooks link to (e.g. `images/policy.png`) from `proc` to the same place under `site`"
    for f in proc.rglob('*'):
        rel = f.relative_to(proc)
        if f.suffix.lower() in ASSETS and not any(p.startswith(('_', '.')) for p in rel.parts):
            (site/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, site/rel)
