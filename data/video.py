"""Video clips in NumPy: decode a file, sample frames at a configured fps or count, resize each frame.

Shapes: n decoded frames, T sampled frames, h w input size, H W bucket size; clips are uint8 [T h w 3] as read
and float32 [T H W 3] in [-1, 1] once prepared (every frame as `transforms.prepare_image`).

Decoding: GIF / animated WebP / PNG with Pillow; every other container (.mp4, .webm, .mov, .mkv, .avi) with
PyAV (the `av` package: FFmpeg's decoders, pip-installable wheels). A file that cannot be opened or decoded,
has no video stream or no frame raises `transforms.BadImage`, which the pipeline turns into a counted skip.

Frame sampling (`VideoSpec`): `fps` > 0 takes frames at times 0, 1/fps, 2/fps, ... (the last decoded frame at
or before each time), `fps` = 0 spreads `frames` uniformly over the clip (the reference's
tuna/data/datasets/video_dataset.py: indices floor(i * n / T)). A clip shorter than it needs repeats its last
frame, as the reference does. The Wan 2.2 VAE encodes 1 + 4k frames (its causal first frame, then chunks of
4): `VideoSpec.check_vae` says so for a latent model.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageSequence

from unimm_jax.data import transforms

PILLOW_SUFFIXES = (".gif", ".webp", ".png", ".apng")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  frames: int = 5   # T sampled frames per clip
  fps: float = 0.0  # > 0: sample at this rate from the clip's start; 0: spread T frames over the whole clip

  def __post_init__(self):
    if self.frames < 1 or self.fps < 0:
      raise ValueError(f"VideoSpec: frames {self.frames} must be >= 1 and fps {self.fps} >= 0")

  def check_vae(self, temporal_downscale: int, where: str) -> None:
    """Raises unless `frames` is 1 + k * temporal_downscale (what a causal video VAE encodes whole)."""
    if (self.frames - 1) % temporal_downscale:
      raise ValueError(f"{where}: {self.frames} frames per clip; the VAE encodes 1 + {temporal_downscale}k frames "
                       f"(e.g. {1 + temporal_downscale * max(1, (self.frames - 1) // temporal_downscale)})")


def _decode_pillow(data: bytes) -> tuple[list[np.ndarray], list[float]]:
  frames, times, t = [], [], 0.0
  with Image.open(io.BytesIO(data)) as im:
    for frame in ImageSequence.Iterator(im):
      frame.load()  # decodes now, so a truncated frame fails here
      frames.append(np.asarray(frame.convert("RGB"), np.uint8))
      times.append(t)
      t += float(frame.info.get("duration", 100)) / 1000.0  # GIF / WebP frame durations are in ms
  return frames, times


def _decode_av(data: bytes) -> tuple[list[np.ndarray], list[float]]:
  import av  # only videos need FFmpeg; GIFs decode with Pillow alone
  frames, times = [], []
  try:
    with av.open(io.BytesIO(data)) as container:
      if not container.streams.video:
        raise transforms.BadImage("unreadable_video", "no video stream")
      stream = container.streams.video[0]
      for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format="rgb24"))
        times.append(float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate or 1))
  except av.FFmpegError as e:
    raise transforms.BadImage("unreadable_video", str(e)) from e
  return frames, times


def load_video(video: str | os.PathLike | bytes | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A path, encoded bytes or a uint8 [n h w 3] array -> (frames uint8 [n h w 3], their times in s [n]).
  An array's frames are 1 / 8 s apart (arrays carry no rate). Raises BadImage naming the file on failure."""
  if isinstance(video, np.ndarray):
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or 0 in video.shape:
      raise transforms.BadImage("bad_video", f"array of shape {video.shape} dtype {video.dtype}, want uint8 [n h w 3]")
    return video, np.arange(len(video)) / 8.0
  if isinstance(video, (str, os.PathLike)):
    name = os.fspath(video)
    try:
      with open(name, "rb") as f:
        data = f.read()
    except FileNotFoundError as e:
      raise transforms.BadImage("missing_file", name) from e
    except OSError as e:
      raise transforms.BadImage("unreadable_video", f"{name}: {e}") from e
  else:
    data, name = bytes(video), f"<{len(video)} encoded bytes>"
  try:
    pillow = name.lower().endswith(PILLOW_SUFFIXES) or data[:6] in (b"GIF87a", b"GIF89a")
    frames, times = (_decode_pillow if pillow else _decode_av)(data)
  except transforms.BadImage as e:
    raise transforms.BadImage(e.reason, f"{name}: {str(e).removeprefix(e.reason + ': ')}") from e
  # Pillow meets a truncated GIF as a short read (IndexError, EOFError) as often as an OSError
  except (OSError, ValueError, IndexError, EOFError, Image.DecompressionBombError) as e:
    raise transforms.BadImage("unreadable_video", f"{name}: {e!r}") from e
  if not frames:
    raise transforms.BadImage("unreadable_video", f"{name}: no frames")
  if len({f.shape for f in frames}) > 1:
    raise transforms.BadImage("unreadable_video", f"{name}: frames of several sizes {sorted({f.shape for f in frames})}")
  return np.stack(frames), np.asarray(times, np.float64)


def sample_frames(frames: np.ndarray, times: np.ndarray, spec: VideoSpec) -> np.ndarray:
  """[n ...] decoded frames and their times -> [T ...] per `spec` (module docstring)."""
  n = len(frames)
  if spec.fps > 0:
    want = (times[0] + np.arange(spec.frames) / spec.fps)[:, None]
    # the last frame shown at or before each wanted time (times ascend; a small slack absorbs rounding of pts)
    idx = np.sum(times[None, :] <= want + 1e-6, axis=1) - 1
  else:
    idx = (np.arange(spec.frames) * n) // spec.frames if n >= spec.frames else np.arange(spec.frames)
  return frames[np.clip(idx, 0, n - 1)]


def prepare_video(frames: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
  """uint8 [T h w 3] -> float32 [T H W 3] in [-1, 1], every frame in the bucket closest to the clip's aspect."""
  return np.stack([transforms.prepare_image(f, buckets) for f in frames])


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
  """uint8 [T h w 3] -> an animated GIF (lossless for the few colours of the shapes world)."""
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
  """uint8 [T h w 3] (even h and w) -> an MPEG-4 Part 2 .mp4 (a codec every FFmpeg build has)."""
  import av
  with av.open(os.fspath(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
    container.mux(stream.encode())
