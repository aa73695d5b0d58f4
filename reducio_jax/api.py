"""The user-facing Reducio-VAE: load weights, then encode / latent / decode / reconstruct.

```python
from reducio_jax import ReducioVAE
vae = ReducioVAE.from_torch_checkpoint("reducio-ft4-fs32-attn23.ckpt", "configs/reducio_ft4.py")
post = vae.encode(video)                 # video: (B, T, H, W, 3) in [-1, 1]
z = vae.latent(post, rng=None)           # posterior mean (or a sample with rng), then LayerNorm
recon = vae.decode(z, video[:, (T - 1) // 2])

long = vae.encode_video(movie)           # movie: (B, N, H, W, 3), any N >= 1, H, W >= 32
movie_recon = vae.decode_video(long)     # (B, N, H, W, 3); or vae.reconstruct_video(movie)
```

Videos of any length go through overlapping 16-frame windows (`models/windows.py`, design in
docs/video.md): each window has its own content frame (its middle frame), the overlaps are
cross-faded in time, and frame sizes that are not multiples of 32 are reflect-padded and
cropped back.

Each method runs the model's compiled program for its inputs' shapes (`self.programs`,
`reducio_jax/programs/`: compiled once per shape and kept; inside a user's `jax.jit` the
program's jit is called instead, so the methods nest); frames taller than one tile window are
tiled when the config enables tiling.

The video methods choose their window batch from memory by default (`window_batch="auto"`,
`plan_memory`, `reducio_jax/programs/planner.py`): as many windows a call as the compiled
program's memory analysis says fit in the memory available (or `max_memory`), tiling the frames
one tile a step when one window does not fit, and `planner.OutOfMemory` when one tile does not
either. The program the planner measured is the one that runs.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from reducio_jax.config import load_config
from reducio_jax.convert.hub import HubError, hub_name, is_hub
from reducio_jax.convert.pretrained import (
    ReducioWeights,
    convert_torch_checkpoint,
    load_hub_weights,
    load_pretrained,
    load_pretrained_config,
    save_pretrained,
)
from reducio_jax.models import VideoVAE, build_vae
from reducio_jax.models.posterior import DiagonalGaussian
from reducio_jax.models.tiling import TileConfig
from reducio_jax.models.windows import (
    WindowPlan,
    cut_windows,
    pad_rows,
    pad_spatial,
    plan_windows,
    stitch,
)
from reducio_jax.programs import lowering, planner
from reducio_jax.programs.compiled import Programs
from reducio_jax.sharding import make_mesh

ConfigLike = ml_collections.ConfigDict | str | pathlib.Path
WindowBatch = planner.WindowBatch
DEFAULT_OVERLAP = 4  # frames shared by neighbouring 16-frame windows (docs/video.md)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("latents", "content_frames"),
    meta_fields=("starts", "num_frames", "height", "width", "window", "overlap"),
)
@dataclasses.dataclass(frozen=True)
class VideoLatent:
    """The latent of a video of any length (a pytree: two arrays, the rest static).

    latents: (B, K, t, h, w, z) the normalised latent of each of the K windows.
    content_frames: (B, K, H', W', 3) each window's content frame (its middle frame), in
        [-1, 1], at the padded size H' x W' (multiples of 32).
    starts: the window table, the first frame of each window (`models/windows.py`).
    num_frames, height, width: the video's size before any padding.
    window, overlap: frames per window and frames cross-faded between neighbours.
    """

    latents: jax.Array
    content_frames: jax.Array
    starts: tuple[int, ...]
    num_frames: int
    height: int
    width: int
    window: int
    overlap: int

    @property
    def plan(self) -> WindowPlan:
        return WindowPlan(self.num_frames, self.window, self.overlap, self.starts)


def _check_video(video: jax.Array, factor: int) -> None:
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected a video batch (B, T, H, W, 3), got shape {tuple(video.shape)}")
    if video.shape[2] % factor or video.shape[3] % factor:
        raise ValueError(
            f"frame size {video.shape[2]}x{video.shape[3]} must be a multiple of {factor} "
            "(the spatial compression); crop or pad the video"
        )


class ReducioVAE:
    """A Reducio-VAE with its config. Videos are (B, T, H, W, 3) in [-1, 1], channels-last."""

    def __init__(
        self, model: VideoVAE, cfg: ml_collections.ConfigDict, weights: ReducioWeights | None = None
    ):
        self.model = model
        self.config = cfg
        self.weights = weights or ReducioWeights(vae=model)
        self.tiles = TileConfig.from_config(cfg)
        self.spatial_factor = model.sizes.spatial_factor
        self.programs = Programs(
            model,
            tiles=self.tiles,
            fallback=_fallback_tiles(cfg, self.spatial_factor),
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ConfigLike, *, seed: int = 0) -> ReducioVAE:
        """Randomly initialised (for training from scratch)."""
        cfg = load_config(cfg)
        with nnx.use_eager_sharding(False):
            return cls(build_vae(cfg.model, seed=seed), cfg)

    @classmethod
    def from_torch_checkpoint(
        cls, path: str | pathlib.Path, cfg: ConfigLike, *, mesh: jax.sharding.Mesh | None = None
    ) -> ReducioVAE:
        """Converts a released `.ckpt` / `.pt` / `.safetensors` file (no torch needed): a path,
        a `gs://` URL or a hub name `hf://OWNER/REPO/FILE[@REVISION]` (converted once, then read
        from the cache of `reducio_jax.convert.hub`)."""
        cfg = load_config(cfg)
        if is_hub(str(path)):
            weights = load_hub_weights(str(path), cfg, mesh=mesh)
        else:
            weights = convert_torch_checkpoint(path, cfg, mesh=mesh)
        return cls(weights.vae, cfg, weights)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | pathlib.Path,
        cfg: ConfigLike | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        variant: str | None = None,
    ) -> ReducioVAE:
        """Restores a checkpoint directory (a path or a `gs://` URL): one written by
        `save_pretrained`, `convert_torch_weights.py` or `export`, or a training run's
        `checkpoints/<step>`. Released weights by name: a hub repo id with `variant` ("ft4",
        "ft2"; e.g. `from_pretrained("microsoft/Reducio-VAE", cfg, variant="ft4")`) or
        `hf://OWNER/REPO/FILE[@REVISION]`, fetched through huggingface_hub and converted once;
        these need `cfg`, the file's model config (configs/reducio_ft4.py)."""
        if variant is not None:
            directory = hub_name(str(directory), variant)
        if is_hub(str(directory)):
            if cfg is None:
                raise HubError(f"{directory} is a torch checkpoint: pass its config (cfg=...)")
            return cls.from_torch_checkpoint(str(directory), cfg, mesh=mesh)
        cfg = load_config(cfg) if cfg is not None else load_pretrained_config(directory)
        weights = load_pretrained(directory, cfg, mesh=mesh)
        return cls(weights.vae, cfg, weights)

    def save_pretrained(self, directory: str | pathlib.Path) -> pathlib.Path:
        return save_pretrained(self.weights, directory, self.config)

    # -- the four operations ------------------------------------------------------------------
    def content_features(self, frame: jax.Array) -> Any:
        """(B, H, W, 3) -> content features (a grid of per-tile feature lists when tiled)."""
        return self.programs("content", frame, tiles=self.tiles)

    def encode(self, video: jax.Array, *, plan: planner.Plan | None = None) -> DiagonalGaussian:
        """(B, T, H, W, 3) -> posterior with mean/logvar (B, T/2**f_t, H/32, W/32, embed_dim).
        (`plan`: the tiling of a `plan_memory` result instead of the config's.)"""
        _check_video(video, self.spatial_factor)
        return self.programs("encode", video, tiles=self._tiles(plan))

    def latent(self, posterior: DiagonalGaussian, rng: jax.Array | None = None) -> jax.Array:
        """The decoder's input: posterior mean (rng None) or a sample, LayerNorm-ed per clip."""
        return lowering.latent_jit(posterior, rng)

    def decode(
        self, latent: jax.Array, content_frame: jax.Array, *, plan: planner.Plan | None = None
    ) -> jax.Array:
        """Latent (B, t, h, w, z) + content frame (B, H, W, 3) -> video (B, T, H, W, 3)."""
        if content_frame.ndim != 4:
            raise ValueError(
                f"content frame must be (B, H, W, 3), got shape {tuple(content_frame.shape)}"
            )
        return self.programs("decode", latent, content_frame, tiles=self._tiles(plan))

    def reconstruct(
        self, video: jax.Array, rng: jax.Array | None = None, *, plan: planner.Plan | None = None
    ) -> jax.Array:
        """encode -> latent -> decode with the middle frame as content, in one compiled call."""
        _check_video(video, self.spatial_factor)
        return self.programs("reconstruct", video, rng, tiles=self._tiles(plan))

    def _tiles(self, plan: planner.Plan | None) -> TileConfig | None:
        return self.tiles if plan is None else plan.tiles

    # -- memory ---------------------------------------------------------------------------------
    def plan_memory(
        self,
        height: int,
        width: int,
        *,
        op: str = "reconstruct",
        max_memory: str | int | None = None,
        cap: int | None = None,
    ) -> planner.Plan:
        """The window batch (<= `cap`, default 1 on the CPU, 16 on accelerators) and tiling for
        `op` ("reconstruct", "encode" or "decode") of HxW frames, from the compiled program's
        memory analysis and the memory available (`max_memory`: bytes or "8GB" for the whole
        process instead). Raises `planner.OutOfMemory` when one tile of one window does not
        fit (`programs.planner.plan_memory`)."""
        return planner.plan_memory(
            self.programs, height, width, op=op, max_memory=max_memory, cap=cap
        )

    def footprint(
        self,
        op: str,
        batch: int,
        frame: tuple[int, int],
        tiles: TileConfig | None,
        *,
        schedule: str = "default",
    ) -> planner.Footprint:
        """XLA's memory analysis of `op`'s program for `batch` windows of `frame` (multiples of
        32) px in XLA's `schedule` ("default", or "memory": XLA:CPU's memory-minded one),
        compiled once per shape and kept (`Programs.footprint`)."""
        return self.programs.footprint(op, batch, frame, tiles, schedule=schedule)

    # -- videos of any length (overlapping windows, docs/video.md) ------------------------------
    @property
    def window(self) -> int:
        """Frames per window: the model's clip length (16)."""
        return self.model.sizes.num_frames

    def encode_video(
        self,
        video: jax.Array,
        *,
        overlap: int = DEFAULT_OVERLAP,
        rng: jax.Array | None = None,
        window_batch: WindowBatch = "auto",
        max_memory: str | int | None = None,
    ) -> VideoLatent:
        """(B, N, H, W, 3), any N >= 1 and H, W >= 32 -> the latents of its windows.

        `window_batch` windows go through one compiled call: "auto" (default) as many as fit
        in memory (`plan_memory`, `max_memory`), None all B*K at once.
        """
        _check_long_video(video)
        plan = plan_windows(video.shape[1], self.window, overlap)
        windows = cut_windows(pad_spatial(video, self.spatial_factor), plan)  # (B, K, T, H', W', 3)
        flat = windows.reshape(-1, *windows.shape[2:])  # (B*K, T, H', W', 3)
        size, mem = self._window_batch(flat, window_batch, "encode", max_memory)
        latents = _in_batches(
            lambda w, key: self.latent(self.encode(w, plan=mem), key), flat, size, rng
        )
        b, k = windows.shape[:2]
        return VideoLatent(
            latents=latents.reshape(b, k, *latents.shape[1:]),
            content_frames=windows[:, :, self.model.sizes.content_frame],
            starts=plan.starts,
            num_frames=int(video.shape[1]),
            height=int(video.shape[2]),
            width=int(video.shape[3]),
            window=self.window,
            overlap=overlap,
        )

    def decode_video(
        self,
        latent: VideoLatent,
        *,
        window_batch: WindowBatch = "auto",
        max_memory: str | int | None = None,
    ) -> jax.Array:
        """A `VideoLatent` -> the video (B, N, H, W, 3), windows cross-faded and cropped
        (`window_batch` as `encode_video`'s)."""
        b, k = latent.latents.shape[:2]
        flat_z = latent.latents.reshape(b * k, *latent.latents.shape[2:])
        flat_frames = latent.content_frames.reshape(b * k, *latent.content_frames.shape[2:])
        size, mem = self._window_batch(flat_frames[:, None], window_batch, "decode", max_memory)
        decoded = _in_batches(
            lambda pair, _: self.decode(*pair, plan=mem), (flat_z, flat_frames), size, None
        )  # (B*K, T, H', W', 3)
        windows = decoded.reshape(b, k, *decoded.shape[1:])
        return stitch(windows, latent.plan)[:, :, : latent.height, : latent.width]

    def reconstruct_video(
        self,
        video: jax.Array,
        *,
        overlap: int = DEFAULT_OVERLAP,
        rng: jax.Array | None = None,
        window_batch: WindowBatch = "auto",
        max_memory: str | int | None = None,
    ) -> jax.Array:
        """(B, N, H, W, 3) -> its reconstruction, each window through the compiled `reconstruct`
        (`window_batch` as `encode_video`'s).

        For N == 16 this is exactly `reconstruct` (one window, nothing to fade or pad).
        """
        _check_long_video(video)
        plan = plan_windows(video.shape[1], self.window, overlap)
        windows = cut_windows(video, plan)  # (B, K, T, H, W, 3)
        flat = windows.reshape(-1, *windows.shape[2:])
        size, mem = self._window_batch(flat, window_batch, "reconstruct", max_memory)
        run = lambda w, key: self.reconstruct_windows(w, key, plan=mem)  # noqa: E731
        recon = _in_batches(run, flat, size, rng)
        return stitch(recon.reshape(windows.shape), plan)

    def reconstruct_windows(
        self, windows: jax.Array, rng: jax.Array | None = None, *, plan: planner.Plan | None = None
    ) -> jax.Array:
        """(K, 16, H, W, 3) windows of any H, W >= 32 -> reconstructions of the same shape
        (reflect-padded to multiples of 32 and cropped back). The streaming CLI's step."""
        h, w = windows.shape[2], windows.shape[3]
        recon = self.reconstruct(pad_spatial(windows, self.spatial_factor), rng, plan=plan)
        return recon[:, :, :h, :w]

    def _window_batch(
        self, windows: jax.Array, window_batch: WindowBatch, op: str, max_memory
    ) -> tuple[int | None, planner.Plan | None]:
        """(batch size for `_in_batches`, the memory plan or None) for (K, T, H, W, 3) windows."""
        window_batch = planner.parse_window_batch(window_batch, "window_batch")
        if window_batch != "auto" or isinstance(windows, jax.core.Tracer):
            return (None if window_batch == "auto" else window_batch), None  # inside a jit: one
        k, h, w = windows.shape[0], windows.shape[2], windows.shape[3]
        cap = min(k, planner.default_cap())
        plan = self.plan_memory(h, w, op=op, max_memory=max_memory, cap=cap)
        return plan.window_batch, plan


def _fallback_tiles(cfg: ml_collections.ConfigDict, spatial_factor: int) -> TileConfig:
    """The config's tile size, used when memory (not the config) calls for tiling."""
    model = cfg.model
    return TileConfig(
        int(model.tile_sample_min_size), float(model.tile_overlap_factor), spatial_factor
    )


def _in_batches(fn, xs: Any, size: int | None, rng: jax.Array | None) -> jax.Array:
    """fn(chunk, rng) over chunks of `size` rows of the arrays `xs` (a pytree); the last chunk
    is padded by repeating its last row, so every call has one compiled shape. All rows at
    once when `size` is None."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if size is None or size >= n:
        return fn(xs, rng)
    outs = []
    for i, begin in enumerate(range(0, n, size)):
        rows = min(size, n - begin)
        chunk = jax.tree.map(lambda x, b=begin, r=rows: pad_rows(x[b : b + r], size), xs)
        key = None if rng is None else jax.random.fold_in(rng, i)
        outs.append(fn(chunk, key)[:rows])
    return jnp.concatenate(outs)


def _check_long_video(video: jax.Array) -> None:
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected a video batch (B, N, H, W, 3), got shape {tuple(video.shape)}")
    if video.shape[1] < 1:
        raise ValueError("the video has no frames")


__all__ = ["ReducioVAE", "VideoLatent", "load_config", "make_mesh"]
