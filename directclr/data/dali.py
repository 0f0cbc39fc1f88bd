"""DALI backend: decode once per image (GPU "mixed" decoder on CUDA, CPU otherwise), two views.

The random parameters of both views are drawn in Python from a per-sample seed of (seed, epoch,
index), exactly like the torchvision backend's, and fed to DALI as per-sample argument inputs.
So a batch does not depend on DALI's own RNG streams: resuming mid-epoch reproduces the
uninterrupted run, and ranks and epochs behave as in torchvision. Jitter gets identity
parameters when not applied; grayscale, blur and solarize are per-sample conditional branches
(the blur window follows sigma, as PIL's blur in the torchvision backend does).

Everything runs ahead of the consumer, across epoch ends: a thread reads the files (or the
samples of WebDataset shards, by offset: shards.py) and draws the parameters of the next batches
(about 24 ms per 256 ImageNet JPEGs on one core), PREFETCH batches are fed and scheduled before
the one being trained on is taken, and DALI's own threads (its own CUDA stream on GPU) decode and
augment them while the training step runs.

DALI decodes a JPEG with damaged entropy data without a word (images.py), so the first time a
loader reads a file, it reads its header and checks it as the torchvision backend checks every
decode: the same files fail, with the same error. The check costs about 0.5 ms per ImageNet
JPEG on one core, about 11 core-minutes over ImageNet's 1.28M files, spread over num_threads
threads and paid in the first epoch only: every epoch would cost that again each time, and
checking when the index is built would hold the start back by it. A file damaged after its
first read is caught only where DALI itself fails on it (a truncated one).
"""
from __future__ import annotations

import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .images import CorruptImageError, checked_size, first_bad
from .recipe import Recipe

FLAGS = ("gray", "blur", "solarize")  # per-sample booleans that select a branch
PREFETCH = 2  # batches in DALI's hands while the consumer works on the current one

def _crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box as relative (y0, x0, y1, x1)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width
    # Fallback as torchvision: a centre crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    y0, x0 = (height - h) // 2, (width - w) // 2
    return y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width


def view_params(recipe: Recipe, view: int, rng: np.random.Generator, height: int, width: int):
    """One view's random parameters, identity where an augmentation is not applied."""
    y0, x0, y1, x1 = _crop_box(rng, height, width, recipe.crop_scale)
    flip = int(rng.random() < recipe.flip_p)
    b, c, s, h = recipe.jitter
    if rng.random() < recipe.jitter_p:
        jitter = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c),
                  rng.uniform(1 - s, 1 + s), rng.uniform(-h, h) * 360.0)  # DALI hue: degrees
    else:
        jitter = (1.0, 1.0, 1.0, 0.0)
    gray = rng.random() < recipe.grayscale_p
    blur = rng.random() < recipe.blur_p[view]
    sigma = rng.uniform(*recipe.blur_sigma) if blur else 0.0
    solarize = rng.random() < recipe.solarize_p[view]
    return {"roi_start": (y0, x0), "roi_end": (y1, x1), "flip": flip, "jitter": jitter,
            "gray": gray, "blur": blur, "sigma": sigma, "solarize": solarize}


class _Preparer:
    """A thread that makes the inputs of consecutive batches from `start` on, across epochs, and
    queues (key, indices, inputs or None, error or None) up to PREFETCH ahead."""

    def __init__(self, source: "DaliSource", loader, start: tuple[int, int]):
        self._source, self._loader, self._start = source, loader, start
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dali-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loader, (epoch, b) = self._loader, self._start
        order = None
        while not self._stop.is_set():
            if b == len(loader):
                epoch, b = epoch + 1, 0
            if order is None or order[0] != epoch:
                order = (epoch, loader.order(epoch).tolist())
            indices = order[1][b * loader.batch_size:(b + 1) * loader.batch_size]
            try:
                item = ((epoch, b), indices, self._source._inputs(
                    [(epoch, i) for i in indices]), None)
            except Exception as err:  # reported when this batch is due
                item = ((epoch, b), indices, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            b += 1

    def get(self):
        return self._queue.get()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class DaliSource:
    """Feeds encoded files and per-sample parameters into one DALI pipeline per loader."""

    PARAMS = ("roi_start", "roi_end", "flip", "brightness", "contrast", "saturation_jitter",
              "hue", "gray", "blur", "sigma", "solarize")

    def __init__(self, index, recipe: Recipe, image_size: int, num_threads: int, seed: int,
                 device: torch.device):
        self.index, self.recipe, self.image_size = index, recipe, image_size
        self.num_threads, self.seed, self.device = num_threads, seed, device
        self._pipe = None
        self._sizes: dict[int, tuple[int, int]] = {}  # of the files read and checked so far
        self._checker = ThreadPoolExecutor(max(1, num_threads),
                                           thread_name_prefix="image-check")
        # ((epoch, batch), sample indices, None or the error that kept it from being fed) of
        # the batches fed and scheduled, oldest first
        self._in_flight: deque[tuple[tuple[int, int], list[int], Exception | None]] = deque()
        self._preparer: _Preparer | None = None  # makes the inputs of the batches to feed
        self._primed = False  # the first schedule_run prefetches PREFETCH fed batches at once
        self._waiting = 0  # batches fed before that first run
        self._last_inputs: dict[str, list[np.ndarray] | np.ndarray] = {}

    def _build(self, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        recipe, size = self.recipe, self.image_size

        @pipeline_def(batch_size=batch_size, num_threads=max(1, self.num_threads),
                      device_id=(self.device.index or 0) if gpu else None,
                      prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True,
                      enable_conditionals=True)
        def two_views():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
            decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                        output_type=types.RGB)
            outputs = []
            for view in range(2):
                p = {name: fn.external_source(
                    name=f"v{view}_{name}", dtype=types.BOOL if name in FLAGS else types.FLOAT,
                    ndim=1 if name.startswith("roi") else 0)
                    for name in self.PARAMS if self._used(view, name)}
                image = fn.resize(decoded, size=(size, size), roi_start=p["roi_start"],
                                  roi_end=p["roi_end"], roi_relative=True,
                                  interp_type=types.INTERP_CUBIC, antialias=True)
                image = fn.flip(image, horizontal=fn.cast(p["flip"], dtype=types.INT32))
                image = fn.color_twist(image, brightness=p["brightness"],
                                       contrast=p["contrast"],
                                       saturation=p["saturation_jitter"], hue=p["hue"])
                # Grayscale as torchvision's (ITU-R 601 luma in all three channels):
                # saturation=0 in color_twist leaves the channels a level apart.
                if p["gray"]:
                    luma = fn.color_space_conversion(image, image_type=types.RGB,
                                                     output_type=types.GRAY)
                    image = fn.cat(luma, luma, luma, axis=2)
                if "blur" in p and p["blur"]:  # per-sample branch: the costliest operator
                    image = fn.gaussian_blur(image, sigma=p["sigma"])
                pixels = fn.cast(image, dtype=types.FLOAT)
                if "solarize" in p and p["solarize"]:
                    bright = fn.cast(pixels >= float(recipe.solarize_threshold),
                                     dtype=types.FLOAT)
                    pixels = pixels + bright * (255.0 - 2.0 * pixels)
                outputs.append(fn.crop_mirror_normalize(
                    pixels, dtype=types.FLOAT, output_layout="CHW",
                    mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std]))
            return outputs[0], outputs[1], labels

        pipe = two_views()
        pipe.build()
        return pipe

    def _used(self, view: int, name: str) -> bool:
        """Whether the graph has this input (DALI drops inputs that nothing reads)."""
        if name in ("blur", "sigma"):
            return self.recipe.blur_p[view] > 0
        if name == "solarize":
            return self.recipe.solarize_p[view] > 0
        return True

    def _inputs(self, keys: list[tuple[int, int]]) -> dict[str, list[np.ndarray] | np.ndarray]:
        """One batch's external-source inputs: encoded files, labels, both views' parameters.
        Pure Python and file reads, no DALI: it may run ahead of the pipeline. Fixed-shape
        inputs are one array each (batch first), which DALI takes far faster than a list of
        per-sample arrays."""
        files = {i: self.index.read(i) for _, i in keys}
        new = [i for i in files if i not in self._sizes]
        sizes = self._checker.map(checked_size, [self.index.name(i) for i in new],
                                  [files[i] for i in new])
        self._sizes.update(zip(new, sizes))
        encoded, labels = [], []
        params = {f"v{v}_{name}": [] for v in range(2) for name in self.PARAMS
                  if self._used(v, name)}
        for epoch, i in keys:
            encoded.append(np.frombuffer(files[i], dtype=np.uint8))
            labels.append(self.index.labels[i])
            rng = np.random.default_rng([self.seed, epoch, i])
            height, width = self._sizes[i]
            for view in range(2):
                v = view_params(self.recipe, view, rng, height, width)
                values = {"roi_start": v["roi_start"], "roi_end": v["roi_end"],
                          "flip": v["flip"], "brightness": v["jitter"][0],
                          "contrast": v["jitter"][1], "saturation_jitter": v["jitter"][2],
                          "hue": v["jitter"][3], "gray": v["gray"], "blur": v["blur"],
                          "sigma": v["sigma"], "solarize": v["solarize"]}
                for name, value in values.items():
                    if self._used(view, name):
                        params[f"v{view}_{name}"].append(value)
        arrays = {name: np.asarray(values, dtype=np.bool_ if name.split("_", 1)[1] in FLAGS
                                   else np.float32) for name, values in params.items()}
        return {"encoded": encoded, "labels": np.asarray(labels, dtype=np.int64), **arrays}

    def _to_torch(self, tensor_list) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dense = tensor_list.as_tensor()
            out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        # Zero-copy: outputs of the default (dynamic) executor stay valid while referenced.
        return torch.from_numpy(np.asarray(tensor_list.as_tensor()))

    def batches(self, loader, epoch: int, start_batch: int):
        due = len(loader) - start_batch  # this call's batches; what follows is prefetched
        head = (epoch + 1, 0) if start_batch == len(loader) else (epoch, start_batch)
        if self._in_flight and self._in_flight[0][0] != head:
            self._reset()  # the caller jumped (a loaded state): what is in flight is stale
        if self._pipe is None:
            self._pipe = self._build(loader.batch_size)
        if self._preparer is None:
            self._preparer = _Preparer(self, loader, head)
        self._fill()
        for _ in range(due):
            _, indices, feed_error = self._in_flight[0]
            try:
                if feed_error is not None:  # raised when its batch is due, not before
                    raise feed_error
                # On GPU the outputs are bound to torch's stream, where they are copied and
                # where DALI's stream-ordered allocator then frees them; on CPU they are ready.
                view1, view2, labels = self._pipe.outputs(
                    torch.cuda.current_stream(self.device) if self.device.type == "cuda"
                    else None)
            except CorruptImageError:
                self._reset()
                raise
            except Exception as err:  # DALI's errors name the operator, not the file
                self._reset()
                bad = first_bad(self.index, indices)
                if bad is None:
                    raise ValueError(f"DALI failed on a batch holding "
                                     f"{self.index.name(indices[0])}: {err}") from err
                raise bad from err
            self._in_flight.popleft()
            self._fill()
            yield (self._to_torch(view1), self._to_torch(view2),
                   torch.from_numpy(np.array(labels.as_tensor())).reshape(-1))

    def _fill(self) -> None:
        """Feeds and schedules batches, in order and across epochs, until PREFETCH are in
        flight. A batch whose files cannot be read is queued with its error, and nothing is fed
        after it."""
        while len(self._in_flight) < PREFETCH and not (
                self._in_flight and self._in_flight[-1][2] is not None):
            key, indices, inputs, err = self._preparer.get()
            if err is not None:
                self._in_flight.append((key, indices, err))
                # Before the first run, the batches fed so far run only once PREFETCH are fed:
                # stand-ins (copies of the last one, never handed out) make up the number.
                while not self._primed and self._waiting:
                    self._submit(self._last_inputs)
                return
            self._submit(inputs)
            self._last_inputs = inputs
            self._in_flight.append((key, indices, None))

    def _submit(self, inputs: dict[str, list[np.ndarray] | np.ndarray]) -> None:
        """Feeds one batch and schedules it (the first run takes PREFETCH fed batches)."""
        try:
            for name, values in inputs.items():
                self._pipe.feed_input(name, values)
            self._waiting += 1
            if self._primed or self._waiting == PREFETCH:
                self._pipe.schedule_run()
                self._primed, self._waiting = True, 0
        except BaseException:  # even an interrupt leaves the inputs out of step
            self._reset()
            raise

    def _reset(self) -> None:
        """Drops the pipeline and the preparer (made anew when next needed) with whatever they
        hold."""
        if self._preparer is not None:
            self._preparer.close()
        self._preparer, self._pipe, self._primed, self._waiting = None, None, False, 0
        self._in_flight.clear()
