"""The trained demo's corpus: the Python 3.11 documentation from the Debian archive, as pages of
text and as questions with their answers (scripts/train_demo.py).

- fetch_corpus: the package python3.11-doc (PSF License, see its /usr/share/doc/python3.11-doc/copyright),
  fetched with `apt-get download` (the pinned version when the archive has it) and unpacked with
  `dpkg-deb -x`.
- documents: the main text of every page (Sphinx's <div role="main">), with the standard library's
  html.parser. split: a page is held out when sha256(seed:path) falls in the held-out fraction, so no
  held-out page, and no question made from one, is seen in training.
- qa_pairs: questions and answers made from the pages themselves, in the documentation's words:
  the FAQ pages' questions with their answers; the sections of the tutorial, the HOWTOs, the
  library and language references (their heading turned into a question, the section's first
  paragraphs the answer); every documented function, method, class, exception and attribute (its
  signature and the first paragraphs of its description); the glossary's terms. chat_turn writes
  one as a ChatML conversation whose assistant turn ends with <|im_end|>.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

PACKAGE, PACKAGE_VERSION = "python3.11-doc", "3.11.2-6+deb12u9"
LICENSE = "PSF License Agreement (Python documentation; Debian copyright file of python3.11-doc)"
HTML_ROOT = "usr/share/doc/python3.11/html"
SKIP = re.compile(r"^(genindex|py-modindex|search|_static|_sources|_images|_downloads)")
HELDOUT_FRAC = 0.05

BLOCK = {"p", "div", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
         "section", "table", "ul", "ol", "dl", "blockquote"}
VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


def fetch_corpus(out: Path) -> Path:
    """The package's .deb (cached), unpacked; returns the html folder."""
    cache = out / "corpus"
    cache.mkdir(parents=True, exist_ok=True)
    if not deb_file(out):
        r = subprocess.run(["apt-get", "download", f"{PACKAGE}={PACKAGE_VERSION}"], cwd=cache)
        if r.returncode:
            print(f"{PACKAGE}={PACKAGE_VERSION} not in the archive; taking its candidate version", flush=True)
            subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, check=True)
    x = cache / "x"
    if not (x / HTML_ROOT).is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb_file(out)), str(x)], check=True)
    return x / HTML_ROOT


def deb_file(out: Path) -> Path | None:
    debs = sorted((out / "corpus").glob(f"{PACKAGE}_*.deb"))
    return debs[-1] if debs else None


def pages(html_root: Path):
    """(relative path, html) of every page with text, in a fixed order."""
    for p in sorted(html_root.rglob("*.html")):
        rel = p.relative_to(html_root).as_posix()
        if not SKIP.match(rel):
            yield rel, p.read_text(encoding="utf-8", errors="replace")


# --- pages as text -----------------------------------------------------------------------------

class _MainText(HTMLParser):
    """The text of Sphinx's <div role="main">, blocks separated by newlines; no scripts, styles
    or the pilcrow header links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []   # open elements inside the main div: (tag, skipped)
        self.out: list[str] = []

    def _skipping(self):
        return any(s for _, s in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.stack:
            if tag == "div" and a.get("role") == "main":
                self.stack.append((tag, False))
            return
        if tag in BLOCK:
            self.out.append("\n")
        if tag not in VOID:
            skip = tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or ""))
            self.stack.append((tag, skip))

    def handle_endtag(self, tag):
        if not self.stack or tag in VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.stack and not self._skipping():
            pre = any(t == "pre" for t, _ in self.stack)
            self.out.append(data if pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return _tidy("".join(self.out))


def _tidy(t: str) -> str:
    t = t.replace("\u00b6", "")
    t = "\n".join(ln.rstrip() for ln in t.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def documents(html_root: Path) -> list[tuple[str, str]]:
    docs = []
    for rel, html in pages(html_root):
        parser = _MainText()
        parser.feed(html)
        t = parser.text()
        if len(t) > 200:
            docs.append((rel, t))
    return docs


def held_out(rel: str, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big") / 2**64
    return h < HELDOUT_FRAC


def split(items, seed: int):
    """Items whose first field is a page's path: (training, held out), by page."""
    train, held = [], []
    for it in items:
        (held if held_out(it[0], seed) else train).append(it)
    return train, held


# --- pages as questions and answers ------------------------------------------------------------

class _Node:
    __slots__ = ("tag", "attrs", "kids", "parent")

    def __init__(self, tag: str, attrs: dict, parent):
        self.tag, self.attrs, self.kids, self.parent = tag, attrs, [], parent

    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def children(self, *tags):
        return [k for k in self.kids if isinstance(k, _Node) and k.tag in tags]

    def find_all(self, pred):
        for k in self.kids:
            if isinstance(k, _Node):
                if pred(k):
                    yield k
                yield from k.find_all(pred)


class _Tree(HTMLParser):
    """A page as a tree of _Nodes (html.parser; an unclosed element ends with its parent)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = _Node("root", {}, None)

    def handle_starttag(self, tag, attrs):
        n = _Node(tag, dict(attrs), self.cur)
        self.cur.kids.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.kids.append(data)


def _text(node: _Node, skip=lambda n: False) -> str:
    """A node's text by _MainText's rules; `skip` leaves out the subtrees it accepts."""
    out: list[str] = []

    def walk(n: _Node, pre: bool):
        for k in n.kids:
            if isinstance(k, str):
                out.append(k if pre else re.sub(r"\s+", " ", k))
            elif not (k.tag in ("script", "style", "nav") or (k.tag == "a" and "headerlink" in k.classes()) or skip(k)):
                block = k.tag in BLOCK
                out.append("\n" if block else "")
                walk(k, pre or k.tag == "pre")
                out.append("\n" if block else "")
    walk(node, node.tag == "pre")
    return _tidy("".join(out))


MAX_ANSWER = 700            # characters: an answer and its question fit the 256-token context


def _answer(text: str) -> str:
    """The first paragraphs of `text`, at most MAX_ANSWER characters (a first paragraph that is
    longer: its first sentences)."""
    out = ""
    for para in text.split("\n\n"):
        if len(out) + len(para) + 2 > MAX_ANSWER:
            if not out:
                sentences = re.split(r"(?<=[.!?])\s+", para)
                for s in sentences:
                    if len(out) + len(s) + 1 > MAX_ANSWER:
                        break
                    out = f"{out} {s}" if out else s
            break
        out = f"{out}\n\n{para}" if out else para
    return out.strip()


def _pick(options: list[str], key: str) -> str:
    """One of the phrasings, fixed by the key (deterministic, varied across the corpus)."""
    return options[hashlib.sha256(key.encode()).digest()[0] % len(options)]


_NUMBERED = re.compile(r"^[\d.]+\s+")
_GENERIC = {"examples", "example", "notes", "overview", "introduction", "summary", "usage", "functions",
            "classes", "constants", "exceptions", "methods", "attributes", "recipes", "details",
            "module contents", "reference", "background", "basic usage", "api", "interface"}
_NO_QA_PAGES = re.compile(r"^(whatsnew/|about|bugs|copyright|license|contents|download|index\.html)")
_NO_QA_HEADINGS = {"footnotes", "see also", "contents", "table of contents", "indices and tables"}


def _lower_first(h: str) -> str:
    """'Reading and Writing Files' -> 'reading and writing files'; names and acronyms kept."""
    words = h.split()
    return " ".join(w if (any(c.isupper() for c in w[1:]) or not w[:1].isalpha() or "_" in w or "(" in w)
                    else w.lower() for w in words)


def _section_question(heading: str, title: str, rel: str) -> str | None:
    if heading.endswith("?"):                                   # FAQ
        return heading
    h = _NUMBERED.sub("", heading).strip()
    if not h or h.lower() in _NO_QA_HEADINGS:
        return None
    if m := re.match(r"^([\w.]+) — (.+)$", h):                  # a module's page: "json — JSON encoder and decoder"
        mod = m.group(1)
        return _pick([f"What is the {mod} module?", f"What does the {mod} module do?",
                      f"What is {mod} for in Python?", f"Tell me about the {mod} module."], rel + h)
    topic = _lower_first(h)
    if h.lower() in _GENERIC and title and title != heading:
        topic = f"{topic} in {_NUMBERED.sub('', title).split(' — ')[0]}"
    return _pick([f"Tell me about {topic}.", f"Can you explain {topic}?",
                  f"What does the Python documentation say about {topic}?",
                  f"What should I know about {topic} in Python?", f"Explain {topic}."], rel + h)


def _api_question(kind: str, name: str, key: str) -> str:
    if kind in ("function", "method", "classmethod", "staticmethod", "decorator", "coroutinefunction",
                "coroutinemethod", "abstractmethod"):
        return _pick([f"What does {name}() do?", f"How do I use {name}()?", f"What is {name}() for?",
                      f"Explain {name}()."], key)
    if kind == "exception":
        return _pick([f"What is the {name} exception?", f"When is {name} raised?"], key)
    if kind == "class":
        return _pick([f"What is {name}?", f"What is the {name} class for?", f"How do I use {name}?"], key)
    return _pick([f"What is {name}?", f"What does {name} mean?"], key)


def _api_name(dl: _Node) -> str:
    """An entry's full name: its module and class prefix, or that of the class it is documented in
    ('remove' in Element's entry -> 'Element.remove')."""
    dt = next(iter(dl.children("dt")), None)
    if dt is None:
        return ""
    spans = lambda c: "".join(_text(n) for n in dt.find_all(lambda n: n.tag == "span" and c in n.classes()))  # noqa: E731
    name, prefix = spans("descname"), spans("descclassname")
    if name and not prefix:
        outer = dl.parent
        while outer is not None and not (outer.tag == "dl" and "py" in outer.classes()
                                         and set(outer.classes()) & {"class", "exception"}):
            outer = outer.parent
        if outer is not None and (cls := _api_name(outer)):
            prefix = cls + "."
    return prefix + name


def page_qa(rel: str, html: str) -> list[tuple[str, str, str, str]]:
    """(page, question, answer, kind) made from one page; kind: faq, section, api or glossary."""
    tree = _Tree()
    tree.feed(html)
    main = next(tree.root.find_all(lambda n: n.tag == "div" and n.attrs.get("role") == "main"), None)
    if main is None or _NO_QA_PAGES.match(rel):
        return []
    out = []
    sections = list(main.find_all(lambda n: n.tag == "section"))
    headings = [next(iter(s.children("h1", "h2", "h3", "h4", "h5")), None) for s in sections]
    title = _text(headings[0]) if headings and headings[0] is not None else ""
    api = lambda n: n.tag == "dl" and "py" in n.classes()   # noqa: E731
    for s, h in zip(sections, headings):
        if h is None:
            continue
        heading = _text(h)
        q = _section_question(heading, title, rel)
        # the section's own text: not its subsections, its heading or its API entries' long bodies
        body = _text(s, skip=lambda n: n is h or n.tag == "section" or api(n))
        a = _answer(body)
        if q and len(a) >= 80:
            out.append((rel, q, a, "faq" if heading.endswith("?") else "section"))
    for dl in main.find_all(api):
        kind = dl.classes()[1] if len(dl.classes()) > 1 else "data"
        dt, dd = next(iter(dl.children("dt")), None), next(iter(dl.children("dd")), None)
        if dt is None or dd is None:
            continue
        name = _api_name(dl)
        sig = _text(dt).replace("\n", " ").strip()
        desc = _answer(_text(dd, skip=api))
        if name and len(desc) >= 40:
            out.append((rel, _api_question(kind, name, rel + sig), _answer(f"{sig}\n\n{desc}"), "api"))
    for dl in main.find_all(lambda n: n.tag == "dl" and "glossary" in n.classes()):
        for dt, dd in zip(dl.children("dt"), dl.children("dd")):
            term = _text(dt).strip()
            a = _answer(_text(dd))
            if term and len(a) >= 40:
                out.append((rel, _pick([f"What is {term} in Python?", f"What does '{term}' mean?",
                                        f"Define {term}."], rel + term), a, "glossary"))
    return out


def qa_pairs(html_root: Path) -> list[tuple[str, str, str, str]]:
    """Every page's (page, question, answer, kind), in page order."""
    return [qa for rel, html in pages(html_root) for qa in page_qa(rel, html)]


def chat_prompt(question: str) -> str:
    """The ChatML prompt of one user turn, up to where the assistant's reply starts (the template
    in the GGUF, meki_gguf.tokenizer.CHATML_TEMPLATE, with add_generation_prompt)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def chat_turn(question: str, answer: str) -> str:
    """One conversation in ChatML, the assistant's turn ended by <|im_end|>."""
    return f"{chat_prompt(question)}{answer}<|im_end|>\n"
