"""What a live preview costs beside the step it follows, measured side by side in one run on one export.

    python -m benchmarks.preview_cost artifacts/default --size 1024 --steps 6

A preview is the data estimate x0 (one multiply-add over the first image's latents, in the sampler's update) drawn
by the export's latent -> RGB map and encoded as a JPEG (engine/preview.py). The ratio is preview time / step time
at the same size; the README's target is 2% of a step of the `small` config at 1024x1024.
"""

from __future__ import annotations

import argparse
import statistics
import time

from engine import Engine, GenerationRequest


def measure(export: str, size: int, steps: int) -> dict:
    engine = Engine.load(export)
    try:
        request = GenerationRequest(prompt="a red circle on a blue background", seed=1, num_inference_steps=steps,
                                    image_size=(size, size), preview_every=1, guidance_scale=4.5)
        generation = engine.prepare(request)
        step_s, preview_s = [], []
        while generation.step_index < steps - 1:  # the last step makes no preview
            t0 = time.perf_counter()
            engine.step([generation])
            t1 = time.perf_counter()
            picture = engine.preview(generation)
            t2 = time.perf_counter()
            assert picture is not None
            step_s.append(t1 - t0)
            preview_s.append(t2 - t1)
        step, preview = statistics.median(step_s[1:] or step_s), statistics.median(preview_s[1:] or preview_s)
        return {"export": export, "size": size, "step_ms": step * 1000, "preview_ms": preview * 1000,
                "ratio": preview / step, "jpeg_bytes": len(picture)}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    r = measure(args.export, args.size, args.steps)
    print(f"{r['export']} at {r['size']}x{r['size']}: a step {r['step_ms']:.1f} ms, drawing its preview "
          f"{r['preview_ms']:.2f} ms ({r['ratio']:.3%} of the step; the previews' own x0 is inside the step), "
          f"a {r['jpeg_bytes']} byte JPEG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
