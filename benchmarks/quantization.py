"""Weight-only quantized T5 (int8, int4: ONNX Runtime's MatMulNBits) against fp16 and torch's fp32, per config.

    python -m benchmarks.quantization --config small [--config full] [--images]

Per text encoder graph: size on disk, resident memory of a loaded session, encode time (two 32-token rows, the
engine's usual call), and against transformers' fp32 T5 on the same weights (`small`; for `full`, whose T5-XXL is
drawn from a seed at export and has no torch copy here, against the fp16 graph): embedding cosine similarity (min
over kept tokens) and relative error, after every block and at the output. `--images`: PSNR of the engine's images
with the quantized T5, and with the int8-weight transformer, against the fp16 ones (same seed; `small` only, the
full transformer at 1024² takes minutes a step on a CPU).

On random weights the end-to-end figures overstate what quantization costs: a random T5's attention is nearly
one-hot, so a small error can flip which token a head attends to, and the flip propagates. The error after the first
block is the fair per-layer figure there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common.paths import RESULTS

SIDE = 1024  # the memory benchmark's export: the same folder serves both


def _with_block_outputs(graph: Path, out: Path) -> Path:
    """A copy of `graph` (sharing its weights file) that also outputs the hidden state after every block."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    names = sorted({v for n in model.graph.node for v in n.output if v.startswith("hidden_")},
                   key=lambda v: int(v.split("_")[1]))
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out.write_bytes(model.SerializeToString())
    return out


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _compare(got: np.ndarray, want: np.ndarray, keep: np.ndarray) -> dict:
    a, b = got[keep].astype(np.float64), want[keep].astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5),
            "relative_error": round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 5),
            "max_abs_error": round(float(np.abs(a - b).max()), 4)}


def measure_config(config: str, images: bool) -> dict:
    import gc

    import onnxruntime as ort

    from benchmarks.memory import EXPORT_OPTIONS
    from benchmarks.models import cached_export
    from engine.manifest import Manifest
    from engine.runtime import release_freed_memory

    checkpoint, export, _ = cached_export(config, SIDE, export_options=EXPORT_OPTIONS)
    manifest = Manifest.load(export)
    rng = np.random.default_rng(1)
    vocab = int(manifest["text_encoder"]["config"]["vocab_size"])
    ids = rng.integers(2, min(vocab, 30000), (2, 32), dtype=np.int64)
    mask = np.ones((2, 32), np.int64)
    mask[1, 20:] = 0
    keep = mask.astype(bool)
    feeds = {"input_ids": ids, "attention_mask": mask}
    reference, reference_name = None, "fp16 graph"
    if config != "full":
        import torch
        from transformers import T5EncoderModel

        t5 = T5EncoderModel.from_pretrained(checkpoint, subfolder="text_encoder", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out = t5(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
        # hidden_states[i] is the input of block i; with our graph's names, hidden_i is the output of block i-1
        reference = {f"hidden_{i}": h.numpy() for i, h in enumerate(out.hidden_states[1:-1], start=1)}
        reference["last_hidden_state"] = out.last_hidden_state.numpy()
        reference_name = "transformers fp32"
        del t5, out
        gc.collect()
    report: dict = {"config": config, "reference": reference_name, "graphs": {}}
    graphs = {"fp16": manifest["files"]["text_encoder"]}
    graphs |= {q: manifest["variants"][q]["text_encoder"] for q in ("int8", "int4")}
    outputs = {}
    for name, file in graphs.items():
        probe = _with_block_outputs(export / file, export / f".probe.{file}")
        before = _rss()
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        loaded = _rss() - before
        session.run(None, feeds)
        started = time.perf_counter()
        for _ in range(3):
            values = session.run(None, feeds)
        seconds = (time.perf_counter() - started) / 3
        outputs[name] = dict(zip([o.name for o in session.get_outputs()], values, strict=True))
        del session
        release_freed_memory()
        probe.unlink()
        report["graphs"][name] = {"bytes_on_disk": manifest.file_bytes(export / file),
                                  "session_rss_bytes": loaded, "encode_seconds": round(seconds, 3)}
    if reference is None:
        reference = outputs["fp16"]
    for name, out in outputs.items():
        entry = report["graphs"][name]
        entry["output"] = _compare(out["last_hidden_state"], reference["last_hidden_state"], keep)
        entry["after_block"] = {k: _compare(v, reference[k], keep)["relative_error"]
                                for k, v in sorted(out.items(), key=lambda kv: kv[0])
                                if k.startswith("hidden_") and k in reference}
    if images and config != "full":
        report["images"] = image_psnr(export)
    return report


def image_psnr(export: Path) -> dict:
    from engine import Engine, GenerationRequest

    request = GenerationRequest(prompt="a red circle on a blue background", negative_prompt="blurry", seed=3,
                                num_inference_steps=8, image_size=(1024, 1024), clean_caption=False)
    sides = {"fp16": ("fp16", "fp16"), "t5_int8": ("fp16", "int8"), "t5_int4": ("fp16", "int4"),
             "transformer_int8": ("fp16-int8", "fp16")}  # (transformer variant, T5 variant)
    pixels = {}
    for name, (transformer, t5) in sides.items():
        engine = Engine.load(export, variant=transformer, text_encoder_variant=t5)
        pixels[name] = engine.generate(request).images[0].pixels.astype(np.float64)
        del engine
    out = {}
    for name in ("t5_int8", "t5_int4", "transformer_int8"):
        mse = float(((pixels[name] - pixels["fp16"]) ** 2).mean())
        out[f"psnr_{name}_vs_fp16_db"] = round(10 * np.log10(255**2 / mse), 2) if mse else float("inf")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", choices=("tiny", "small", "full"))
    p.add_argument("--images", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "quantization.json"))
    args = p.parse_args(argv)
    report = {"command": "python -m benchmarks.quantization " + " ".join(sys.argv[1:] if argv is None else argv),
              "results": [measure_config(c, args.images) for c in (args.config or ["small"])]}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
