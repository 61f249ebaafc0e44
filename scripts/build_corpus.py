#!/usr/bin/env python3
"""Rebuilds the bundled corpus switchjax/data/corpus/corpus.jsonl.xz.

Sources (Debian bookworm packages, fetched with `apt-get download`):
  bible-kjv-text + bible-kjv  King James Bible (public domain); the `bible`
                              program of bible-kjv decodes its compressed text.
  python3.11-doc              Python 3.11 documentation, HTML (PSF License).

One JSON record per line: {"id": str, "text": str}. A document is a natural
unit: one Bible chapter, or one top-level section of a documentation page
(short sections are merged into the next one). Records are written in a fixed
order with fixed xz settings, so the same packages give the same bytes.

  sudo apt-get update   # once
  python scripts/build_corpus.py [--workdir /tmp/switchjax_corpus]
"""
import argparse
import glob
import html.parser
import io
import json
import lzma
import os
import re
import subprocess
import sys

PACKAGES = ("bible-kjv-text", "bible-kjv", "python3.11-doc")
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "switchjax", "data", "corpus", "corpus.jsonl.xz")

# The `bible` program's book abbreviations, in canonical order.
BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers",
    "Deu": "Deuteronomy", "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth",
    "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms",
    "Prv": "Proverbs", "Eccl": "Ecclesiastes", "SSol": "Song of Solomon",
    "Isa": "Isaiah", "Jer": "Jeremiah", "Lam": "Lamentations",
    "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel",
    "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah",
    "Nahum": "Nahum", "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai",
    "Zec": "Zechariah", "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark",
    "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans",
    "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians",
    "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians",
    "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy",
    "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon",
    "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter",
    "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")

# Index, search and table-of-contents pages hold no prose.
_SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents|index)\.html$")
_BLOCK = {"p", "div", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt",
          "dd", "tr", "table", "blockquote", "dl", "ul", "ol", "section",
          "figure", "caption", "br"}
_MIN_DOC_CHARS = 400  # shorter sections are merged into the next one


def fetch_packages(workdir):
  """apt-get downloads the .deb files into workdir and unpacks them."""
  root = os.path.join(workdir, "root")
  debs = []
  for pkg in PACKAGES:
    found = sorted(glob.glob(os.path.join(workdir, f"{pkg}_*.deb")))
    if not found:
      subprocess.run(["apt-get", "download", pkg], cwd=workdir, check=True)
      found = sorted(glob.glob(os.path.join(workdir, f"{pkg}_*.deb")))
    debs.append(found[-1])
  for deb in debs:
    subprocess.run(["dpkg", "-x", deb, root], check=True)
  return root, [os.path.basename(d) for d in debs]


def bible_documents(root):
  """One document per chapter: 'Genesis 1' then one verse per line."""
  out = subprocess.run(
      [os.path.join(root, "usr/bin/bible"), "-f", "-p",
       os.path.join(root, "usr/lib"), "gen1:1-rev22:21"],
      check=True, capture_output=True, text=True).stdout
  chapters = {}  # insertion-ordered: canonical order
  for line in out.splitlines():
    m = _VERSE.match(line)
    if not m:
      raise ValueError(f"unexpected line from `bible`: {line!r}")
    book, chapter, _, verse = m.groups()
    key = (BOOKS[book], int(chapter))
    chapters.setdefault(key, []).append(verse.strip())
  if len(chapters) != 1189:
    raise ValueError(f"expected 1189 chapters of the KJV, got {len(chapters)}")
  for (book, chapter), verses in chapters.items():
    yield {"id": f"kjv/{book}/{chapter}",
           "text": f"{book} {chapter}\n\n" + "\n".join(verses)}


class _SphinxText(html.parser.HTMLParser):
  """Plain text of a Sphinx page's main body, cut at top-level sections.

  Produces `self.sections`: a list of (anchor, text); a new one starts at each
  <section> nested at most two deep (the page and its h2 sections).
  """

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.sections = []
    self._anchor = ""
    self._parts = []
    self._in_body = False
    self._div_depth = 0  # divs open inside the main body div
    self._section_depth = 0
    self._skip_depth = 0  # >0 inside headerlinks, scripts, styles
    self._pre_depth = 0

  def _flush(self, new_anchor):
    text = _clean("".join(self._parts))
    if text:
      self.sections.append((self._anchor, text))
    self._anchor, self._parts = new_anchor, []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if not self._in_body:
      if tag == "div" and attrs.get("role") == "main":
        self._in_body = True
      return
    if tag == "div":
      self._div_depth += 1
    if self._skip_depth:
      if tag in ("a", "script", "style"):
        self._skip_depth += 1
      return
    if tag in ("script", "style") or (
        tag == "a" and "headerlink" in (attrs.get("class") or "")):
      self._skip_depth = 1
      return
    if tag == "section":
      self._section_depth += 1
      anchor = attrs.get("id", "")
      if self._section_depth <= 2:
        if len(_clean("".join(self._parts))) >= _MIN_DOC_CHARS:
          self._flush(anchor)
        elif not self._anchor:
          self._anchor = anchor
    if tag == "pre":
      self._pre_depth += 1
    if tag in _BLOCK:
      self._parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3",
                                           "h4", "h5", "h6", "dl") else "\n")

  def handle_endtag(self, tag):
    if not self._in_body:
      return
    if self._skip_depth:
      if tag in ("a", "script", "style"):
        self._skip_depth -= 1
      if tag == "div":
        self._div_depth -= 1
      return
    if tag == "div":
      if self._div_depth == 0:
        self._in_body = False  # end of the main body
        return
      self._div_depth -= 1
    if tag == "section":
      self._section_depth -= 1
    if tag == "pre":
      self._pre_depth -= 1
    if tag in _BLOCK:
      self._parts.append("\n")

  def handle_data(self, data):
    if not self._in_body or self._skip_depth:
      return
    if self._pre_depth:
      self._parts.append(data.replace("\n", "\x00"))  # keep code lines
    else:
      self._parts.append(re.sub(r"\s+", " ", data))

  def close(self):
    super().close()
    self._flush("")


def _clean(text):
  lines = [ln.strip(" ").replace("\x00", "\n") for ln in text.split("\n")]
  text = "\n".join(lines)
  text = re.sub(r"\n{3,}", "\n\n", text)
  return text.strip()


def python_doc_documents(root):
  html_dir = os.path.join(root, "usr/share/doc/python3.11/html")
  pages = []
  for dirpath, dirnames, filenames in os.walk(html_dir):
    dirnames[:] = [d for d in dirnames if not d.startswith("_")]
    for f in filenames:
      rel = os.path.relpath(os.path.join(dirpath, f), html_dir)
      if f.endswith(".html") and not _SKIP_PAGES.match(rel):
        pages.append(rel)
  for rel in sorted(pages):
    with open(os.path.join(html_dir, rel), encoding="utf-8") as f:
      parser = _SphinxText()
      parser.feed(f.read())
      parser.close()
    sections = parser.sections
    # A short tail section joins the one before it.
    if len(sections) > 1 and len(sections[-1][1]) < _MIN_DOC_CHARS:
      anchor, text = sections[-2]
      sections[-2:] = [(anchor, text + "\n\n" + sections[-1][1])]
    for anchor, text in sections:
      yield {"id": f"python3.11-doc/{rel}#{anchor}", "text": text}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/switchjax_corpus",
                      help="where the .deb files are downloaded and unpacked")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  root, debs = fetch_packages(os.path.abspath(args.workdir))
  docs = list(bible_documents(root)) + list(python_doc_documents(root))
  ids = [d["id"] for d in docs]
  if len(set(ids)) != len(ids):
    raise ValueError("duplicate document ids")
  buf = io.StringIO()
  for d in docs:
    buf.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")
  raw = buf.getvalue().encode("utf-8")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "wb") as f:
    # No filename or timestamp inside xz: the bytes depend on the text only.
    f.write(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
  chars = sum(len(d["text"]) for d in docs)
  print(f"{len(docs)} documents, {chars / 1e6:.1f}M characters, "
        f"{len(raw) / 1e6:.1f} MB jsonl -> {os.path.getsize(args.out) / 1e6:.2f}"
        f" MB xz at {args.out}\nfrom {', '.join(debs)}", file=sys.stderr)


if __name__ == "__main__":
  main()
