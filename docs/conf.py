"""Sphinx configuration of the offline docs site; `python docs/build.py` writes its sources and runs Sphinx."""
import json
from configparser import ConfigParser
from pathlib import Path

_root = Path(__file__).resolve().parents[1]
_cfg = ConfigParser(); _cfg.read(_root/'settings.ini')
_s = _cfg['DEFAULT']

project = _s['title']
author = _s['author']
copyright = _s['copyright']
version = release = _s['version']

extensions = ['myst_nb', 'sphinx.ext.mathjax']
root_doc = 'index'
exclude_patterns = ['**.ipynb_checkpoints']
suppress_warnings = ['mystnb.unknown_mime_type', 'myst.header']  # show_doc puts `###` under the page's `#`

nb_execution_mode = 'off'            # show the outputs saved in the notebooks (docs/exec_nbs.py saves them)
nb_render_markdown_format = 'myst'   # markdown outputs (e.g. `_repr_markdown_`) get math too
nb_ipywidgets_js = {}                # would load require.js and the widget manager from a CDN
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'attrs_inline', 'attrs_block']
myst_dmath_double_inline = True      # `$$...$$` inside a paragraph is display math too

html_theme = 'furo'
html_title = project
html_static_path = ['static', str(_root/'docs_src'/'static')]  # the latter holds MathJax, copied by build.py
html_css_files = ['custom.css']
html_copy_source = False
html_show_sourcelink = False
mathjax_path = 'mathjax/tex-mml-chtml.js'  # MathJax 3 from npm, served locally (Sphinx's default is a CDN)
exclude_patterns += ['_notebooks.json']
html_theme_options = {'source_repository': _s['git_url'] + '/', 'source_branch': _s['branch'],
                      'source_directory': 'nbs/'}

def _notebook_links(notebooks, pagename, context):
    "View/edit links to the notebook a page comes from (pages are named without the notebooks' number prefix)."
    nb = notebooks.get(pagename)
    repo, branch = _s['git_url'].rstrip('/'), _s['branch']
    context['theme_source_view_link'] = f'{repo}/blob/{branch}/nbs/{nb}?plain=true' if nb else ''
    context['theme_source_edit_link'] = f'{repo}/edit/{branch}/nbs/{nb}' if nb else ''
    if not nb: context['theme_source_repository'] = ''  # a generated page (the API index): no source to link

def setup(app):
    notebooks = json.loads((Path(app.srcdir)/'_notebooks.json').read_text())  # {page: notebook}, from build.py
    app.connect('html-page-context', lambda app, pagename, tmpl, context, doctree:
                _notebook_links(notebooks, pagename, context))
