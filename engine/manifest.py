"""The export -> engine contract: `manifest.json`, written by `pixart export`, checked by the engine at load.

An export folder is read only through `Manifest.load`, which refuses an unknown format, a manifest that lacks what
this engine needs, missing graph files, and (with `verify=True`) files whose SHA-256 differs from the one recorded,
each with a message that says what to do, instead of a KeyError halfway through loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "manifest.json"
FORMAT = "pixart-sigma-onnx/1"
COMPONENTS = ("text_encoder", "transformer", "vae_decoder", "tokenizer")
# optional: the transformer cut in three, for the step cache's "blocks" mechanism (engine.transformer_parts)
TRANSFORMER_PARTS = ("transformer_head", "transformer_body", "transformer_tail")
# the default graph set per execution provider (first found in the export), else "fp32", the plain graphs
PREFERRED_VARIANTS = {"CUDAExecutionProvider": ("fp16", "optimized"), "TensorrtExecutionProvider": ()}


class ManifestError(ValueError):
    """An export folder this engine cannot use; the message says why and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = False) -> Manifest:
        folder = Path(folder)
        path = folder / FILE
        if not path.is_file():
            raise ManifestError(f"{path} not found: not an export folder (make one with `pixart export --out DIR`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc.msg}); re-export the model") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise ManifestError(f"{path} has format {found!r}; this engine reads {FORMAT!r}: re-export the model")
        missing = [key for key in ("files", "transformer", "text_encoder", "vae", "scheduler", "aspect_ratio_bins")
                   if key not in data] + [f"files.{c}" for c in COMPONENTS if c not in data.get("files", {})]
        if missing:
            raise ManifestError(f"{path} lacks {', '.join(missing)}: it was written by an older exporter; re-export")
        manifest = cls(folder, data)
        for name in manifest.every_file():
            if not (folder / name).is_file():
                raise ManifestError(f"{folder / name} is named in the manifest but missing; re-export the model")
        if verify:
            manifest.verify_hashes()
        return manifest

    def every_file(self) -> list[str]:
        names = list(self.data["files"].values())
        names += [f for graphs in self.data.get("variants", {}).values() for f in graphs.values()]
        return list(dict.fromkeys(names))

    def verify_hashes(self) -> None:
        for name, entry in self.data.get("hashes", {}).items():
            if sha256(self.folder / name) != entry["sha256"]:
                raise ManifestError(f"{self.folder / name} does not match the SHA-256 in the manifest: a changed or "
                                    "partly copied export; copy it again or re-export")

    def variants(self) -> list[str]:
        return ["fp32", *self.data.get("variants", {})]

    def files(self, variant: str | None = None, overrides: dict[str, str] | None = None,
              provider: str = "CPUExecutionProvider") -> tuple[str, dict[str, Path]]:
        """(variant, component -> path): the named variant's graphs over the plain ones. The default depends on the
        provider: on CUDA "fp16" where exported (fp32 attention cannot use flash attention, and fp32 matmuls fall to
        TF32); on TensorRT the plain graphs (it makes its own fp16 and fusions, and `pixart build-engines` builds
        from them); elsewhere "optimized" where exported. `overrides` takes single components from other variants,
        e.g. {"text_encoder": "int4"}."""
        variants = self.data.get("variants", {})
        preferred = PREFERRED_VARIANTS.get(provider, ("optimized",))
        variant = variant or next((v for v in preferred if v in variants), "fp32")
        if variant != "fp32" and variant not in variants:
            raise ManifestError(f"variant: this export has {self.variants()}, not {variant!r}")
        names = {**self.data["files"], **variants.get(variant, {})}
        for component, other in (overrides or {}).items():
            if other == "fp32":
                names[component] = self.data["files"][component]
            elif component not in variants.get(other, {}):
                having = [v for v, graphs in variants.items() if component in graphs]
                raise ManifestError(f"{component}_variant: this export has {component} in {['fp32', *having]}, "
                                    f"not {other!r} (export it with `pixart export`)")
            else:
                names[component] = variants[other][component]
        return variant, {component: self.folder / name for component, name in names.items()}

    def file_bytes(self, path: Path) -> int:
        """Bytes of a graph with its external weights, as it will be loaded."""
        data = path.with_name(path.name + ".data")
        return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)
