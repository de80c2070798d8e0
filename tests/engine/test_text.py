"""engine.text against the references it must match: diffusers' caption cleaning, transformers' T5 tokenizer.

Also the style mechanics of docs/pixart-sigma.md §6 and the determinism of export.tokenizer's training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.text import STYLE_TEMPLATES, T5Tokenizer, apply_style, preprocess
from engine.vocabulary import STYLE_NAMES
from export.tokenizer import DEFAULT_CORPUS, tokenizer_json_for, train_t5_tokenizer

VOCAB_SIZE = 1000
TRAINED_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")

# --------------------------------------------------------------------------------------------------------------------
# (a) caption cleaning == diffusers' PixArtSigmaPipeline._text_preprocessing
# --------------------------------------------------------------------------------------------------------------------

NASTY_CAPTIONS = [
    "A photo of a cat",
    "   Leading and trailing whitespace   ",
    "MiXeD CaSe WoRdS",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "see https://example.com/path?q=1&r=2 for details",
    "visit www.shop.net/item-42 today",
    "http:/broken and ftp://files.org/x",
    "email me at someone@example.org please",
    "<b>bold</b> and <i>italic</i> <a href='x'>link</a>",
    "<person> standing next to <person>",
    "&lt;i&gt;escaped&lt;/i&gt; html",
    "tom &amp; jerry &amp;amp; friends &quot;quoted&quot",
    "&#64;user and &copy; 2020",
    "follow @john_doe and @Jane99 for more",
    "a poster 你好世界 with ひらがな and カタカナ and 한국어",
    "cjk strokes \u31c0\u31c1 and enclosed \u3200 and compat \u3300 end",
    "dashes — – ‒ ― ‐ ﹣ － 〜 〰 here",
    "“curly” ‘single’ «guillemets» `backtick´ ¨umlaut",
    "server at 192.168.0.1 and 10.0.0.255",
    "article 3:45  ",
    "literal \\n escape \\n here",
    "issue #12 and #123456 and #1234",
    "serial 1234567 and phone 5551234",
    "download image_0001.jpg or scan.PDF or photo.webp now",
    "free shipping worldwide free shipping on all orders",
    "free download of the wallpaper, download free",
    "click for details or click on here",
    "wallpaper 1920x1080 and 3840×2160 and 10х20 sizes, 2.5x3.5",
    "see page 12 of the catalogue",
    "product jc6640 and jc6640vc and 6640vc231 and j2d1a2a3b",
    "#sunset #beach #nofilter",
    "***SALE*** [new] {hot} (best) |deal| ~wow~ \\slash/",
    "©®™•·º½¾¿¡§ symbols",
    "this-is-my-cute-cat",
    "this_is_my_cute_cat_photo",
    "only-two-dashes",
    "wait... what.... really",
    '\'\'double quoted\'\' and """triple"""',
    '"a fully quoted caption"',
    "'single quoted caption'",
    "- leading dash",
    "trailing plus+",
    ".hiddenfile",
    "hello ,world and a , b and x : y",
    "one.two,three/four",
    "%20url%20encoded%21 and a+plus",
    "%2540handle",
    "emoji 🐱🔥 party 🎉",
    "mojibake cafÃ© and naÃ¯ve",
    "ﬁne ligature and ①②③ and ｆｕｌｌｗｉｄｔｈ",
    "&lt;i&gt;x&lt;/i&gt;",
    "- - a",
    ",;start",
    ",,'hello",
    "",
    "   ",
    "A 4K photo, 35mm, f/1.8 — shot at 1/8000s; ISO 100!",
    "article 3:45 https://example.com",
    "tag #12345 here",
    "end . start",
    "transparent png images and jpg",
    "go to www:example now",
    "＆amp;amp;lt;z fullwidth ampersand",
    "‘’",
    "‘‘curly double’’",
    "a < b ＆amp;amp;amp;lt; c",  # "<" stops ftfy unescaping, so both html.unescape calls matter
]


@pytest.fixture(scope="module")
def diffusers_pipeline():
    diffusers = pytest.importorskip("diffusers")
    # The method reads only class attributes (the bad-punctuation regex), so no model is needed.
    return object.__new__(diffusers.PixArtSigmaPipeline)


def test_nasty_caption_list_is_large_enough():
    assert len(set(NASTY_CAPTIONS)) >= 40


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "no-clean"])
def test_preprocess_matches_diffusers(diffusers_pipeline, clean):
    expected = diffusers_pipeline._text_preprocessing(NASTY_CAPTIONS, clean_caption=clean)
    got = [preprocess(caption, clean=clean) for caption in NASTY_CAPTIONS]
    mismatches = [(c, e, g) for c, e, g in zip(NASTY_CAPTIONS, expected, got, strict=True) if e != g]
    assert not mismatches


# Pieces that exercise the rules with the most backtracking (hosts, schemes, file names, sizes, word boundaries).
CAPTION_PIECES = ["a", "Z", "1", "9", ".", "-", "_", "/", "@", " ", "x", "х", "×", "%", ":", "com", "co", "it",
                  "http", "https", "www", "png", "jpeg", "é", "٣", "\n", ".com", "http:", "//", "1.5x2", "#1", "'",
                  '"', "<b>", "&amp", ",", "123456", "page 2"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CAPTION_PIECES), max_size=20).map("".join))
def test_preprocess_matches_diffusers_on_generated_captions(diffusers_pipeline, caption):
    # The linear-time rewrites of diffusers' quadratic rules must give diffusers' output on any text.
    assert preprocess(caption) == diffusers_pipeline._text_preprocessing([caption], clean_caption=True)[0]


@pytest.mark.parametrize("unit", ["a.", "1.", "a.com", "www.", "1", "-.", "a1.", "a.png"])
def test_preprocess_work_grows_linearly_on_adversarial_input(unit):
    # diffusers' rules take ~16x the time for 4x the text here (quadratic backtracking; a second per 10,000
    # characters, holding the GIL); linear work takes ~4x. The bound sits between the two.
    def seconds(n: int) -> float:
        text = unit * (n // len(unit))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            preprocess(text)
            best = min(best, time.perf_counter() - t0)
        return best

    small, large = seconds(2500), seconds(10_000)
    assert large < 9 * small + 0.02, (small, large)


def test_preprocess_cleans_twice():
    # Each of these needs the second pass to reach diffusers' result (checked above); one pass leaves residue.
    assert preprocess("&lt;i&gt;x&lt;/i&gt;") == "x< i>"
    assert preprocess("- - a") == "a"
    assert preprocess(",;start") == "start"


def test_preprocess_without_cleaning_only_lowercases_and_strips():
    assert preprocess("  <b>Visit</b> https://X.com #Tag  ", clean=False) == "<b>visit</b> https://x.com #tag"


# --------------------------------------------------------------------------------------------------------------------
# Trained tokenizer (one training per session)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    return train_t5_tokenizer(DEFAULT_CORPUS, tmp_path_factory.mktemp("t5tok"), vocab_size=VOCAB_SIZE, seed=0)


@pytest.fixture(scope="session")
def engine_tokenizer(trained_dir) -> T5Tokenizer:
    return T5Tokenizer.from_dir(trained_dir)


@pytest.fixture(scope="session")
def hf_tokenizers(trained_dir, tmp_path_factory):
    """transformers' tokenizer loaded from the full folder (AutoTokenizer, reads tokenizer.json) and from a copy
    holding only spiece.model and the configs (T5Tokenizer converts the SentencePiece model, as for PixArt)."""
    transformers = pytest.importorskip("transformers")
    spiece_only = tmp_path_factory.mktemp("spiece_only")
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(trained_dir / name, spiece_only / name)
    return {
        "auto": transformers.AutoTokenizer.from_pretrained(str(trained_dir)),
        "from_spiece": transformers.T5Tokenizer.from_pretrained(str(spiece_only)),
    }


def test_training_is_byte_deterministic(trained_dir, tmp_path):
    again = train_t5_tokenizer(DEFAULT_CORPUS, tmp_path / "again", vocab_size=VOCAB_SIZE, seed=0)
    assert sorted(p.name for p in again.iterdir()) == sorted(TRAINED_FILES)
    for name in TRAINED_FILES:
        assert (again / name).read_bytes() == (trained_dir / name).read_bytes(), name


def test_trained_vocabulary_has_t5_layout(engine_tokenizer, hf_tokenizers):
    hf = hf_tokenizers["auto"]
    assert engine_tokenizer.vocab_size == len(hf) == VOCAB_SIZE + 100
    assert hf.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (engine_tokenizer.pad_id, engine_tokenizer.eos_id) == (0, 1)
    # sentinels on top, in reverse: <extra_id_0> is the last id
    assert hf.convert_tokens_to_ids("<extra_id_99>") == VOCAB_SIZE
    assert hf.convert_tokens_to_ids("<extra_id_0>") == VOCAB_SIZE + 99


def test_tokenizer_json_for_converts_spiece_model(trained_dir, tmp_path):
    src = tmp_path / "checkpoint"
    src.mkdir()
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(trained_dir / name, src / name)
    out = tokenizer_json_for(src, tmp_path / "out" / "tokenizer.json")
    assert out.read_bytes() == (trained_dir / "tokenizer.json").read_bytes()
    ids, _, _ = T5Tokenizer.from_file(out).encode(["a red fox"], max_length=8)
    assert ids[0, 0] not in (0, 1, 2)


# --------------------------------------------------------------------------------------------------------------------
# (b) tokenizer == transformers' T5 tokenizer with padding="max_length", truncation=True
# --------------------------------------------------------------------------------------------------------------------


def _pieces(hf, text: str) -> int:
    """Reference length of `text` in ids, `</s>` included, untruncated."""
    return len(hf(text, add_special_tokens=True, truncation=False)["input_ids"])


def _text_of_length(hf, n_ids: int) -> str:
    """A caption that takes exactly n_ids ids (`</s>` included) in the reference tokenizer."""
    words = Path(DEFAULT_CORPUS).read_text(encoding="utf-8").split()
    text = ""
    for word in words * 10:
        candidate = f"{text} {word}".strip()
        length = _pieces(hf, candidate)
        if length == n_ids:
            return candidate
        if length < n_ids:
            text = candidate
    # pad out with one-piece characters if word steps jumped over the target
    while _pieces(hf, text) < n_ids:
        text += " a"
    assert _pieces(hf, text) == n_ids
    return text


@pytest.mark.parametrize("max_length", [300, 16])
def test_encode_matches_transformers(engine_tokenizer, hf_tokenizers, max_length):
    hf = hf_tokenizers["auto"]
    at_limit = _text_of_length(hf, max_length)
    one_over = _text_of_length(hf, max_length + 1)
    texts = [
        "a red fox asleep in the snow",
        "",
        "   ",
        at_limit,
        one_over,
        " ".join(Path(DEFAULT_CORPUS).read_text(encoding="utf-8").split()[:400]),  # far over
        "café naïve ｆｕｌｌｗｉｄｔｈ ﬁ ① émoji 🐱 你好",
        "spaces   and\ttabs\nand newlines",
        "a literal </s> and <extra_id_3> inside",
        "1920x1080, 4k; 35mm f/1.8!",
    ]
    ids, mask, truncated = engine_tokenizer.encode(texts, max_length=max_length)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(texts), max_length)

    for name, hf_tok in hf_tokenizers.items():
        ref = hf_tok(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
        np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"], dtype=np.int64), err_msg=name)
        np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], dtype=np.int64), err_msg=name)
    assert truncated == [_pieces(hf, t) > max_length for t in texts]
    assert truncated[3] is False and truncated[4] is True and truncated[5] is True

    # layout: pieces, then </s>, then <pad>; the mask covers pieces and </s>
    lengths = mask.sum(axis=1)
    for row, n in enumerate(lengths):
        assert ids[row, n - 1] == engine_tokenizer.eos_id
        assert (ids[row, n:] == engine_tokenizer.pad_id).all()
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()
    assert lengths[1] == 1  # "" is just </s>
    assert lengths[3] == lengths[4] == lengths[5] == max_length


def test_encode_edge_cases(engine_tokenizer):
    text = "a single string of several words"
    ids, mask, truncated = engine_tokenizer.encode(text, max_length=4)  # a bare string is one row
    assert ids.shape == (1, 4) and truncated == [engine_tokenizer.count_tokens(text) > 4] == [True]
    ids, mask, truncated = engine_tokenizer.encode([], max_length=300)
    assert ids.shape == mask.shape == (0, 300) and truncated == []
    ids, mask, truncated = engine_tokenizer.encode(["a red fox"], max_length=1)
    assert ids.tolist() == [[1]] and mask.tolist() == [[1]] and truncated == [True]
    with pytest.raises(ValueError):
        engine_tokenizer.encode(["x"], max_length=0)
    assert engine_tokenizer.count_tokens("") == 1


def test_from_dir_requires_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        T5Tokenizer.from_dir(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# (c) styles
# --------------------------------------------------------------------------------------------------------------------


def test_style_names_match_request_schema():
    assert tuple(STYLE_TEMPLATES) == tuple(STYLE_NAMES)


def test_no_style_leaves_text_unchanged():
    assert apply_style("(No style)", "A Cat, in the RAIN", "blurry") == ("A Cat, in the RAIN", "blurry")
    assert apply_style("(No style)", "a cat", "") == ("a cat", "")


@pytest.mark.parametrize("style", [s for s in STYLE_NAMES if s != "(No style)"])
def test_style_wraps_prompt_and_prefixes_negative(style):
    template, style_negative = STYLE_TEMPLATES[style]
    prompt = "a lighthouse at dusk"
    positive, negative = apply_style(style, prompt, "")
    assert "{prompt}" in template and "{prompt}" not in positive
    assert positive == template.replace("{prompt}", prompt)
    assert positive != prompt and positive.count(prompt) == 1
    assert negative == style_negative and negative.strip()
    # the user's negative follows the style's directly, with no separator added
    _, negative = apply_style(style, prompt, "blurry")
    assert negative == style_negative + "blurry"
    # a prompt holding braces or "{prompt}" itself is inserted verbatim
    positive, _ = apply_style(style, "{x} {prompt}", "")
    assert positive == template.replace("{prompt}", "{x} {prompt}")


def test_unknown_style_is_refused():
    with pytest.raises(ValueError):
        apply_style("Watercolour", "a cat", "")
