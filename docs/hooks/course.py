"""MkDocs hook: the course's notebooks as pages of the site.

docs/course is a link to notebooks/, so the notebooks are pages (mkdocs-jupyter renders them
with their stored outputs) and notebooks/README.md is the course's index. This hook does the
three things that link alone does not:

- the nav: mkdocs.yml names only the course's index (`The course: course/README.md`); the
  notebooks that exist, `course/NN-name.ipynb`, are added after it in the order of their
  numbers, each titled by its first heading. A nav that named all twelve would break the
  build while one is being written or renamed.
- links inside notebooks: nbconvert writes a notebook's markdown cells as HTML, which MkDocs
  neither rewrites nor checks. A relative link there is written as it works on GitHub (from
  notebooks/: `05-the-kv-cache.ipynb`, `../docs/parallelism.md#how-a-step-runs`); here it
  becomes the link to that page of the site, and a link to anything that is not part of the
  site (`../tinyinfer/llm.py`: put such paths in backticks, or use an absolute URL) is a
  warning, so `mkdocs build --strict` fails on it as on a broken link in a page.
- a download link to the notebook's .ipynb (mkdocs-jupyter's include_source copies it next
  to the page), under each notebook's title.
"""

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.course")

COURSE = "course"  # the notebooks' folder in the site (docs/course -> ../notebooks)
NAV_TITLE = "The course"
# a relative href or src: no scheme (http:, data:, mailto:), not an anchor, not site-absolute
RELATIVE_LINK = re.compile(r'\b(href|src)="(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^"#?]+)([#?][^"]*)?"')


def on_config(config):
    """Add the notebooks that exist to the course's section of the nav."""
    notebooks = sorted(path.name for path in Path(config.docs_dir, COURSE).glob("[0-9][0-9]-*.ipynb"))
    for item in config.nav or []:
        if isinstance(item, dict) and item.get(NAV_TITLE) == f"{COURSE}/README.md":
            item[NAV_TITLE] = [f"{COURSE}/README.md", *(f"{COURSE}/{name}" for name in notebooks)]
    return config


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    name = posixpath.basename(page.file.src_uri)

    def site_link(match):
        attribute, target, rest = match.group(1), match.group(2), match.group(3) or ""
        # where the link points in the repository, seen from notebooks/, then that file in the site
        in_repo = posixpath.normpath(posixpath.join("notebooks", target))
        if in_repo.startswith("notebooks/"):
            src_uri = f"{COURSE}/{in_repo.removeprefix('notebooks/')}"
        elif in_repo.startswith("docs/"):
            src_uri = in_repo.removeprefix("docs/")
        else:
            src_uri = None
        file = files.get_file_from_path(src_uri) if src_uri else None
        if file is None:
            log.warning(f"Notebook '{name}' links to '{target}', which is not a page or file of the site "
                        "(write a repository path in backticks, or link to an absolute URL)")
            return match.group(0)
        return f'{attribute}="{file.url_relative_to(page.file)}{rest}"'

    html = RELATIVE_LINK.sub(site_link, html)
    download = (f'<p><a href="{name}" download>Download {name}</a>, stored with its outputs, or run it from a '
                'checkout: <code>jupyter lab notebooks/</code></p>')
    if "</h1>" in html:  # under the notebook's title
        return html.replace("</h1>", "</h1>\n" + download, 1)
    return download + html


def on_page_markdown(markdown, page, config, files):
    """The course's index (notebooks/README.md) links to the docs as GitHub sees them,
    `../docs/architecture.md`; in the site that page is `../architecture.md`."""
    if page.file.src_uri.startswith(f"{COURSE}/"):
        return markdown.replace("](../docs/", "](../")
    return markdown
