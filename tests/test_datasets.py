"""Manifests, labels, audio formats and crops, and the mixed batch sampler."""
import math
import os

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import datasets


def write_tone(path, seconds, sample_rate, channels=1, frequency=440.0):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    audio = 0.5 * np.sin(2 * np.pi * frequency * t)
    audio = np.stack([audio * (k + 1) / channels for k in range(channels)], 1)
    sf.write(path, audio.astype(np.float32), sample_rate)
    return path


def write_csv(folder, rows, name="manifest.csv"):
    path = os.path.join(folder, name)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_manifest_paths_splits_and_empty_labels(tmp_path):
    os.makedirs(tmp_path / "sub")
    write_tone(tmp_path / "sub" / "a.wav", 1, 8000)
    absolute = write_tone(tmp_path / "b.wav", 1, 8000)
    csv = write_csv(tmp_path, [{"path": "sub/a.wav", "split": "train", "label": "rock"},
                               {"path": str(absolute), "split": "valid", "label": ""}])
    manifest = datasets.read_manifest(csv)
    assert manifest["path"].tolist() == [str(tmp_path / "sub" / "a.wav"), str(absolute)]
    assert manifest["split"].tolist() == ["train", "val"]
    column = datasets.parse_labels(manifest, "label", "multiclass")
    assert column.labeled.tolist() == [True, False]
    assert column.values.tolist() == [0, -1] and column.classes == ["rock"]


def test_manifest_without_split_is_all_train(tmp_path):
    csv = write_csv(tmp_path, [{"path": "a.wav"}, {"path": "b.wav"}])
    assert datasets.read_manifest(csv)["split"].tolist() == ["train", "train"]


def test_multilabel_and_several_regression_columns(tmp_path):
    csv = write_csv(tmp_path, [
        {"path": "a.wav", "tags": "rock;guitar", "valence": "0.5", "arousal": "1"},
        {"path": "b.wav", "tags": "", "valence": "1.5", "arousal": "3"},
        {"path": "c.wav", "tags": "guitar", "valence": "", "arousal": "2"}])
    manifest = datasets.read_manifest(csv)
    tags = datasets.parse_labels(manifest, "tags", "multilabel")
    assert tags.classes == ["guitar", "rock"]
    assert tags.values.tolist() == [[1, 1], [0, 0], [1, 0]]
    assert tags.labeled.tolist() == [True, False, True]
    emotion = datasets.parse_labels(manifest, "valence,arousal", "regression")
    assert emotion.labeled.tolist() == [True, True, False]
    assert emotion.mean == pytest.approx([1.0, 2.0])
    assert emotion.values[0].tolist() == pytest.approx([0.5, 1.0])  # parsed in their own units
    assert emotion.standardized()[0].tolist() == pytest.approx([-1.0, -1.0])


@pytest.mark.parametrize("rows, columns, task, message", [
    ([{"file": "a.wav"}], "label", "multiclass", "no 'path' column"),
    ([{"path": "a.wav", "split": "training"}], "label", "multiclass", "line 2, column 'split'"),
    ([{"path": "a.wav", "v": "1"}, {"path": "b.wav", "v": "loud"}], "v", "regression", "line 3, column 'v'"),
    ([{"path": "a.wav", "key": "C major"}, {"path": "b.wav", "key": "H dur"}], "key", "multiclass",
     "line 3, column 'key'"),
    ([{"path": "a.wav"}], "genre", "multiclass", "label column 'genre' is not in"),
])
def test_bad_manifests_name_file_row_and_column(tmp_path, rows, columns, task, message):
    csv = write_csv(tmp_path, rows)
    with pytest.raises(datasets.ManifestError, match=message) as error:
        manifest = datasets.read_manifest(csv)
        datasets.parse_labels(manifest, columns, task, "key" if columns == "key" else "generic")
    assert str(csv) in str(error.value) or "no 'path'" not in message


def test_key_spellings():
    assert datasets.parse_key("C major") == 0
    assert datasets.parse_key("A minor") == 21
    assert datasets.parse_key("c#:min") == 13
    assert datasets.parse_key("Bb maj") == 10
    assert datasets.parse_key("F# minor") == 18
    assert datasets.parse_key("Ebm") == 15
    with pytest.raises(ValueError):
        datasets.parse_key("X minor")


def test_key_similarity_values():
    similarity = datasets.key_similarity()
    c_major, g_major, f_major, a_minor, c_minor = 0, 7, 5, 21, 12
    assert similarity[c_major, c_major] == 1.0
    assert similarity[c_major, g_major] == similarity[c_major, f_major] == 0.5
    assert similarity[c_major, a_minor] == similarity[a_minor, c_major] == 0.3
    assert similarity[c_major, c_minor] == 0.2
    assert similarity[c_major, 1] == 0.0
    assert torch.equal(similarity, similarity.T)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None)])
@pytest.mark.parametrize("source_rate, channels", [(44100, 2), (48000, 1)])
def test_formats_rates_and_channels_give_exact_crops(tmp_path, fmt, subtype, source_rate, channels):
    path = str(tmp_path / f"tone.{fmt.lower()}")
    t = np.arange(2 * source_rate) / source_rate
    audio = np.stack([0.4 * np.sin(2 * np.pi * 441 * t)] * channels, 1).astype(np.float32)
    sf.write(path, audio, source_rate, format=fmt, subtype=subtype)
    crops = datasets.read_crops(path, 2, 8000, 16000, np.random.default_rng(0))
    assert crops.shape == (2, 8000) and crops.dtype == torch.float32
    spectrum = torch.fft.rfft(crops[0]).abs()
    assert spectrum.argmax().item() * 16000 / 8000 == pytest.approx(441, abs=3)  # frequency kept after resampling
    clips = datasets.read_clips(path, 8000, 16000)
    assert clips.shape == (4, 8000)


def test_views_do_not_overlap_when_the_file_is_long_enough(tmp_path):
    sample_rate = 8000
    ramp = (np.arange(4 * sample_rate) / (4 * sample_rate)).astype(np.float32)  # a sample's value gives its time
    path = str(tmp_path / "ramp.wav")
    sf.write(path, ramp, sample_rate, subtype="FLOAT")
    for seed in range(10):
        crops = datasets.read_crops(path, 2, sample_rate, sample_rate, np.random.default_rng(seed))
        starts = sorted(float(c[0]) * 4 * sample_rate for c in crops)
        assert starts[1] - starts[0] >= sample_rate - 1


def test_short_files_pad_or_fail(tmp_path):
    half = write_tone(str(tmp_path / "half.wav"), 0.6, 8000)
    crops = datasets.read_crops(half, 2, 8000, 8000, np.random.default_rng(0))
    assert crops.shape == (2, 8000) and crops[:, -1000:].abs().max() == 0
    tiny = write_tone(str(tmp_path / "tiny.wav"), 0.2, 8000)
    with pytest.raises(datasets.AudioError, match="shorter than half"):
        datasets.read_crops(tiny, 2, 8000, 8000, np.random.default_rng(0))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(datasets.AudioError, match="cannot read"):
        datasets.read_crops(str(broken), 2, 8000, 8000, np.random.default_rng(0))


def test_long_file_crop_reads_only_the_crop(tmp_path, monkeypatch):
    path = str(tmp_path / "long.flac")
    sample_rate = 22050
    sf.write(path, np.full(600 * sample_rate, 0.1, dtype=np.float32), sample_rate, subtype="PCM_16")
    frames_read = []

    class CountingSoundFile(sf.SoundFile):
        def read(self, frames=-1, *args, **kwargs):
            frames_read.append(frames)
            return super().read(frames, *args, **kwargs)

    monkeypatch.setattr(datasets.sf, "SoundFile", CountingSoundFile)
    crops = datasets.read_crops(path, 2, 59535, sample_rate, np.random.default_rng(0))
    assert crops.shape == (2, 59535)
    assert len(frames_read) == 2 and all(0 < f <= 59535 + 1 for f in frames_read)  # never the whole 10 minutes


@pytest.mark.parametrize("labeled_fraction, labeled_per_batch", [(1.0, 0.5), (0.25, 0.25), (0.1, 0.75), (1.0, 0.0),
                                                                (0.5, 1.0)])
def test_sampler_proportions(labeled_fraction, labeled_per_batch):
    labeled = np.zeros(200, dtype=bool)
    labeled[:80] = True
    labeled_rows, unlabeled_rows = datasets.split_pools(labeled, np.arange(200), labeled_fraction, seed=3)
    assert len(labeled_rows) == round(80 * labeled_fraction)
    assert set(labeled_rows) | set(unlabeled_rows) == set(range(200))
    sampler = datasets.MixedBatchSampler(labeled_rows, unlabeled_rows, 16, labeled_per_batch, seed=1)
    iterator = iter(sampler)
    counts = []
    for _ in range(100):
        batch = next(iterator)
        assert len(batch) == 16
        labeled_draws = [row for row, _, pool in batch if pool == 1]
        assert set(labeled_draws) <= set(labeled_rows.tolist())
        counts.append(len(labeled_draws))
    assert set(counts) == {int(16 * labeled_per_batch)}


def test_sampler_cycles_small_pool_and_resumes_exactly():
    sampler = datasets.MixedBatchSampler(np.arange(5), np.arange(5, 105), 8, 0.5, seed=0)
    stream = [sampler.batch(step) for step in range(20)]
    seen = [row for batch in stream[:5] for row, _, pool in batch if pool == 1]
    assert sorted(seen) == sorted(list(range(5)) * 4)  # every labeled row once per pass
    resumed = iter(datasets.MixedBatchSampler(np.arange(5), np.arange(5, 105), 8, 0.5, seed=0, start_step=12))
    assert [next(resumed) for _ in range(8)] == stream[12:]


def test_labeled_count_is_floored_as_the_authors():
    assert datasets.MixedBatchSampler(np.arange(50), np.arange(50, 500), 96, 0.05, seed=0).num_labeled == 4
    assert datasets.MixedBatchSampler(np.arange(50), np.arange(50, 500), 100, 0.29, seed=0).num_labeled == 29


@pytest.mark.parametrize("labeled, unlabeled, batch_size", [(5, 100, 8), (50, 50, 96), (7, 9, 12), (30, 60, 48),
                                                            (300, 500, 96)])
def test_no_row_twice_in_a_batch_while_passes_stay_exact(labeled, unlabeled, batch_size):
    pools = (np.arange(labeled), np.arange(labeled, labeled + unlabeled))
    sampler = datasets.MixedBatchSampler(*pools, batch_size, 0.5, seed=2)
    stream = [sampler.batch(step) for step in range(1000)]
    assert all(len({row for row, *_ in batch}) == batch_size for batch in stream)
    for pool, rows in ((1, pools[0]), (0, pools[1])):
        drawn = np.array([row for batch in stream for row, _, p in batch if p == pool])
        whole = len(drawn) // len(rows) * len(rows)
        passes = np.sort(drawn[:whole].reshape(-1, len(rows)), axis=1)
        assert (passes == rows).all()  # every row once per pass
    resumed = datasets.MixedBatchSampler(*pools, batch_size, 0.5, seed=2, start_step=993)
    assert [next(iter(resumed)) for _ in range(1)] == stream[993:994]
    assert [resumed.batch(step) for step in range(994, 1000)] == stream[994:]


def test_ranks_take_disjoint_shares_of_the_global_batch():
    args = (np.arange(30), np.arange(30, 130), 12, 0.5)
    whole = datasets.MixedBatchSampler(*args, seed=4).batch(7)
    shares = [datasets.MixedBatchSampler(*args, seed=4, rank=r, world_size=3).batch(7) for r in range(3)]
    assert sorted(d for share in shares for d in share) == sorted(whole)
    assert all(sum(d.pool == 1 for d in share) == 2 for share in shares)


def test_dataset_replaces_bad_files_and_counts_them(tmp_path):
    good = write_tone(str(tmp_path / "good.wav"), 2, 8000)
    bad = str(tmp_path / "bad.wav")
    open(bad, "wb").close()
    column = datasets.LabelColumn(columns=["label"], task="multiclass", classes=["a"],
                                  values=np.array([0, 0]), labeled=np.array([True, True]))
    dataset = datasets.ClipDataset([good, bad], [column], {1: np.array([0, 1]), 0: np.array([0, 1])},
                                   2, 4000, 8000)
    item = dataset[datasets.ClipDraw(1, 5, 1)]
    assert item["audio"].shape == (2, 4000) and item["clip"] == 0
    assert item["failed"] >= 1 and bad in item["failed_paths"]
    assert item["labeled"] == [True]
    only_bad = datasets.ClipDataset([bad], [], {0: np.array([0])}, 2, 4000, 8000)
    with pytest.raises(datasets.AudioError, match="failed to load"):
        only_bad[datasets.ClipDraw(0, 1, 0)]


def test_class_similarity_file_errors(tmp_path):
    manifest = pd.DataFrame({"path": ["a", "b"], "split": ["train", "train"], "genre": ["rock", "jazz"],
                             "source": ["m.csv"] * 2, "source_row": [2, 3]})
    good = tmp_path / "good.csv"
    pd.DataFrame([[1.0, 0.4], [0.4, 1.0]], index=["jazz", "rock"], columns=["jazz", "rock"]).to_csv(good)
    column = datasets.parse_labels(manifest, "genre", "multiclass", similarity=str(good))
    torch.testing.assert_close(column.similarity, torch.tensor([[1.0, 0.4], [0.4, 1.0]]))
    outside = tmp_path / "outside.csv"
    pd.DataFrame([[1.0, 1.4], [0.4, 1.0]], index=["jazz", "rock"], columns=["jazz", "rock"]).to_csv(outside)
    with pytest.raises(datasets.ManifestError, match=r"\('jazz', 'rock'\) = 1.4"):
        datasets.parse_labels(manifest, "genre", "multiclass", similarity=str(outside))
    extra = tmp_path / "extra.csv"
    names = ["jazz", "rock", "pop"]
    pd.DataFrame(np.eye(3), index=names, columns=names).to_csv(extra)
    with pytest.raises(datasets.ManifestError, match="absent from column 'genre': \\['pop'\\]"):
        datasets.parse_labels(manifest, "genre", "multiclass", similarity=str(extra))
    not_square = tmp_path / "rect.csv"
    pd.DataFrame([[1.0, 0.4]], index=["jazz"], columns=["jazz", "rock"]).to_csv(not_square)
    with pytest.raises(datasets.ManifestError, match="square"):
        datasets.parse_labels(manifest, "genre", "multiclass", similarity=str(not_square))


@pytest.mark.parametrize("rate", [16000, 44100])
def test_mp3_crops_and_clips_equal_the_whole_file_decoded_at_once(tmp_path, rate):
    """libsndfile 1.2 decodes the first frames of an MP3 read after a seek wrongly (tonal
    audio, up to 0.36 off on a 0.3 chirp); every crop and clip must still equal the file's frames."""
    mp3 = str(tmp_path / "chirp.mp3")
    t = np.arange(12 * rate) / rate
    sf.write(mp3, (0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t)).astype(np.float32), rate, format="MP3")
    with sf.SoundFile(mp3) as f:
        whole = torch.from_numpy(f.read(dtype="float32"))  # one read from the start: right
    with sf.SoundFile(mp3) as f:
        f.seek(5 * rate)
        assert (torch.from_numpy(f.read(4000, dtype="float32")) - whole[5 * rate:5 * rate + 4000]).abs().max() > 0.1
    draws = np.random.default_rng(0)
    crops, source_rate = datasets.read_source_crops(mp3, 2, 16000, 16000, np.random.default_rng(0))
    crop = math.ceil(16000 * rate / 16000) + 1
    starts = np.sort(draws.integers(0, len(whole) - 2 * crop + 1, size=2))
    starts = [int(s) + k * crop for k, s in enumerate(starts)]
    starts = [starts[k] for k in draws.permutation(2)]
    assert source_rate == rate
    # The crops read_source_crops drew, frame for frame (the decoder's float rounding may differ
    # in the last bit with where it started).
    for view, start in zip(crops, starts):
        assert (view - whole[start:start + crop]).abs().max() < 1e-6
    with sf.SoundFile(mp3) as f:
        read = datasets.frame_reader(f)
        for start in (0, 3 * rate + 17, 7 * rate):
            assert (read(start, 5000) - whole[start:start + 5000]).abs().max() < 1e-6


def test_cache_gives_the_decoded_audio_without_decoding(tmp_path):
    mp3 = str(tmp_path / "a.mp3")
    t = np.arange(3 * 44100) / 44100
    sf.write(mp3, np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * 2, 1).astype(np.float32), 44100, format="MP3")
    wav = write_tone(str(tmp_path / "b.wav"), 2.5, 16000, frequency=250)
    broken = tmp_path / "c.wav"
    broken.write_bytes(b"nothing")
    csv = write_csv(tmp_path, [{"path": "a.mp3", "split": "train", "label": "x"},
                               {"path": "b.wav", "split": "test", "label": "y"},
                               {"path": "c.wav", "split": "train", "label": "z"}])
    cached_csv = datasets.write_cache(csv, str(tmp_path / "cache"), 16000, workers=1)
    cached = datasets.read_manifest(cached_csv)
    assert len(cached) == 2 and cached["label"].tolist() == ["x", "y"]
    assert cached["source_path"].tolist() == [str(tmp_path / "a.mp3"), str(tmp_path / "b.wav")]
    for source, target in zip(cached["source_path"], cached["path"]):
        decoded = datasets.read_clips(source, 8000, 16000)
        from_cache = datasets.read_clips(target, 8000, 16000)
        assert from_cache.shape == decoded.shape
        assert (from_cache - decoded).abs().max() < 1e-4
    # Same rate, same seed: the same crop positions, so the same crops.
    same = datasets.read_crops(wav, 2, 8000, 16000, np.random.default_rng(3))
    from_cache = datasets.read_crops(cached["path"][1], 2, 8000, 16000, np.random.default_rng(3))
    assert (same - from_cache).abs().max() < 1e-4


def test_resampling_on_the_device_equals_resampling_in_workers(tmp_path):
    paths = [write_tone(str(tmp_path / f"{rate}.wav"), 1.5, rate, channels=2, frequency=300 + rate / 1000)
             for rate in (44100, 48000, 16000, 44100)]
    column = datasets.LabelColumn(columns=["label"], task="multiclass", classes=["a"],
                                  values=np.zeros(4, dtype=np.int64), labeled=np.ones(4, dtype=bool))
    pools = {0: np.arange(4)}
    draws = [datasets.ClipDraw(row, 100 + row, 0) for row in range(4)]
    in_workers = datasets.ClipDataset(paths, [column], pools, 2, 8000, 16000)
    on_device = datasets.ClipDataset(paths, [column], pools, 2, 8000, 16000, resample_here=False)
    expected = datasets.collate_clips([in_workers[d] for d in draws])
    batch = datasets.collate_clips([on_device[d] for d in draws])
    assert batch["audio"].shape[-1] > 8000 and batch["rate"].tolist() == [44100, 48000, 16000, 44100]
    resampled = datasets.resample_batch(batch["audio"], batch["rate"], 8000, 16000)
    assert resampled.shape == expected["audio"].shape == (4, 2, 8000)
    assert (resampled - expected["audio"]).abs().max() < 1e-5


def test_validation_batches_split_evenly_over_processes():
    labeled = np.zeros(31, dtype=bool)
    shares = [datasets.fixed_batches(np.arange(31), labeled, 8, seed=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    for batches in zip(*shares):
        assert len({len(b) for b in batches}) == 1  # the same number of clips on every process
    whole = datasets.fixed_batches(np.arange(31), labeled, 8, seed=0)
    assert sum(len(b) for b in whole) == 31


def write_ogg(path, seconds, sample_rate, frequency, block=2048):
    """A quiet tone written to OGG Vorbis block by block (libsndfile's Vorbis encoder
    takes long single writes badly)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    audio = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    with sf.SoundFile(path, "w", sample_rate, 1, format="OGG", subtype="VORBIS") as out:
        for start in range(0, len(audio), block):
            out.write(audio[start : start + block])
    return path


def soundtrack_library(folder, soundtracks=9, tracks=10):
    """Soundtrack/track.ogg: `soundtracks` folders of `tracks` short files each."""
    for s in range(soundtracks):
        os.makedirs(folder / f"Soundtrack {s}")
        for k in range(tracks):
            write_ogg(folder / f"Soundtrack {s}" / f"track {k:02d}.ogg", 0.3, 8000, 200.0 + 40 * s + 3 * k)
    return folder


def test_scan_by_file_stratified_puts_every_soundtrack_in_every_split_in_the_shares(tmp_path, capsys):
    library = soundtrack_library(tmp_path / "Library")
    out = tmp_path / "soundtracks.csv"
    datasets.main(["scan", str(library), "--out", str(out), "--label-from-folder", "soundtrack=1",
                   "--split", "0.7,0.1,0.2", "--group-by", "file", "--stratify", "soundtrack"])
    printed = capsys.readouterr().out
    frame = pd.read_csv(out)
    assert len(frame) == 90 and list(frame.columns[:3]) == ["path", "split", "soundtrack"]
    counts = frame.groupby("soundtrack")["split"].value_counts().unstack(fill_value=0)
    assert len(counts) == 9
    assert (counts["train"] == 7).all() and (counts["val"] == 1).all() and (counts["test"] == 2).all()
    assert "stratified by 'soundtrack': 9 labels; in train 9, val 9, test 9" in printed
    # Without stratifying, grouping by folder (the default) sends whole soundtracks to test:
    # the failure that --group-by file --stratify fixes.
    datasets.main(["scan", str(library), "--out", str(out), "--label-from-folder", "soundtrack=1",
                   "--split", "0.7,0.1,0.2"])
    frame = pd.read_csv(out)
    assert (frame.groupby("soundtrack")["split"].nunique() == 1).all()
    assert set(frame.loc[frame["split"] == "test", "soundtrack"]).isdisjoint(frame.loc[frame["split"] == "train", "soundtrack"])


def test_stratified_split_by_folder_never_splits_a_group(tmp_path):
    # Artist/Album/track.ogg: stratify by artist, group by album (level 2).
    library = tmp_path / "Library"
    for a in range(4):
        for b in range(6):
            os.makedirs(library / f"Artist {a}" / f"Album {b}")
            for k in range(1 + (a + b) % 3):
                write_ogg(library / f"Artist {a}" / f"Album {b}" / f"{k}.ogg", 0.2, 8000, 300.0 + 10 * k)
    out = tmp_path / "albums.csv"
    datasets.main(["scan", str(library), "--out", str(out), "--label-from-folder", "artist=1",
                   "--label-from-folder", "album=2", "--split", "0.5,0.2,0.3", "--group-by", "2",
                   "--stratify", "artist"])
    frame = pd.read_csv(out)
    frame["group"] = frame["artist"] + "/" + frame["album"]
    assert (frame.groupby("group")["split"].nunique() == 1).all()  # an album never straddles splits
    assert set(frame.loc[frame["split"] == "train", "artist"]) == set(frame["artist"])
    for artist, rows in frame.groupby("artist"):
        assert set(rows["split"]) == {"train", "val", "test"}, artist


def test_assign_splits_stratified_shares_and_group_by_file_keys():
    labels = [f"L{k % 3}" for k in range(60)]
    splits = datasets.assign_splits([str(k) for k in range(60)], (0.7, 0.1, 0.2), seed=1, strata=labels)
    for label in ("L0", "L1", "L2"):
        chosen = [s for s, l in zip(splits, labels) if l == label]
        assert (chosen.count("train"), chosen.count("val"), chosen.count("test")) == (14, 2, 4)
    # Without strata the result is the unstratified assignment, as before.
    groups = [f"g{k // 3}" for k in range(60)]
    assert datasets.assign_splits(groups, (0.7, 0.1, 0.2), seed=2) == \
        datasets.assign_splits(groups, (0.7, 0.1, 0.2), seed=2, strata=None)
    assert datasets.group_key(os.path.join("Soundtrack 1", "track.ogg"), "file") == "Soundtrack 1/track.ogg"
    assert datasets.parse_group_by("file") == "file" and datasets.parse_group_by("-2") == -2
    with pytest.raises(datasets.utils.UserError, match="--group-by"):
        datasets.parse_group_by("album")


def test_stratify_needs_a_label_column_and_a_split(tmp_path):
    library = soundtrack_library(tmp_path / "Library", soundtracks=2, tracks=2)
    with pytest.raises(datasets.utils.UserError, match="no such label column"):
        datasets.scan_folder(str(library), str(tmp_path / "m.csv"), folder_labels=[("soundtrack", 1)],
                             split=(0.7, 0.1, 0.2), stratify="genre")
    with pytest.raises(datasets.utils.UserError, match="needs --split"):
        datasets.scan_folder(str(library), str(tmp_path / "m.csv"), folder_labels=[("soundtrack", 1)],
                             stratify="soundtrack")
