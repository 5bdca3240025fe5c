"""The page's ES modules import one another only within the versioned asset folder.

pages.Assets serves every static file under /static/<version>/, so a relative
import ("./card.js") resolves to the same version as the page that loaded it. An
absolute one ("/static/card.js") would be a redirect to whatever is current, and a
missing file would only show up as a blank page in a browser.
"""

from __future__ import annotations

import re

from progress_sse.web.pages import Assets, asset_dir

# Static `import … from "x"` and side-effect `import "x"`; dynamic import() is not used.
IMPORT = re.compile(r"""^\s*import\s+(?:[^"';]*?\s+from\s+)?["']([^"']+)["']""", re.MULTILINE)
ASSETS = Assets.load(asset_dir("static"))
MODULES = {name: body.decode() for name, body in ASSETS.files.items() if name.endswith(".js")}


def test_every_import_is_a_sibling_module_that_is_served() -> None:
    imports = {name: IMPORT.findall(source) for name, source in MODULES.items()}
    assert imports["page.js"], "page.js wires the other modules together"
    wrong = [
        f"{name} imports {spec!r}"
        for name, specs in imports.items()
        for spec in specs
        if not (spec.startswith("./") and "/" not in spec[2:] and spec[2:] in MODULES)
    ]
    assert wrong == []


def test_the_page_reaches_every_module_it_ships() -> None:
    reached, todo = set(), ["page.js"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(spec[2:] for spec in IMPORT.findall(MODULES[name]))
    # progress.js is also the client for pages of your own, whether page.js uses it or not.
    assert set(MODULES) - reached - {"progress.js"} == set(), "a module nothing imports"
