"""The transformer as three graphs, for the step cache's "blocks" mechanism (engine.step_cache): head (embeddings
and the first n blocks), body (the other blocks) and tail (final norm, projection, unpatchify), exported beside the
whole graph (export.graphs.transformer). Every row of a step runs the head and the tail; only the rows whose head
residual changed enough run the body, the others add the body residual cached at their last computed step.

The parts run as plain sessions (no IO binding or captured graphs): on a GPU each part's inputs and outputs go
through the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from engine.generation import Generation, advance, batch_latents, batch_rows, prompt_rows, row_caches, rows_computing
from engine.manifest import TRANSFORMER_PARTS as PARTS
from engine.manifest import Manifest
from engine.sessions import GraphOpener
from engine.step_cache import BlockRowCache

BODY_INPUTS = ("hidden", "t6", "context", "bias")


class TransformerParts:
    def __init__(self, head: ort.InferenceSession, body: ort.InferenceSession, tail: ort.InferenceSession,
                 run_options: ort.RunOptions | None = None):
        self.head, self.body, self.tail = head, body, tail
        self.run_options = run_options

    @classmethod
    def open(cls, manifest: Manifest, variant: str, graphs: GraphOpener, *, memory_arena: bool = True,
             run_options: ort.RunOptions | None = None) -> TransformerParts:
        """The parts of `variant`'s transformer; a clear error where the export has none for it."""
        having = ["fp32", *(v for v, files in manifest.get("variants", {}).items() if PARTS[0] in files)]
        if PARTS[0] not in manifest["files"] or variant not in having:
            found = f"has them for {having}" if PARTS[0] in manifest["files"] else "has none"
            raise ValueError(f"step_cache_mechanism: \"blocks\" runs the transformer as head, body and tail graphs; "
                             f"this export {found}, not for variant {variant!r} (export with `pixart export "
                             "--head-blocks N`)")
        head, body, tail = (graphs.open(part, memory_arena=memory_arena) for part in PARTS)
        return cls(head, body, tail, run_options)

    def step(self, generations: Sequence[Generation], context: np.ndarray, mask: np.ndarray, pos_embed: np.ndarray,
             latent_channels: int, *, one_call: bool = True) -> None:
        """Engine.step for generations of which some have a step cache: each row's body runs as its history
        decides from its head residual. `context`/`mask`: the batch's text, which may have padding rows after the
        batch's (dropped); `one_call` False: the guidance halves run one after the other."""
        rows = batch_rows(generations)
        x, t = batch_latents(generations)
        noise_pred, body_cached = self.predict(
            x, t, context[: len(x)], mask[: len(x)], pos_embed, lambda residuals: rows_computing(rows, residuals),
            row_caches(rows), None if one_call else prompt_rows(generations))
        advance(generations, noise_pred, latent_channels, body_cached=body_cached)

    def predict(self, x: np.ndarray, t: np.ndarray, context: np.ndarray, mask: np.ndarray, pos_embed: np.ndarray,
                decide: Callable[[np.ndarray], list[bool]], caches: Sequence[BlockRowCache | None],
                split: int | None = None) -> tuple[np.ndarray, list[bool]]:
        """The noise prediction of every row, and which rows took their body's work from `caches` (per row; None:
        the row always computes). `decide` maps the head residuals (rows, tokens, width) to whether each row runs
        the body; `split`: rows before it and after it run as separate calls (guidance halves, one at a time)."""
        head = self._run(self.head, {"latents": x, "timestep": t, "encoder_hidden_states": context,
                                     "encoder_attention_mask": mask}, split, pos_embed=pos_embed)
        computing = decide(head["head_residual"])
        hidden = head["hidden"].copy()
        rows = np.flatnonzero(computing)
        if len(rows):
            body_split = None if split is None else int(np.count_nonzero(rows < split))
            out = self._run(self.body, {name: head[name][rows] for name in BODY_INPUTS}, body_split)["hidden_out"]
            for j, r in enumerate(rows):
                if caches[r] is not None:
                    caches[r].record(head["head_residual"][r], out[j] - head["hidden"][r])
            hidden[rows] = out
        for r, computes in enumerate(computing):
            if not computes:
                hidden[r] += caches[r].reuse()
        noise_pred = self._run(self.tail, {"hidden": hidden, "embedded_timestep": head["embedded_timestep"],
                                           "latents": x}, split)["noise_pred"]
        return noise_pred, [not c for c in computing]

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], split: int | None,
             **shared: np.ndarray) -> dict[str, np.ndarray]:
        """`session` over the rows of `feeds` (in two calls when `split` cuts them), `shared` fed whole to each."""
        rows = len(next(iter(feeds.values())))
        bounds = [0, rows] if split is None or split in (0, rows) else [0, split, rows]
        names = [o.name for o in session.get_outputs()]
        runs = [session.run(None, {**{k: v[a:b] for k, v in feeds.items()}, **shared}, self.run_options)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0]
                for name, parts in zip(names, zip(*runs, strict=True), strict=True)}
