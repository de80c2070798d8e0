"""A session whose inputs and output live in buffers on its own device, reused from one denoising step to the next.

For every distinct set of input shapes (a bin, a number of rows, a text length) one slot holds the bound input
and output buffers, allocated once. An input is uploaded only when the array given is not the one uploaded last:
the batch's text conditioning and the bin's positional embedding are the same arrays every step, so they go to the
device once per batch, not per step. Per step the copies are: latents and timesteps up (rows x 4 x h x w and rows
floats), the noise prediction down (rows x 8 x h x w) for the samplers' arithmetic in numpy on the host, a few
hundred kilobytes; with the device step (engine.step_graph) only the timesteps go up. Slots are kept least
recently used first out, within `max_slots` and `max_bytes` of buffers.

With CUDA graphs each slot is one captured graph, replayed through the `gpu_graph_id` run option. Continuous
batching would otherwise make a new shape (and a new capture of a ~2,000-node graph) for every number of rows and
text length, so the caller pads rows to ROW_BUCKETS and text to TEXT_BUCKETS (`graph_shape`); an evicted slot's
graph is released; and the runs that may capture hold `device_lock`, which the VAE decode on the finisher thread
takes too, since stream capture must not see another thread's work on the device.

On the CPU provider the same path runs (and is tested to give the same images as `session.run`); there the bound
buffers are host memory and `OrtValue.numpy()` is a view of the output buffer, so results are copied out before
the next run overwrites them (on a GPU `numpy()` is already the copy to the host).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

ROW_BUCKETS = (1, 2, 4, 8, 16)  # transformer rows a captured graph is made for
TEXT_BUCKETS = (32, 64, 128, 300)  # text lengths a captured graph is made for (the longest T5 text is 300 tokens)
# ONNX Runtime captures a graph id inside its first run: having run once for its allocations, that Run call runs
# again ("Start another run for necessary memory allocation or graph capture") until the graph is captured
CAPTURE_RUNS = 1


def graph_shape(rows: int, text_length: int) -> tuple[int, int]:
    """The (rows, text length) a captured graph is made for: the next buckets up (past the last: as they are)."""
    padded_rows = next((b for b in ROW_BUCKETS if b >= rows), rows)
    padded_text = next((b for b in TEXT_BUCKETS if b >= text_length), text_length)
    return padded_rows, padded_text


@dataclass
class Slot:
    graph_id: int
    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    output: ort.OrtValue
    nbytes: int
    run_options: ort.RunOptions
    runs: int = 0
    uploaded: dict[str, np.ndarray] = field(default_factory=dict)  # the arrays last copied in (kept alive)


class BoundSession:
    def __init__(self, session: ort.InferenceSession, device: str = "cpu", device_id: int = 0,
                 cuda_graphs: bool = False, max_slots: int = 32, max_bytes: int = 4 << 30, shrink: bool = False):
        """`shrink`: hand the device arena back after each run (a memory plan without one)."""
        self.session, self.device, self.device_id, self.cuda_graphs = session, device, device_id, cuda_graphs
        self.shrink = shrink
        self.output_name = session.get_outputs()[0].name
        # least recently used last out: traffic of many shapes must not hold device buffers for all of them
        self.slots: OrderedDict[tuple, Slot] = OrderedDict()
        self.max_slots, self.max_bytes = max_slots, max_bytes
        self.device_lock = threading.Lock()  # held while a run may capture a CUDA graph; the VAE decode takes it
        self._next_graph_id = 1
        self.uploads = 0  # input copies made, for tests and the benchmark

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers the slots hold on the device."""
        return sum(slot.nbytes for slot in self.slots.values())

    def slot(self, inputs: dict[str, tuple[tuple[int, ...], np.dtype]], output_shape: tuple[int, ...]) -> Slot:
        """The bound buffers for these input shapes and dtypes (made, and older ones evicted, when new)."""
        key = tuple((name, tuple(shape), np.dtype(dtype).str) for name, (shape, dtype) in inputs.items())
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            return slot
        nbytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in inputs.values())
        nbytes += int(np.prod(output_shape)) * 4
        while self.slots and (len(self.slots) >= self.max_slots or self.nbytes + nbytes > self.max_bytes):
            self._evict(next(iter(self.slots)))
        binding = self.session.io_binding()
        values = {}
        for name, (shape, dtype) in inputs.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, self.device_id)
            binding.bind_ortvalue_input(name, value)
            values[name] = value
        output = ort.OrtValue.ortvalue_from_shape_and_type(output_shape, np.float32, self.device, self.device_id)
        binding.bind_ortvalue_output(self.output_name, output)
        # a graph id is never reused: an evicted slot's captured graph must not be replayed with new buffers
        slot = self.slots[key] = Slot(self._next_graph_id, binding, values, output, nbytes,
                                      self._run_options(self._next_graph_id))
        self._next_graph_id += 1
        return slot

    def _run_options(self, graph_id: int) -> ort.RunOptions:
        """A slot's run options: its captured graph's id, and arena shrinkage when asked for."""
        options = ort.RunOptions()
        if self.cuda_graphs:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        if self.shrink:
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device_id}")
        return options

    def _evict(self, key: tuple) -> None:
        slot = self.slots.pop(key)
        if self.cuda_graphs and slot.runs:
            self.session.release_captured_graph(slot.graph_id)

    def run(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]) -> np.ndarray:
        """Upload what changed, run, and return the output on the host."""
        slot = self.slot({name: (a.shape, a.dtype) for name, a in feeds.items()}, output_shape)
        self.upload(slot, feeds)
        self.execute(slot)
        out = slot.output.numpy()
        return out.copy() if self.device == "cpu" else out  # on the CPU a view of the buffer the next run reuses

    def upload(self, slot: Slot, feeds: dict[str, np.ndarray]) -> None:
        """Copy host arrays into the slot's buffers, except those given as the very array copied last time."""
        for name, a in feeds.items():
            if slot.uploaded.get(name) is a:
                continue  # the same array as last time: already in the bound buffer
            slot.inputs[name].update_inplace(np.ascontiguousarray(a))
            slot.uploaded[name] = a
            self.uploads += 1

    def execute(self, slot: Slot) -> None:
        """Run on the slot's buffers (the output stays on the device)."""
        if self.cuda_graphs and slot.runs < CAPTURE_RUNS:
            with self.device_lock:
                self.session.run_with_iobinding(slot.binding, slot.run_options)
        else:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        slot.runs += 1

    def close(self) -> None:
        """Release every slot's device buffers, bindings and captured graph (the session goes with its last
        reference)."""
        for key in list(self.slots):
            self._evict(key)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` (itself when it has them): rows a graph runs but nobody reads."""
    if len(array) >= rows:
        return array
    return np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]), array.dtype)])


def pad_conditioning(context: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text states (rows, L, C) and masks (rows, L) padded to `graph_shape`: the extra tokens are masked out (the
    -10000 bias makes their attention weights exactly 0 in float32), the extra rows are ignored."""
    rows, length = graph_shape(*mask.shape)
    padded_context = np.zeros((rows, length, context.shape[2]), context.dtype)
    padded_mask = np.zeros((rows, length), mask.dtype)
    padded_context[: len(context), : context.shape[1]] = context
    padded_mask[: len(mask), : mask.shape[1]] = mask
    return padded_context, padded_mask


def capture_row_buckets(predict: Callable[..., np.ndarray], max_rows: int, latent_shape: tuple[int, int, int],
                        caption_channels: int) -> None:
    """Run `predict(latents, timesteps, context, mask)` on zeros for every row bucket a step of up to `max_rows`
    rows is padded to, often enough that each bucket's CUDA graph is captured (at warm-up, rather than under the
    first requests)."""
    largest = graph_shape(max_rows, 1)[0]
    for rows in (r for r in ROW_BUCKETS if r <= largest):
        context, mask = pad_conditioning(np.zeros((rows, 1, caption_channels), np.float32),
                                         np.ones((rows, 1), np.int64))
        for _ in range(CAPTURE_RUNS):
            predict(np.zeros((rows, *latent_shape), np.float32), np.full(rows, 999.0, np.float32), context, mask)


def transformer_calls(run: Callable[[dict[str, np.ndarray]], np.ndarray], x: np.ndarray, t: np.ndarray,
                      context: np.ndarray, mask: np.ndarray, pos_embed: np.ndarray, split: int | None = None, *,
                      pad: bool = False) -> np.ndarray:
    """The noise prediction of rows `x` at timesteps `t`: one call of `run` (transformer feeds -> output) over every
    row, or one per guidance half when `split` (rows before and after it). `context`/`mask` may have more rows than
    `x` (padding for a captured graph): the extra rows run on zeros and are dropped; `pad`: a half's text is padded
    to a captured graph's shape (graph_shape)."""
    rows = len(x)
    bounds = [0, rows] if split is None else [0, split, rows]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if (a, b) == (0, rows):  # slicing would make new arrays: the bound text would be sent again
            ctx, msk = context, mask
        else:
            ctx, msk = context[a:b], mask[a:b]
            if pad:
                ctx, msk = pad_conditioning(ctx, msk)
        feeds = {"latents": pad_rows(x[a:b], len(ctx)), "timestep": pad_rows(t[a:b], len(ctx)),
                 "encoder_hidden_states": ctx, "encoder_attention_mask": msk, "pos_embed": pos_embed}
        outs.append(run(feeds)[: b - a])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)
