"""Text side of the engine: caption cleaning, style templates and T5 tokenization, with no torch in sight.

* `preprocess` reproduces the caption clean-up PixArt-Sigma's diffusers pipeline runs before tokenizing
  (docs/pixart-sigma.md §2.3 step 1): a fixed sequence of rewrites, applied twice.
* `apply_style` wraps a prompt in one of the style templates of the public API (docs/pixart-sigma.md §6).
* `T5Tokenizer` turns cleaned prompts into the fixed-length id/mask arrays the T5 encoder takes
  (docs/pixart-sigma.md §2.3 step 2), from a `tokenizer.json` that the export step ships.
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import tokenizers
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

from engine.vocabulary import STYLE_NAMES

# Captions that look like a URL or a file name make BeautifulSoup warn; the text it returns is the same either way.
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)

# --------------------------------------------------------------------------------------------------------------------
# Caption cleaning
# --------------------------------------------------------------------------------------------------------------------

# Each step rewrites the whole caption: mostly regex substitutions made by `_rule`, plus a few plain functions
# (URL unquoting, HTML to text, ftfy, entity unescaping). They run in table order, and the order matters.
_Step = Callable[[str], str]

_MEDIA_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_URL_TLDS = "com|co|ru|net|org|edu|gov|it"
# Dash-like code points that all become "-": hyphen-minus, Armenian/Hebrew hyphens, Canadian syllabics hyphen,
# Mongolian todo hyphen, U+2010..U+2015, several supplemental-punctuation dashes, wave dashes and the
# small/fullwidth hyphen-minus forms.
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
)
# Punctuation and symbols that become a single space, runs included.
_BAD_PUNCTUATION = "#®•©™&@·º½¾¿¡§~)(][}{|\\/*"
# CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility, extension A, Yijing hexagrams and
# the unified ideographs: together the contiguous block U+31C0..U+9FFF, deleted outright.
_CJK = "\u31c0-\u9fff"


def _rule(pattern: str, replacement: str = "") -> _Step:
    compiled = re.compile(pattern)
    return lambda text: compiled.sub(replacement, text)


def _url_pattern(scheme_alternative: str) -> str:
    # A scheme-like prefix (e.g. "https:" followed by slashes or a character), or a dotted host on one of a few
    # top-level domains with an optional path, not directly followed by "@".
    return (
        r"\b((?:" + scheme_alternative + r":(?:\/{1,3}|[a-zA-Z0-9%])"
        r"|[a-zA-Z0-9.\-]+[.](?:" + _URL_TLDS + r")[\w/-]*\b\/?(?!@)))"
    )


_HOST_RUN = re.compile(r"[a-zA-Z0-9.\-]+")
_WORD_BOUNDARY = re.compile(r"\b")


def _url_rule(scheme_alternative: str) -> _Step:
    """`re.sub(_url_pattern(...), "", text)`, in time linear in the text rather than quadratic.

    Run as one regex, the dotted-host alternative is retried at every word start of a long run of host characters
    ("a.a.a.a..."), and each try scans to the end of the run: 10,000 characters took about a second, holding the
    GIL. But if it fails at a start s, it fails at every later start in the same run of host characters (any
    match from there is also one from s, the host part reaching back over the characters in between). So after
    one failure only the scheme alternative is tried until the run ends. Same matches, same output.
    """
    full = re.compile(_url_pattern(scheme_alternative))
    scheme_only = re.compile(r"\b(?:" + scheme_alternative + r":(?:\/{1,3}|[a-zA-Z0-9%]))")

    def apply(text: str) -> str:
        pieces, kept_from, start, host_dead_until = [], 0, 0, -1
        while start < len(text):
            dead = start < host_dead_until
            m = (scheme_only if dead else full).match(text, start)
            if m is not None:
                pieces.append(text[kept_from : m.start()])
                kept_from = start = m.end()
                continue
            if not dead and _WORD_BOUNDARY.match(text, start):
                run = _HOST_RUN.match(text, start)
                host_dead_until = run.end() if run else start
            start += 1
        pieces.append(text[kept_from:])
        return "".join(pieces)

    return apply


def _html_to_text(text: str) -> str:
    return BeautifulSoup(text, features="html.parser").text


_JOINERS = re.compile(r"[-_]")


def _split_joined_words(text: str) -> str:
    # "this-is-my-cute-cat", "this_is_my_cute_cat": more than three joiners and they all become spaces.
    if len(_JOINERS.findall(text)) > 3:
        return _JOINERS.sub(" ", text)
    return text


# _FILE_NAME_NOTE: diffusers' file-name rule is [\S]+\.(ext), which from every start in a long run of non-space
# scans to the run's end: quadratic. The lookbehind changes no match: a match from inside a run is also one from the
# run's start (the greedy [\S]+ ends at the same last ".ext"), and once a match ends inside a run nothing after
# it in that run can match (there is no later ".ext"), so matches always begin where runs begin.
_CLEANING_STEPS: tuple[_Step, ...] = (
    str,
    urllib.parse.unquote_plus,
    lambda text: text.strip().lower(),
    _rule(r"<person>", "person"),
    _url_rule(r"https?"),
    _url_rule(r"www"),
    _html_to_text,
    _rule(r"@[\w\d]+\b"),  # @handles
    _rule("[" + _CJK + "]+"),
    _rule("[" + _DASHES + "]+", "-"),
    _rule("[`´«»“”¨]", '"'),
    _rule("[‘’]", "'"),
    _rule(r"&quot;?"),
    _rule(r"&amp"),
    _rule(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    _rule(r"\d:\d\d\s+$"),  # trailing article ids
    _rule(r"\\n", " "),  # a literal backslash-n
    _rule(r"#\d{1,3}\b"),
    _rule(r"#\d{5,}\b"),
    _rule(r"\b\d{6,}\b"),
    # file names; a match can only begin where a run of non-space begins (see _FILE_NAME_NOTE)
    _rule(r"(?<!\S)[\S]+\.(?:" + _MEDIA_EXTENSIONS + ")"),
    _rule(r"[\"']{2,}", '"'),
    _rule(r"[.]{2,}", " "),
    _rule("[" + re.escape(_BAD_PUNCTUATION) + "]+", " "),
    _rule(r"\s+\.\s+", " "),
    _split_joined_words,
    ftfy.fix_text,
    html.unescape,
    html.unescape,
    # product codes: letters+digits, letters+digits+letters, digits+letters+digits
    _rule(r"\b[a-zA-Z]{1,3}\d{3,15}\b"),
    _rule(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"),
    _rule(r"\b\d+[a-zA-Z]+\d+\b"),
    # shop boilerplate
    _rule(r"(worldwide\s+)?(free\s+)?shipping"),
    _rule(r"(free\s)?download(\sfree)?"),
    _rule(r"\bclick\b\s(?:for|on)\s\w+"),
    _rule(r"\b(?:" + _MEDIA_EXTENSIONS + r")(\simage[s]?)?"),
    _rule(r"\bpage\s+\d+\b"),
    _rule(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # mixed codes such as j2d1a2a
    # sizes: 1920x1080, 10х20 (Cyrillic ha), 3×4. diffusers writes each side as \d+\.?\d*, which matches the same
    # strings in the same order of preference, but tries every split of a long digit run in two: quadratic.
    _rule(r"\b\d+(?:\.\d*)?[xх×]\d+(?:\.\d*)?\b"),
    # spacing
    _rule(r"\b\s+\:\s+", ": "),
    _rule(r"(\D[,\./])\b", r"\1 "),
    _rule(r"\s+", " "),
    # No strip here: a caption that now starts with a space keeps it through the four rules below.
    _rule(r"^[\"']([\w\W]+)[\"']$", r"\1"),
    _rule(r"^['_,\-:;]"),
    _rule(r"['_,\-:\-+]$"),
    _rule(r"^\.\S+$"),
    str.strip,
)


def _clean_caption(text: str) -> str:
    for step in _CLEANING_STEPS:
        text = step(text)
    return text


def preprocess(text: str, clean: bool = True) -> str:
    """The text diffusers' PixArt-Sigma pipeline tokenizes for `text` (`_text_preprocessing`, one string).

    clean=True: the caption clean-up, run twice as the pipeline does. clean=False: lower-cased and stripped.
    """
    if not clean:
        return text.lower().strip()
    return _clean_caption(_clean_caption(text))


# --------------------------------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------------------------------

# name -> (positive template holding "{prompt}", negative prompt put in front of the user's negative prompt)
STYLE_TEMPLATES: dict[str, tuple[str, str]] = {
    "(No style)": ("{prompt}", ""),
    "Cinematic": (
        "cinematic film still of {prompt} . moody and emotional, soft vignette, rich detail, big-budget production, "
        "shallow focus bokeh, anamorphic widescreen, dramatic epic grading, subtle film grain",
        "cartoon, anime, illustration, graphic design, text, painting, crayon, glitch, deformed, ugly",
    ),
    "Photographic": (
        "cinematic photograph of {prompt} . shot on 35mm film, creamy bokeh, professional photography, 4k, "
        "sharp and highly detailed",
        "drawing, painting, sketch, crayon, impressionist, noisy, blurry, soft focus, deformed, ugly",
    ),
    "Anime": (
        "anime illustration of {prompt} . anime style, key visual art, vivid colors, studio animation quality, "
        "finely detailed",
        "photo, photorealistic, realism, monochrome, black and white, deformed, low contrast",
    ),
    "Manga": (
        "manga panel of {prompt} . bold ink lines, dynamic high-energy action, iconic framing, japanese comic art, "
        "vibrant",
        "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, western comic style",
    ),
    "Digital Art": (
        "digital concept art of {prompt} . digital painting, illustrative, painterly brushwork, matte painting, "
        "highly detailed",
        "photo, photorealistic, realism, ugly",
    ),
    "Pixel art": (
        "pixel art scene of {prompt} . low resolution, chunky square pixels, blocky shapes, 8-bit game graphics",
        "sloppy, messy, blurry, noisy, fine detail, intricate texture, photo, realistic",
    ),
    "Fantasy art": (
        "dreamlike fantasy painting of {prompt} . grand and celestial, painterly, epic scale, majestic, magical, "
        "book cover art, ethereal",
        "photo, photographic, realistic, realism, 35mm film, dslr, cropped, out of frame, text, bad anatomy, "
        "extra limbs, disfigured face, duplicate, mutated, black and white",
    ),
    "Neonpunk": (
        "neonpunk artwork of {prompt} . cyberpunk, vaporwave, glowing neon, vibrant, sleek futuristic design, "
        "magenta highlights, deep purple shadows, high contrast, cinematic, intricate, professional",
        "painting, drawing, illustration, glitch, deformed, cross-eyed, ugly",
    ),
    "3D Model": (
        "professional 3d render of {prompt} . octane render, highly detailed, volumetric light, dramatic lighting",
        "ugly, deformed, noisy, low poly, blurry, painting",
    ),
}
if tuple(STYLE_TEMPLATES) != tuple(STYLE_NAMES):  # pragma: no cover - a programming error, caught at import
    raise RuntimeError("STYLE_TEMPLATES and engine.vocabulary.STYLE_NAMES list different styles")


def apply_style(style: str, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """(positive, negative) for `style`: the template with `{prompt}` replaced by the prompt, and the style's
    negative prompt followed directly (no separator added) by the user's negative prompt."""
    try:
        template, style_negative = STYLE_TEMPLATES[style]
    except KeyError:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLE_NAMES)}") from None
    return template.replace("{prompt}", prompt), style_negative + negative_prompt


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.json"


class T5Tokenizer:
    """T5 tokenization as the pipeline calls it: padding to max_length, truncation, `</s>` appended.

    Each row is the text's pieces (cut to max_length - 1 so the end token always fits), then `</s>`, then `<pad>`
    up to max_length; the mask is 1 over the pieces and `</s>`, 0 over the padding.
    """

    PAD_TOKEN = "<pad>"
    EOS_TOKEN = "</s>"

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        # Length handling is done here, so any padding/truncation saved in the file is switched off.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        pad_id = tokenizer.token_to_id(self.PAD_TOKEN)
        eos_id = tokenizer.token_to_id(self.EOS_TOKEN)
        if pad_id is None or eos_id is None:
            raise ValueError(f"tokenizer lacks {self.PAD_TOKEN} or {self.EOS_TOKEN}; not a T5 tokenizer")
        self.pad_id: int = pad_id
        self.eos_id: int = eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> T5Tokenizer:
        """Load a `tokenizer.json` (the `tokenizers` library's serialization)."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def from_dir(cls, folder: str | Path) -> T5Tokenizer:
        """Load `tokenizer.json` from a folder (an exported engine's, or a checkpoint's tokenizer folder)."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (export.tokenizer.tokenizer_json_for makes one)")
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def count_tokens(self, text: str) -> int:
        """Number of ids `text` takes before truncation, `</s>` included."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids) + 1

    def encode(self, texts: Sequence[str] | str, max_length: int = 300) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """input_ids (B, max_length) int64, attention_mask (B, max_length) int64, and whether each text was cut."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for {self.EOS_TOKEN}), got {max_length}")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        room = max_length - 1
        input_ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), max_length), dtype=np.int64)
        truncated: list[bool] = []
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            pieces = encoding.ids
            truncated.append(len(pieces) > room)
            pieces = pieces[:room]
            n = len(pieces)
            input_ids[row, :n] = pieces
            input_ids[row, n] = self.eos_id
            attention_mask[row, : n + 1] = 1
        return input_ids, attention_mask, truncated
