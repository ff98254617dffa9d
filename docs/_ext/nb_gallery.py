"""The notebook gallery of the documentation: a card per notebook, its first plot above its title.

``{notebook-gallery}`` in a page becomes the cards of every page under gallery/notebooks/,
filled in once every notebook has been executed and read, so a new notebook needs no change.
"""

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class _gallery(nodes.General, nodes.Element):
    pass


class NotebookGallery(SphinxDirective):
    """``{notebook-gallery}``: cards for every page under gallery/notebooks/.

    The cards are filled in once every notebook has been executed and read.
    """

    def run(self):
        """A placeholder, replaced when the page is resolved."""
        return [_gallery()]


def _fill_gallery(app, doctree, docname):
    env = app.env
    for placeholder in list(doctree.findall(_gallery)):
        grid = nodes.container(classes=["nb-gallery"])
        for doc in sorted(d for d in env.found_docs if d.startswith("gallery/notebooks/")):
            title = env.titles[doc].astext()
            uri = app.builder.get_relative_uri(docname, doc)
            card = nodes.container(classes=["nb-card"])
            plot = next(iter(env.get_doctree(doc).findall(nodes.image)), None)
            if plot is not None:
                link = nodes.reference("", "", refuri=uri, internal=True)
                link += nodes.image(
                    uri=plot["uri"], alt=title, candidates=plot.get("candidates", {})
                )
                card += nodes.paragraph("", "", link)
            card += nodes.paragraph(
                "", "", nodes.reference(title, title, refuri=uri, internal=True)
            )
            grid += card
        placeholder.replace_self(grid)


def setup(app):
    """Register the directive and the step that fills it in."""
    app.add_node(_gallery)
    app.add_directive("notebook-gallery", NotebookGallery)
    app.connect("doctree-resolved", _fill_gallery)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
