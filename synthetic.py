"""The built-in synthetic music set: notes and triads with pitch, key, timbre and tag labels.

train.py and probe.py write it (once, into --synthetic-dir) when no manifest is given, so
the quick start and the tests need no download. To write it yourself:
    python synthetic.py --out .cache/synthetic --num-files 480 --seconds 3.0 --sample-rate 16000
It prints the manifest's path; train on it with `python train.py --train-csv DIR/manifest.csv`.
"""
import argparse
import io
import os

import numpy as np
import pandas as pd
import soundfile as sf

import datasets
import safety

TIMBRES = ("pluck", "organ", "bowed", "bell")
SYNTHETIC_COLUMNS = ("path", "split", "pitch_class", "timbre", "pitch", "key", "tags", "brightness")


def _render(rng, midi_notes, timbre, seconds, sample_rate):
    """One note or chord of a timbre family, as float32 audio in [-1, 1]."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = np.zeros_like(t)
    vibrato_depth = rng.uniform(0.0, 0.006) if timbre in ("bowed", "organ") else 0.0
    vibrato = 1 + vibrato_depth * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    for midi in midi_notes:
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        for k in range(1, 16):
            if timbre == "bell":
                partial = k * (1 + 0.07 * (k - 1) ** 1.3)  # inharmonic partials
                amplitude = 1 / k
                decay = 1.5 + 0.8 * k
            elif timbre == "pluck":
                partial, amplitude, decay = k, 1 / k ** 1.2, 2.0 + 1.2 * k
            elif timbre == "organ":
                partial, amplitude, decay = k, (1 / k if k % 2 else 0.15 / k), 0.0
            else:
                partial, amplitude, decay = k, 1 / k, 0.3
            frequency = f0 * partial
            if frequency > 0.45 * sample_rate:
                break
            phase = 2 * np.pi * np.cumsum(frequency * vibrato) / sample_rate + rng.uniform(0, 2 * np.pi)
            out += amplitude * rng.uniform(0.7, 1.0) * np.exp(-decay * t) * np.sin(phase)
    attack = {"pluck": 0.005, "bell": 0.002, "organ": 0.03, "bowed": 0.25}[timbre]
    envelope = np.minimum(1.0, t / attack) * np.minimum(1.0, (t[-1] - t) / 0.05 + 1e-3)
    out = out * envelope + rng.uniform(0.002, 0.02) * rng.standard_normal(len(t))
    return (0.8 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def make_synthetic_set(folder, num_files=480, seconds=3.0, sample_rate=16000, seed=0):
    """Write the built-in synthetic music set (once) and return its manifest path.

    Each file is a note or chord (major or minor triad) with a random root between
    MIDI 48 and 71, one of four timbre families, random envelope details, vibrato and
    noise. Columns (SYNTHETIC_COLUMNS): path, split (70/15/15), pitch_class (root name),
    timbre, pitch (MIDI root), key (the triad as a key, e.g. "A minor"; empty for single
    notes), tags ("chord"/"note" plus timbre and "vibrato"), brightness (a number).
    """
    folder = os.path.abspath(folder)
    manifest = os.path.join(folder, "manifest.csv")
    if is_whole(folder, manifest, num_files):
        return manifest
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_files):
        root = int(rng.integers(48, 72))
        timbre = TIMBRES[index % len(TIMBRES)]
        is_chord = rng.random() < 0.5
        is_major = rng.random() < 0.5
        notes = [root, root + (4 if is_major else 3), root + 7] if is_chord else [root]
        audio = _render(rng, notes, timbre, seconds, sample_rate)
        name = f"audio/{index:04d}.wav"
        wav = io.BytesIO()
        sf.write(wav, audio, sample_rate, format="WAV", subtype="PCM_16")
        safety.write_bytes(os.path.join(folder, name), wav.getvalue())
        split = "train" if index % 20 < 14 else ("val" if index % 20 < 17 else "test")
        tags = ["chord" if is_chord else "note", timbre] + (["vibrato"] if timbre in ("bowed", "organ") else [])
        spectrum = np.abs(np.fft.rfft(audio))
        brightness = float((spectrum * np.arange(len(spectrum))).sum() / spectrum.sum() / len(spectrum))
        key = f"{datasets.NOTE_NAMES[root % 12]} {'major' if is_major else 'minor'}" if is_chord else ""
        rows.append({"path": name, "split": split, "pitch_class": datasets.NOTE_NAMES[root % 12], "timbre": timbre,
                     "pitch": root, "key": key, "tags": ";".join(tags), "brightness": round(brightness, 5)})
    safety.write_csv(manifest, pd.DataFrame(rows))
    return manifest


def is_whole(folder, manifest, num_files):
    """Whether a set written before is complete: its manifest reads, has `num_files` rows
    and the columns, and every file it names is a regular file that is not empty.

    A damaged manifest (a killed write from before writes were atomic, a disk error)
    reads as not whole, so the set is written again rather than crashing the run.
    """
    try:
        existing = datasets.read_table(manifest, required=SYNTHETIC_COLUMNS)
    except datasets.ManifestError:
        return False
    return len(existing) == num_files and list(existing.columns) == list(SYNTHETIC_COLUMNS) and \
        not any(datasets.file_problem(os.path.join(folder, p)) for p in existing["path"])


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", default=".cache/synthetic", help="folder for audio and manifest.csv")
    parser.add_argument("--num-files", type=int, default=480, help="number of files")
    parser.add_argument("--seconds", type=float, default=3.0, help="file length in seconds")
    parser.add_argument("--sample-rate", type=int, default=16000, help="sample rate in Hz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the notes, timbres and splits")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    print(make_synthetic_set(args.out, args.num_files, args.seconds, args.sample_rate, args.seed))


if __name__ == "__main__":
    main()
