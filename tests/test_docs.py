"""The offline docs website (docs/build.py) checked from its HTML as a reader would see it, plus the pieces of its glue
(docs/nbdev2myst.py) and of the notebook runner (docs/exec_nbs.py) on tiny inputs."""
import importlib, inspect, json, re, shutil, subprocess, sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'docs'))
import build, exec_nbs, nbdev2myst  # noqa: E402  (docs/ is not a package)
from nbdev.doclinks import _nbpath2html  # noqa: E402  (nbdev's notebook -> page name rule)

NBS = ROOT/'nbs'
RAW_TEX = re.compile(r'\$\$|\\(?:sum|frac|mathrm|mathcal|begin\{|left|right)\b')

def notebooks():
    return sorted(f for f in NBS.rglob('*.ipynb')
                  if not any(p.startswith(('_', '.')) for p in f.relative_to(NBS).parts))

def nb_title(fn):
    "The `# Title` of a notebook (its first markdown H1)"
    for c in json.loads(fn.read_text())['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown' and (m := re.match(r'#\s+(.+)', src)): return m.group(1).strip()

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site built once by the one docs command, parsed: {page file name: BeautifulSoup}"
    if shutil.which('npm') is None and build._installed_version(build.SCRATCH/'npm'/'node_modules'/'mathjax') is None:
        pytest.skip("npm is not installed: the docs build needs it to fetch MathJax 3 (apt-get install npm)")
    try: build.npm_mathjax()
    except subprocess.CalledProcessError: pytest.skip("npm could not install MathJax 3: no access to the npm registry")
    out = tmp_path_factory.mktemp('site')/'_docs'
    res = subprocess.run([sys.executable, 'docs/build.py', '--out', str(out)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"docs build failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return ({f.name: BeautifulSoup(f.read_text(encoding='utf-8'), 'html.parser') for f in out.glob('*.html')}
            | {'_dir': out})

def heading_text(h):
    "A heading's text without Sphinx's permalink sign"
    return ''.join(t for t in h.find_all(string=True) if not t.find_parent('a', class_='headerlink')).strip()

def h1(soup): return heading_text(soup.find('h1'))

def test_every_notebook_has_a_page(site):
    for fn in notebooks():
        page = _nbpath2html(fn).name
        assert page in site, f"no page {page} for {fn.name}"
        assert h1(site[page]) == nb_title(fn), f"{page}: H1 is {h1(site[page])!r}, notebook title {nb_title(fn)!r}"

def test_sidebar_follows_reading_order(site):
    sidebar = site['index.html'].find(class_='sidebar-tree')
    captions = [c.get_text(strip=True) for c in sidebar.find_all(class_='caption')]
    want = ['Getting started', 'Concepts', 'Tutorials', 'Benchmarks', 'API']
    assert captions == [c for c in want if c in captions] and {'Getting started', 'Concepts', 'API'} <= set(captions)
    concepts = [a['href'] for a in sidebar.find_all('a', class_='reference')]
    pages = [_nbpath2html(f).name for f in notebooks() if re.match(r'[01]\d', f.name)]
    assert [h for h in concepts if h in pages] == pages

def public_api():
    "(module name, name, object) for every name in each library module's `__all__`"
    for mod_name in sorted(nbdev2myst.lib_modules('automtl_nb')):
        mod = importlib.import_module(mod_name)
        for n in mod.__all__: yield mod_name, n, getattr(mod, n)

def test_every_public_name_is_on_the_api_page(site):
    api = site['api.html'].get_text(' ')
    missing = [f"{m}.{n}" for m, n, _ in public_api() if not re.search(rf'\b{re.escape(n)}\b', api)]
    assert not missing, f"public names missing from api.html: {missing}"

def test_every_public_function_and_class_has_show_doc(site):
    "A function or class defined in a module has a show_doc section on that module's page, linked from the API page"
    pages = nbdev2myst.lib_modules('automtl_nb')
    headings = {p: {heading_text(h) for h in site[f'{p}.html'].find_all(['h2', 'h3', 'h4'])}
                for p in set(pages.values()) if f'{p}.html' in site}
    api_links = {a.get_text(strip=True) for a in site['api.html'].select('td a.reference')}
    undocumented = [f"{m}.{n}" for m, n, o in public_api()
                    if (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == m
                    and not (n in headings.get(pages[m], ()) and n in api_links)]
    assert not undocumented, f"public functions/classes without show_doc: {undocumented}"

def visible_text(soup):
    "Page text a reader sees as prose: without math (MathJax typesets it), code, and scripts"
    soup = BeautifulSoup(str(soup), 'html.parser')
    for el in soup.select('.math, pre, code, script, style'): el.decompose()
    return soup.get_text(' ')

def test_math_is_typeset_locally_not_left_raw(site):
    for page, soup in site.items():
        if page == '_dir': continue
        assert not (m := RAW_TEX.search(visible_text(soup))), f"{page}: raw TeX {m.group(0)!r} outside math"
        loaded = ([t.get('src') for t in soup.find_all('script')]
                  + [t.get('href') for t in soup.find_all('link', rel='stylesheet')])
        remote = [u for u in loaded if u and u.startswith(('http:', 'https:', '//'))]
        assert not remote, f"{page} loads {remote} from the network"
    policy = site['policy.html']
    assert len(policy.select('div.math')) >= 2 and policy.select('span.math')
    assert any(s.get('src', '').startswith('_static/mathjax/tex-mml-chtml.js') for s in policy.find_all('script'))
    assert (site['_dir']/'_static/mathjax/tex-mml-chtml.js').stat().st_size > 500_000
    assert list((site['_dir']/'_static/mathjax/output/chtml/fonts/woff-v2').glob('MathJax_Main-Regular.woff'))

def test_no_execution_errors_and_outputs_shown(site):
    pages = {p: s for p, s in site.items() if p != '_dir'}
    for page, soup in pages.items():
        assert not soup.select('.traceback, .output.error'), f"{page} shows an execution error"
        assert 'Traceback (most recent call last)' not in soup.get_text(), f"{page} shows a traceback"
    assert any(s.select('.cell_output') for s in pages.values()), "no saved cell outputs: run docs/exec_nbs.py"
    assert any(s.select('.cell_output img') for s in pages.values()), "no plot on any page: run docs/exec_nbs.py"

def test_hidden_and_export_cells_are_absent(site):
    for page, soup in site.items():
        if page == '_dir': continue
        text = soup.get_text()
        assert '#| export' not in text and '#| hide' not in text and 'nbdev_export()' not in text, page

# ---------------------------------------------------------------- glue pieces, without a build
def test_split_directives():
    dirs, code = nbdev2myst.split_directives("#| echo: false\n#|output: asis\nshow_doc(f)\n#| not a directive\n")
    assert dirs == {'echo': 'false', 'output': 'asis'}
    assert code == "show_doc(f)\n#| not a directive\n"
    assert nbdev2myst.split_directives("x = 1\n") == ({}, "x = 1\n")

def test_show_doc_markdown():
    md = ("---\n\n[source](https://x/y.py#L3){target=\"_blank\" style=\"float:right\"}\n\n### Reg.__call__\n\n"
          "```python\ndef __call__(self, x)\n```\n\n*The $(L-l)/L$ weights.*\n")
    text, names = nbdev2myst.show_doc_markdown(md, 'policy')
    assert names == ['Reg.__call__']
    assert not text.startswith('---')
    assert '[source](https://x/y.py#L3){.sd-source}' in text and 'target=' not in text
    assert '(api-policy-reg-call)=\n### Reg.\\_\\_call\\_\\_\n' in text
    assert '$(L-l)/L$' in text and 'def __call__(self, x)' in text  # code and math untouched

def test_convert_cell():
    fm = dict(cell_type='raw', metadata={},
              source="---\ndescription: One line\noutput-file: policy.html\ntitle: Policy\n---\n")
    assert nbdev2myst.convert_cell(fm, 'policy')[0][0]['source'] == "# Policy\n\n{.description}\nOne line\n"
    sd = dict(cell_type='code', metadata={}, has_sd=True, execution_count=0,
              source="#| echo: false\n#| output: asis\nshow_doc(f)",
              outputs=[dict(output_type='execute_result', metadata={}, execution_count=0,
                            data={'text/markdown': "---\n\n### f\n", 'text/plain': "<md>"})])
    (cell,), names = nbdev2myst.convert_cell(sd, 'p')
    assert cell['cell_type'] == 'markdown' and names == ['f'] and '### f' in cell['source']
    quiet = dict(cell_type='code', metadata={}, has_sd=True, source="#| echo: false\nplot()", outputs=[])
    (cell,), _ = nbdev2myst.convert_cell(quiet, 'p')
    assert cell['source'] == "plot()" and cell['metadata']['tags'] == ['remove-input'] and 'has_sd' not in cell
    assert nbdev2myst.convert_cell(dict(quiet, source="#| include: false\nx"), 'p') == ([], [])

def test_site_links_point_inside_the_site():
    base, pages, labels = 'https://h.io/lib', {'index', 'policy'}, {'api-policy-gumbel-softmax'}
    text = ("See [`gumbel_softmax`](https://h.io/lib/policy.html#gumbel_softmax), "
            "[`Reg`](https://h.io/lib/policy.html#reg), [the policy page](https://h.io/lib/policy.html), "
            "[home](https://h.io/lib/) and [torch](https://pytorch.org/x).")
    assert nbdev2myst.site_links(text, base, pages, labels) == (
        "See [`gumbel_softmax`](#api-policy-gumbel-softmax), [`Reg`](policy.ipynb), [the policy page](policy.ipynb), "
        "[home](index.ipynb) and [torch](https://pytorch.org/x).")  # a name without show_doc: its page
    with pytest.raises(ValueError, match="no notebook makes the page 'gone'"):
        nbdev2myst.site_links("[x](https://h.io/lib/gone.html)", base, pages, labels)

def test_links_inside_a_signature_become_plain_names_again():
    "nbdev links a backticked name in a show_doc signature's parameter comment; inside code that shows as raw markdown."
    base, pages, labels = 'https://h.io/lib', {'index', 'policy'}, {'api-policy-reg'}
    text = ("Uses [`Reg`](https://h.io/lib/policy.html#reg).\n```python\ndef f(\n"
            "    r, # a [`Reg`](https://h.io/lib/policy.html#reg) or [`Reg`](policy.ipynb)s\n)\n```\n")
    assert nbdev2myst.site_links(text, base, pages, labels) == (
        "Uses [`Reg`](#api-policy-reg).\n```python\ndef f(\n    r, # a `Reg` or `Reg`s\n)\n```\n")

def test_section_of():
    assert [nbdev2myst.section_of(Path(f)) for f in ('03_policy.ipynb', '13_baselines.ipynb', '20_tutorial_nyu.ipynb',
            '31_bench_speed.ipynb', 'extra.ipynb')] == ['Concepts', 'Concepts', 'Tutorials', 'Benchmarks', 'More']

# ---------------------------------------------------------------- docs/exec_nbs.py on a temporary notebook
def write_nb(path, sources):
    cells = [dict(cell_type='code', id=f'c{i}', metadata={}, execution_count=None, outputs=[], source=s)
             for i, s in enumerate(sources)]
    path.write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))

def outputs(path): return [c['outputs'] for c in json.loads(path.read_text())['cells']]

def test_exec_nb_saves_outputs_and_skips_flagged_cells(tmp_path):
    fn = tmp_path/'nb.ipynb'
    write_nb(fn, ["x = 6 * 7\nx", "#| slow\nraise RuntimeError('slow cells are skipped')",
                  "#| eval: false\nraise RuntimeError('eval false')", "print(open('data.txt').read())",
                  "import nbdev\nnbdev.nbdev_export" + "()"])
    (tmp_path/'data.txt').write_text('read from the notebook folder')
    assert exec_nbs.exec_nb(fn, {'slow', 'gpu'}) is None
    outs = outputs(fn)
    assert outs[0][0]['data']['text/plain'] == ['42']
    assert outs[1] == outs[2] == outs[4] == []
    assert outs[3][0]['text'] == ['read from the notebook folder\n']

def test_exec_nb_reports_errors_and_leaves_the_notebook_unchanged(tmp_path):
    fn = tmp_path/'bad.ipynb'
    write_nb(fn, ["1 + 1", "1 / 0"])
    before = fn.read_text()
    err = exec_nbs.exec_nb(fn, set())
    assert 'ZeroDivisionError' in err and fn.read_text() == before

def test_find_nbs(tmp_path):
    for p in ('a.ipynb', 'sub/b.ipynb', '_skip/c.ipynb', '.ipynb_checkpoints/d.ipynb'):
        (tmp_path/p).parent.mkdir(parents=True, exist_ok=True); (tmp_path/p).write_text('{}')
    assert [f.relative_to(tmp_path).as_posix() for f in exec_nbs.find_nbs([tmp_path])] == ['a.ipynb', 'sub/b.ipynb']
    (tmp_path/'a.py').write_text('')
    with pytest.raises(ValueError, match='not a notebook'): exec_nbs.find_nbs([tmp_path/'a.py'])
    with pytest.raises(FileNotFoundError, match='does not exist'): exec_nbs.find_nbs([tmp_path/'missing'])

def test_every_image_is_in_the_site(site):
    "Linked images (the README figure) and plot outputs resolve to files of the site"
    out = site['_dir']
    srcs = {p: [img['src'] for img in s.find_all('img') if not img['src'].startswith(('data:', 'http'))]
            for p, s in site.items() if p != '_dir'}
    assert srcs['index.html'], "the landing page shows no figure"
    for page, ss in srcs.items():
        for src in ss: assert (out/src).is_file(), f"{page}: image {src} is not in the site"

def test_no_link_to_the_unpublished_site_and_view_links_name_the_notebook(site):
    base = build.doc_base()
    for name, soup in site.items():
        if name == '_dir': continue
        assert not [a['href'] for a in soup.find_all('a', href=True) if a['href'].startswith(base)], name
    for nb in notebooks():
        page = _nbpath2html(nb).name
        if page not in site: continue
        views = [a['href'] for a in site[page].select('div.view-this-page a')]
        assert views and views[0].endswith(f'/nbs/{nb.relative_to(NBS).as_posix()}?plain=true'), (page, views)
    assert not site['api.html'].select('div.view-this-page a')  # a generated page has no notebook to show
