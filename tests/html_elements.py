"""What an HTML parser makes of a page (the tests of pages that embed hostile text): every element with its
attributes, the text of each <script>, and the text outside scripts."""

from __future__ import annotations

from html.parser import HTMLParser


class Elements(HTMLParser):
    """Every element the HTML parser sees, with the text of each <script>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def parse_page(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    parser.close()
    return parser
