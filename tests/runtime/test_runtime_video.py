import struct

import cv2
import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime import video
from loc3r.runtime.video import (
    SamplingOptions,
    expected_frames,
    fps_sample,
    open_video,
    sample_frames,
)


def write_mp4v(path, n=10, size=(64, 48), fps=10.0):
    """Frame i is a constant image of level 20*i, so a frame's mean says which it was."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), 20 * i, np.uint8))
    w.release()
    return path


def write_h264(path, n=6, size=(64, 32), fps=10):
    av = pytest.importorskip("av")
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    for i in range(n):
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[:, : size[0] // 2] = 255  # left half white
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def levels(frames):
    return [int(round(rgb.mean() / 20)) for rgb, _ in frames]


def test_file_all_frames(tmp_path):
    src = open_video(str(write_mp4v(tmp_path / "v.mp4")))
    frames = list(sample_frames(src))
    assert levels(frames) == list(range(10))
    rgb, t = frames[3]
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.flags["C_CONTIGUOUS"]
    assert [round(t, 3) for _, t in frames[:3]] == [0.0, 0.1, 0.2]


def test_fps_sampling_and_uniform_max_frames(tmp_path):
    path = write_mp4v(tmp_path / "v.mp4", n=10, fps=10.0)
    opts = SamplingOptions(fps=5.0)
    assert levels(sample_frames(open_video(str(path), opts), opts)) == [0, 2, 4, 6, 8]
    opts = SamplingOptions(max_frames=4)
    src = open_video(str(path), opts)
    assert expected_frames(src, opts) == 4
    assert levels(sample_frames(src, opts)) == [0, 3, 6, 9]  # uniform over the whole video
    opts = SamplingOptions(fps=5.0, max_frames=3)
    assert levels(sample_frames(open_video(str(path), opts), opts)) == [0, 4, 8]


def test_fps_sample_rule():
    t = np.arange(10) / 30.0  # 30 fps
    assert fps_sample(t, 10.0) == [0, 3, 6, 9]
    assert fps_sample(t, None) == list(range(10))
    assert fps_sample(np.array([0.0, 0.04, 0.5, 0.51, 1.2]), 2.0) == [0, 2, 4]


def test_live_source_first_n(tmp_path):
    """Sources of unknown length take the first N frames (--max-frames) and sample on the fly."""

    class Live(video.VideoSource):
        def frames(self, keep=None):
            for i in range(20):
                yield np.full((4, 4, 3), i, np.uint8), i * 0.1

    got = [int(rgb[0, 0, 0]) for rgb, _ in sample_frames(Live(), SamplingOptions(fps=4.0, max_frames=3))]
    assert got == [0, 3, 5]  # kept at t = 0, 0.3 (>= 0.25), 0.5


def test_h264_and_rotation_metadata(tmp_path):
    path = write_h264(tmp_path / "h.mp4")
    frames = list(sample_frames(open_video(str(path))))
    assert len(frames) == 6 and frames[0][0].shape == (32, 64, 3)
    assert frames[0][0][:, :28].mean() > 240 and frames[0][0][:, 36:].mean() < 15
    # Set a 90-degree display matrix in the mp4 track header: frames come out rotated.
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    off = i + 4 + 4 + 20 + 8 + 8  # version/flags, times/id/duration, reserved, layer..volume
    data[off : off + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    rot = tmp_path / "rot.mp4"
    rot.write_bytes(bytes(data))
    rgb = next(iter(sample_frames(open_video(str(rot)))))[0]
    assert rgb.shape == (64, 32, 3)
    halves = sorted([rgb[:28].mean(), rgb[36:].mean()])
    assert halves[0] < 15 and halves[1] > 240  # the white half is now top or bottom


def test_grayscale_and_odd_size(tmp_path):
    """A true gray8 stream with odd dimensions (FFV1 in Matroska) comes out as RGB, size kept."""
    av = pytest.importorskip("av")
    path = tmp_path / "odd.mkv"
    c = av.open(str(path), "w")
    s = c.add_stream("ffv1", rate=10)
    s.width, s.height, s.pix_fmt = 37, 23, "gray"
    for i in range(3):
        frame = av.VideoFrame.from_ndarray(np.full((23, 37), 40 * i, np.uint8), format="gray")
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    frames = list(sample_frames(open_video(str(path))))
    assert len(frames) == 3
    rgb = frames[2][0]
    assert rgb.shape == (23, 37, 3)
    assert (rgb == 80).all()


def test_missing_file(tmp_path):
    with pytest.raises(Loc3rError) as e:
        open_video(str(tmp_path / "nope.mp4"))
    assert str(e.value) == f"video not found: {tmp_path / 'nope.mp4'}"


def test_non_video_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("hello world\n" * 10)
    with pytest.raises(Loc3rError) as e:
        open_video(str(path))
    assert str(e.value) == (
        f"not a video: {path} (FFmpeg cannot open it; VIDEO is a video file, an image, "
        "a folder of images, camera:N or a GStreamer pipeline)"
    )
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(Loc3rError) as e:
        open_video(str(empty))
    assert str(e.value) == f"not a video: {empty} is empty"


def test_truncated_video(tmp_path):
    path = write_mp4v(tmp_path / "v.mp4")
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(Loc3rError) as e:
        open_video(str(cut))
    assert str(e.value) == f"corrupt or truncated video: {cut} (FFmpeg cannot read its header)"


def zero_payload(src, dst):
    """Keep the container, zero the coded frames: opens, but decodes nothing."""
    data = bytearray(src.read_bytes())
    i = data.find(b"mdat")
    size = struct.unpack(">I", data[i - 4 : i])[0]
    data[i + 4 : i - 4 + size] = bytes(size - 8)
    dst.write_bytes(bytes(data))
    return dst


def test_zero_decodable_frames(tmp_path):
    path = zero_payload(write_mp4v(tmp_path / "v.mp4"), tmp_path / "zero.mp4")
    src = open_video(str(path))
    with pytest.raises(Loc3rError) as e:
        list(sample_frames(src))
    assert str(e.value) == f"no decodable frames in {path}"


def test_decoding_stops_early_is_an_error(tmp_path):
    """A header that promises 10 frames but only 4 decode: truncated, not silently short."""
    path = write_mp4v(tmp_path / "v.mp4")
    src = open_video(str(path))

    class Stop:
        def __init__(self, cap):
            self.cap, self.n = cap, 0

        def grab(self):
            self.n += 1
            return self.n <= 4 and self.cap.grab()

        def __getattr__(self, name):
            return getattr(self.cap, name)

    src._cap = Stop(src._cap)
    with pytest.raises(Loc3rError) as e:
        list(sample_frames(src))
    assert str(e.value) == f"corrupt or truncated video: {path} (decoding stopped at frame 4 of 10)"


def test_image_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        cv2.imwrite(str(folder / f"frame{i}.png"), np.full((8, 10, 3), 20 * i, np.uint8))
    cv2.imwrite(str(folder / "frame11.png"), np.full((8, 10), 220, np.uint8))  # grayscale
    rgba = np.full((8, 10, 4), 240, np.uint8)
    cv2.imwrite(str(folder / "frame12.png"), rgba)
    (folder / "notes.txt").write_text("ignored")
    opts = SamplingOptions(fps=2.0)
    frames = list(sample_frames(open_video(str(folder), opts), opts))
    assert levels(frames) == [1, 2, 10, 11, 12]
    assert [t for _, t in frames] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(rgb.shape == (8, 10, 3) for rgb, _ in frames)
    opts = SamplingOptions(max_frames=3)
    assert levels(sample_frames(open_video(str(folder), opts), opts)) == [1, 10, 12]


def test_unreadable_image_in_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(Loc3rError) as e:
        list(sample_frames(open_video(str(folder))))
    assert str(e.value) == f"cannot read image b.jpg in {folder} (corrupt or not an image)"


def test_empty_folder(tmp_path):
    with pytest.raises(Loc3rError) as e:
        open_video(str(tmp_path))
    assert str(e.value) == (
        f"no images in folder {tmp_path} (looked for .png .jpg .jpeg .bmp .tif .tiff .webp)"
    )


def test_huge_frames_are_downscaled_on_read(tmp_path):
    """An 8K frame is reduced to the 2048-pixel long side as it is read."""
    img = np.zeros((4320, 7680, 3), np.uint8)
    img[:, 3840:] = 255
    path = tmp_path / "8k.png"
    cv2.imwrite(str(path), img)
    rgb, _ = next(iter(sample_frames(open_video(str(path)))))
    assert rgb.shape == (1152, 2048, 3)
    assert rgb[:, :1000].max() == 0 and rgb[:, 1100:].min() == 255
    # The same policy on a video, with a small limit.
    vid = write_mp4v(tmp_path / "v.mp4", n=2, size=(200, 100))
    opts = SamplingOptions(max_side=50)
    assert next(iter(sample_frames(open_video(str(vid), opts), opts)))[0].shape == (25, 50, 3)


def test_frames_over_the_pixel_limit_are_refused(monkeypatch):
    monkeypatch.setattr(video, "MAX_PIXELS", 100 * 100)
    with pytest.raises(Loc3rError) as e:
        video.to_rgb(np.zeros((101, 100, 3), np.uint8), name="image big.png")
    assert str(e.value) == "image big.png is 100x101 pixels, larger than the 0 megapixel limit"


def test_sixteen_bit_image(tmp_path):
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), np.full((6, 6, 3), 40000, np.uint16))
    rgb, _ = next(iter(sample_frames(open_video(str(path)))))
    assert rgb.dtype == np.uint8 and int(rgb[0, 0, 0]) == 40000 >> 8


def test_gstreamer_and_camera_errors(monkeypatch):
    monkeypatch.setattr(video, "gstreamer_available", lambda: False)
    with pytest.raises(Loc3rError) as e:
        open_video("videotestsrc ! videoconvert ! appsink")
    assert str(e.value) == (
        "this OpenCV was built without GStreamer, so it cannot open a pipeline "
        "(on Jetson use JetPack's python3-opencv)"
    )
    with pytest.raises(Loc3rError) as e:
        open_video("camera:97")
    assert str(e.value) == "cannot open camera 97 (no such device, or it is busy)"


def test_bad_sampling_options():
    with pytest.raises(Loc3rError, match="--fps must be positive"):
        SamplingOptions(fps=0)
    with pytest.raises(Loc3rError, match="--max-frames must be at least 1"):
        SamplingOptions(max_frames=0)


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG whose EXIF says 'rotate 90 CW' (orientation 6) comes out upright (portrait)."""
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:])
    rgb, _ = next(iter(sample_frames(open_video(str(path)))))
    assert rgb.shape == (40, 20, 3)
    assert rgb[:15].mean() > 240 and rgb[25:].mean() < 15  # the white half is now on top
