"""T5 tokenizer files for export: a `tokenizer.json` the torch-free engine can load, and a small locally trained
T5-style tokenizer for tests and tiny random-weight pipelines.

* `tokenizer_json_for(folder, out)` turns a T5 checkpoint's tokenizer folder (the real PixArt-Sigma one ships only
  `spiece.model` and two JSON configs) into the `tokenizer.json` that `engine.text.T5Tokenizer` reads. The
  conversion is transformers' own, so the engine tokenizes exactly as the diffusers pipeline does.
* `train_t5_tokenizer(corpus, out)` trains a SentencePiece unigram model on a caption corpus and lays it out as a
  T5 tokenizer checkpoint folder (`spiece.model`, `tokenizer_config.json`, `special_tokens_map.json`,
  `tokenizer.json`): ids 0/1/2 are `<pad>`/`</s>`/`<unk>` and the 100 sentinels `<extra_id_99>` .. `<extra_id_0>`
  take the ids just above the SentencePiece vocabulary, as in T5.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

from engine.vocabulary import MAX_SEQUENCE_LENGTH

SPIECE_FILE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CONFIG_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "captions.txt"

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
NUM_SENTINELS = 100
# The pipeline always tokenizes to this length; saved as the checkpoint's default.
MODEL_MAX_LENGTH = MAX_SEQUENCE_LENGTH


def sentinel_tokens(n: int = NUM_SENTINELS) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _load_transformers_t5(folder: Path):
    # The tokenizers-backed class: in transformers 5 it is `T5Tokenizer` itself (what diffusers loads), in 4.x the
    # fast twin of the SentencePiece one; either way it carries the `tokenizers` pipeline to serialize.
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder))


def tokenizer_json_for(checkpoint_tokenizer_dir: Path, out_path: Path) -> Path:
    """Write the `tokenizer.json` that transformers builds for a T5 tokenizer folder, converting `spiece.model`.

    The result is what transformers itself tokenizes with after loading that folder (normalizer, pre-tokenizer,
    vocabulary with the sentinels, added special tokens); padding and truncation are left off, the engine applies
    them per call. When the folder holds `spiece.model`, that file is the source even if a `tokenizer.json` is
    already there.
    """
    src = Path(checkpoint_tokenizer_dir)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="t5tok-") as tmp:
        folder = src
        if (src / SPIECE_FILE).is_file():
            # Load from a copy without tokenizer.json, so transformers converts the SentencePiece model.
            folder = Path(tmp)
            for name in (SPIECE_FILE, *CONFIG_FILES):
                if (src / name).is_file():
                    shutil.copyfile(src / name, folder / name)
        elif not (src / TOKENIZER_JSON).is_file():
            raise FileNotFoundError(f"{src} holds neither {SPIECE_FILE} nor {TOKENIZER_JSON}")
        backend = _load_transformers_t5(folder).backend_tokenizer
        backend.no_padding()
        backend.no_truncation()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    return out_path


def _train_sentencepiece(lines: list[str], vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    # Determinism: a fixed generator seed, one thread (multi-threaded EM sums in varying order), and sentences
    # fed from memory so no file path ends up in the model's trainer spec.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        # T5's id layout: no BOS, and pad/eos/unk as ids 0/1/2
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece=PAD,
        eos_piece=EOS,
        unk_piece=UNK,
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        byte_fallback=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def train_t5_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a SentencePiece unigram model of `vocab_size` pieces (pad/eos/unk included) on the corpus (one text a
    line) and save it as a T5 tokenizer folder; the full vocabulary is vocab_size + 100 sentinels.

    Reruns with the same corpus, size and seed write byte-identical files. Returns `out_dir`.
    """
    lines = [line.strip() for line in Path(corpus).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{corpus} has no text")
    model = _train_sentencepiece(lines, vocab_size, seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPIECE_FILE).write_bytes(model)

    sentinels = sentinel_tokens()
    _write_json(
        out_dir / SPECIAL_TOKENS_MAP,
        {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": sentinels},
    )
    _write_json(
        out_dir / TOKENIZER_CONFIG,
        {
            "tokenizer_class": "T5Tokenizer",
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "extra_ids": NUM_SENTINELS,
            "additional_special_tokens": sentinels,
            "model_max_length": MODEL_MAX_LENGTH,
            "legacy": True,
            "sp_model_kwargs": {},
        },
    )
    tokenizer_json_for(out_dir, out_dir / TOKENIZER_JSON)
    return out_dir
