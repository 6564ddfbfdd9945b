"""Which emoji count as pictograms of objects, their CLDR names, and the seen / unseen split.

The rule is in :mod:`fusioner.pictograms`: fully-qualified, one code point without U+FE0F, not a
flag, not in the CLDR "Symbols" group, drawn by the font, name not repeated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusioner.errors import ConfigError, DataError
from fusioner.pictograms.glyphs import GlyphAtlas

VS16 = "\ufe0f"

# The CLDR "Symbols" group (emoji-test.txt), first code point of each emoji, as inclusive ranges.
SYMBOL_RANGES: tuple[tuple[int, int], ...] = (
    (0x00A9, 0x00AE),  # copyright, registered
    (0x203C, 0x2049),  # double exclamation, exclamation question mark
    (0x2122, 0x2139),  # trade mark, information
    (0x2194, 0x21AA),  # arrows
    (0x23CF, 0x23CF),
    (0x23E9, 0x23EF),
    (0x23F8, 0x23FA),  # eject, play, pause, record buttons
    (0x24C2, 0x24C2),  # circled M
    (0x25AA, 0x25FE),  # geometric: squares, play / reverse buttons
    (0x2611, 0x2611),  # check box with check
    (0x2622, 0x2623),  # radioactive, biohazard
    (0x2626, 0x2626),
    (0x262A, 0x262A),
    (0x262E, 0x262F),
    (0x2638, 0x2638),  # religion
    (0x2640, 0x2642),  # female, male sign
    (0x2648, 0x2653),  # zodiac
    (0x267B, 0x267F),  # recycling, infinity, wheelchair symbol
    (0x2695, 0x2695),
    (0x269B, 0x269C),  # medical symbol, atom symbol, fleur-de-lis
    (0x26A0, 0x26A0),
    (0x26A7, 0x26AB),  # warning, transgender symbol, white / black circle
    (0x26CE, 0x26CE),
    (0x26D4, 0x26D4),  # Ophiuchus, no entry
    (0x2705, 0x2705),
    (0x2714, 0x2716),
    (0x271D, 0x271D),
    (0x2721, 0x2721),  # marks, crosses
    (0x2733, 0x2734),
    (0x2747, 0x2747),
    (0x274C, 0x2757),  # asterisks, sparkle, marks
    (0x2795, 0x27BF),  # plus, minus, divide, right arrow, curly loops
    (0x2934, 0x2935),
    (0x2B05, 0x2B1C),
    (0x2B55, 0x2B55),  # arrows, large squares, hollow circle
    (0x3030, 0x303D),
    (0x3297, 0x3299),  # wavy dash, part alternation mark, enclosed CJK
    (0x1F170, 0x1F19A),
    (0x1F201, 0x1F251),  # enclosed letters and ideographs (A, OK, SOS, ...)
    (0x1F3A6, 0x1F3A6),
    (0x1F3E7, 0x1F3E7),  # cinema, ATM sign
    (0x1F4A0, 0x1F4A0),
    (0x1F4B1, 0x1F4B2),
    (0x1F4DB, 0x1F4DB),  # diamond with dot, currency, badge
    (0x1F4F3, 0x1F4F6),
    (0x1F500, 0x1F506),
    (0x1F518, 0x1F51F),  # av, brightness, arrows, 18+, keycap 10
    (0x1F520, 0x1F524),
    (0x1F52F, 0x1F52F),
    (0x1F530, 0x1F531),  # input symbols, star, trident
    (0x1F532, 0x1F53D),
    (0x1F549, 0x1F549),
    (0x1F54E, 0x1F54E),  # geometric, om, menorah
    (0x1F6AB, 0x1F6AB),
    (0x1F6AD, 0x1F6B1),
    (0x1F6B3, 0x1F6B3),
    (0x1F6B7, 0x1F6BC),  # signs
    (0x1F6BE, 0x1F6BE),
    (0x1F6C2, 0x1F6C5),
    (0x1F6D0, 0x1F6D0),
    (0x1F6DC, 0x1F6DC),  # signs, wireless
    (0x1F7E0, 0x1F7F0),  # coloured circles and squares, heavy equals sign
    (0x1FAAF, 0x1FAAF),  # khanda
)
# Flags that are single code points; the rest are regional-indicator pairs or tag sequences.
SINGLE_FLAGS = frozenset({0x1F38C, 0x1F3C1, 0x1F3F3, 0x1F3F4, 0x1F6A9})


def _emoji_data() -> dict[str, dict[str, Any]]:
    try:
        import emoji
    except ImportError:
        raise DataError("the pictogram names need the 'emoji' package: pip install emoji") from None
    return emoji.EMOJI_DATA


def _clean_name(cldr: str) -> str:
    # ":rescue_worker’s_helmet:" -> "rescue worker's helmet": ASCII quotes tokenize like text.
    name = cldr.strip(":").replace("_", " ").replace("’", "'").replace("“", '"').replace("”", '"')
    return re.sub(r"\s+", " ", name).strip()


def _is_pictogram(seq: str, status: int) -> bool:
    if status != 2:  # fully qualified only: the other statuses repeat the same emoji
        return False
    base = seq.replace(VS16, "")
    if len(base) != 1:  # flags, keycaps, modifier and ZWJ sequences
        return False
    cp = ord(base)
    return cp not in SINGLE_FLAGS and not any(lo <= cp <= hi for lo, hi in SYMBOL_RANGES)


def pictogram_names() -> list[tuple[str, str]]:
    """``(character, name)`` of every object pictogram the font draws, sorted by name, names unique.

    The character is a single code point (U+FE0F dropped); the rule is in the module docstring.
    """
    atlas = GlyphAtlas(px=32)  # presence needs no detail, and 32 px renders fast
    by_name: dict[str, str] = {}
    for seq, data in sorted(_emoji_data().items()):
        if not _is_pictogram(seq, data["status"]):
            continue
        name, char = _clean_name(data["en"]), seq.replace(VS16, "")
        if name not in by_name and atlas.has_glyph(char):
            by_name[name] = char
    return sorted(((c, n) for n, c in by_name.items()), key=lambda cn: (cn[1].casefold(), cn[1]))


def split_names(
    names: Sequence[str], unseen_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Hold out ``round(unseen_fraction * len(names))`` names: ``(seen, unseen)``, each sorted.

    Depends only on the set of names, the fraction and the seed, not on the order given.
    """
    pool = sorted(set(names))
    if len(pool) != len(names):
        raise DataError(f"split_names: {len(names) - len(pool)} repeated names; names must be unique")
    if not 0.0 < unseen_fraction < 1.0:
        raise ConfigError(f"unseen_fraction must lie in (0, 1), got {unseen_fraction}")
    num_unseen = round(unseen_fraction * len(pool))
    if not 0 < num_unseen < len(pool):
        raise ConfigError(
            f"unseen_fraction={unseen_fraction} of {len(pool)} names leaves "
            f"{num_unseen} unseen and {len(pool) - num_unseen} seen; both need at least one"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    unseen = {pool[i] for i in order[:num_unseen]}
    return [n for n in pool if n not in unseen], sorted(unseen)
