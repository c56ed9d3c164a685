"""Streaming video IO with PyAV: decode frame by frame, re-encode the picture, copy the audio packets untouched.

One pass over the input demuxes every stream in file order. Video packets are decoded into RGB frames for the
caller; audio packets are handed straight to the writer, which remuxes them unchanged (same bytes, same
timestamps). The writer keeps the input's time base, frame timestamps, resolution and container metadata, so the
output has the input's frame rate, frame count and duration. Nothing holds more than the frames in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv")


class VideoError(RuntimeError):
    """A video that cannot be read or written, with the file and the reason in the message."""


@dataclass(frozen=True)
class VideoInfo:
    """What the checks compare between an input and its anonymised output."""

    width: int
    height: int
    fps: Fraction  # the stream's average frame rate
    frames: int  # counted by decoding, not the container's claim
    duration: float  # seconds, from the container (falls back to frames / fps)
    video_codec: str
    audio_codecs: tuple[str, ...]


@dataclass
class Frame:
    """One decoded picture: ``image`` is uint8 (H, W, 3) RGB; ``pts`` is in the video stream's time base."""

    index: int
    pts: int | None
    time: float
    image: np.ndarray


def _open_input(path: str, name: str | None = None) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err  # FFmpeg's message without the (maybe temporary) path
        raise VideoError(f"{name or path}: not a readable video ({reason})") from None


class VideoReader:
    """Iterate the frames of one video; non-video packets go to ``passthrough`` as they are read.

    ``name`` is what errors call the video (default: ``path``), e.g. the S3 URI of a downloaded copy."""

    def __init__(self, path: str, name: str | None = None):
        self.path = str(path)
        self.name = name or self.path
        self.container = _open_input(self.path, self.name)
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{self.name}: no video stream")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = list(self.container.streams.audio)
        if self.video.codec_context.width <= 0 or self.video.codec_context.height <= 0:
            self.container.close()
            raise VideoError(f"{self.name}: video stream has no frame size (unsupported codec?)")

    @property
    def width(self) -> int:
        return self.video.codec_context.width

    @property
    def height(self) -> int:
        return self.video.codec_context.height

    @property
    def fps(self) -> Fraction:
        rate = self.video.average_rate or self.video.guessed_rate or self.video.base_rate
        if not rate:
            raise VideoError(f"{self.name}: video stream has no frame rate")
        return Fraction(rate)

    def frames(self, passthrough: Callable[[av.Packet], None] | None = None) -> Iterator[Frame]:
        """Decode in file order. Decoder errors name the file and the frame they happened at."""
        streams = [self.video, *self.audio] if passthrough else [self.video]
        index = 0
        try:
            for packet in self.container.demux(streams):
                if packet.stream.type != "video":
                    if packet.dts is not None and passthrough:
                        passthrough(packet)
                    continue
                for decoded in packet.decode():
                    yield self._frame(decoded, index)
                    index += 1
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.name}: decoding failed at frame {index} ({err})") from None
        if index == 0:
            raise VideoError(f"{self.name}: no decodable video frames")

    def _frame(self, decoded: av.VideoFrame, index: int) -> Frame:
        """``time`` counts from the stream's start, in seconds."""
        if decoded.pts is None:
            time = index / float(self.fps)
        else:
            time = float((decoded.pts - (self.video.start_time or 0)) * self.video.time_base)
        return Frame(index=index, pts=decoded.pts, time=time, image=decoded.to_ndarray(format="rgb24"))

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class EncodeOptions:
    """How the anonymised picture is re-encoded (the audio is never re-encoded)."""

    codec: str | None = None  # None: libx264, or libvpx-vp9 for .webm
    crf: int = 18  # x264/vp9 constant quality: lower is better; 18 is visually lossless for most footage
    preset: str = "fast"  # x264 speed/size trade-off


def _codec_for(path: str, options: EncodeOptions) -> str:
    if options.codec:
        return options.codec
    return "libvpx-vp9" if Path(path).suffix.lower() == ".webm" else "libx264"


def _pix_fmt(codec: av.codec.Codec, source: str | None, width: int, height: int) -> str:
    """Keep the source's pixel format where the encoder takes it; 4:2:0 needs even sides, else 4:4:4."""
    supported = [f.name for f in (codec.video_formats or [])]
    if source in supported and not (source.startswith(("yuv420", "yuvj420", "nv12")) and (width % 2 or height % 2)):
        return source
    if width % 2 == 0 and height % 2 == 0 and "yuv420p" in supported:
        return "yuv420p"
    for name in ("yuv444p", *supported):
        if name in supported:
            return name
    raise VideoError(f"encoder {codec.name} supports no usable pixel format")


class VideoWriter:
    """Encode frames at the reader's timestamps and remux the reader's audio packets unchanged."""

    def __init__(self, path: str, reader: VideoReader, options: EncodeOptions | None = None):
        options = options or EncodeOptions()
        self.path = str(path)
        self.reader = reader
        try:
            self.container = av.open(self.path, mode="w", options={"fflags": "+bitexact"})  # no random IDs or dates: a rerun writes the same bytes
        except (av.error.FFmpegError, ValueError) as err:
            raise VideoError(f"{self.path}: cannot create output ({err})") from None
        self.container.metadata.update(reader.container.metadata)
        self.video = self._add_video(reader, options)
        self.audio = {}
        for stream in reader.audio:
            out = self.container.add_stream_from_template(stream)
            out.metadata.update(stream.metadata)
            self.audio[stream.index] = out
        self.frames_written = 0
        self.last_pts: int | None = None

    def _add_video(self, reader: VideoReader, options: EncodeOptions) -> av.VideoStream:
        name = _codec_for(self.path, options)
        try:
            stream = self.container.add_stream(name, rate=reader.fps)
        except (av.error.FFmpegError, ValueError) as err:
            raise VideoError(f"{self.path}: cannot encode {name} here ({err})") from None
        ctx = stream.codec_context
        ctx.width, ctx.height = reader.width, reader.height
        ctx.pix_fmt = _pix_fmt(ctx.codec, reader.video.codec_context.pix_fmt, reader.width, reader.height)
        ctx.time_base = reader.video.time_base
        stream.time_base = reader.video.time_base
        if reader.video.sample_aspect_ratio:
            ctx.sample_aspect_ratio = reader.video.sample_aspect_ratio
        if name in ("libx264", "libx265"):
            ctx.options = {"crf": str(options.crf), "preset": options.preset}
        elif name.startswith("libvpx"):
            ctx.options = {"crf": str(options.crf), "b": "0"}
        stream.metadata.update({k: v for k, v in reader.video.metadata.items() if k.lower() not in ("encoder", "handler_name")})
        return stream

    def copy_packet(self, packet: av.Packet) -> None:
        """Remux one audio packet from the reader: the bytes and timestamps are not touched."""
        out = self.audio.get(packet.stream.index)
        if out is None:
            return
        packet.stream = out
        self._mux(packet)

    def write(self, frame: Frame, image: np.ndarray) -> None:
        """Encode ``image`` (uint8 H, W, 3) at ``frame``'s timestamp."""
        if image.shape != (self.reader.height, self.reader.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"frame {frame.index}: expected uint8 {(self.reader.height, self.reader.width, 3)}, got {image.dtype} {image.shape}")
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        tb = self.reader.video.time_base
        pts = frame.pts if frame.pts is not None else round(frame.time / tb)
        if self.last_pts is not None and pts <= self.last_pts:  # broken inputs repeat timestamps; encoders refuse them
            pts = self.last_pts + 1
        out.pts, out.time_base, self.last_pts = pts, tb, pts
        for packet in self.video.encode(out):
            self._mux(packet)
        self.frames_written += 1

    def _mux(self, packet: av.Packet) -> None:
        try:
            self.container.mux(packet)
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.path}: muxing {packet.stream.type} failed ({err})") from None

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        try:
            for packet in self.video.encode(None):
                self._mux(packet)
        finally:
            self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the file is a temporary and will be discarded; do not mask the original error
            try:
                self.container.close()
            except av.error.FFmpegError:
                log.debug("closing %s after an error also failed", self.path)


def probe(path: str) -> VideoInfo:
    """Decode the whole video once to count frames (containers' frame counts are not always right)."""
    with VideoReader(path) as reader:
        frames = sum(1 for _ in reader.frames())
        duration = reader.container.duration / av.time_base if reader.container.duration else frames / float(reader.fps)
        return VideoInfo(
            width=reader.width,
            height=reader.height,
            fps=reader.fps,
            frames=frames,
            duration=float(duration),
            video_codec=reader.video.codec_context.name,
            audio_codecs=tuple(s.codec_context.name for s in reader.audio),
        )


def audio_packets(path: str) -> list[list[bytes]]:
    """The raw bytes of every audio packet, per audio stream: what "audio copied unchanged" is checked against."""
    container = _open_input(path)
    try:
        streams = list(container.streams.audio)
        if not streams:
            return []
        out: list[list[bytes]] = [[] for _ in streams]
        position = {s.index: i for i, s in enumerate(streams)}
        for packet in container.demux(streams):
            if packet.dts is not None and packet.size:
                out[position[packet.stream.index]].append(bytes(packet))
        return out
    finally:
        container.close()
