"""Embeddings of audio files for one's own use, the embedding cache the probe reads, and model files.

Embeddings of every file of a manifest or a folder (one row per clip, or per file):
    python export.py embeddings --checkpoint runs/my-music --csv "My Music" --out runs/my-music-embeddings
A model file for sharing (weights and the settings to embed; no optimizer state) from any checkpoint:
    python export.py model runs/my-music --out my-music-model.pt
One GPU: the same commands (the GPU is used when present). `probe.py --export-embeddings OUT`
runs the same export.

Every file this module writes goes through safety's atomic writer; the export's parts
folder and the cache folder are locked (safety.FolderLock), and a damaged part or cache
entry is embedded again, never a crash. Files are read clip by clip
(datasets.read_kept_clips), so memory stays flat in a file's length.
"""
import argparse
import hashlib
import io
import json
import os
import time
import zipfile
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import augment
import datasets
import models
import safety
import synthetic
import utils


def add_export_flags(group):
    """The flags of an export, the same in export.py embeddings and probe.py --export-embeddings."""
    group.add_argument("--per-track", action="store_true",
                       help="one row per file, the mean of its clips' embeddings")
    group.add_argument("--export-part-files", type=int, default=256,
                       help="files per part written to OUT.parts, the unit a rerun skips when it is done "
                            "(default %(default)s)")


def build_parser():
    """The command-line flags: the `embeddings` and `model` commands."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    embeddings = commands.add_parser("embeddings", allow_abbrev=False,
                                     help="embeddings of every file of --csv: OUT.npy and OUT.csv")
    embeddings.add_argument("--checkpoint", required=True,
                            help="checkpoint file, model file or run folder (its latest loadable file)")
    embeddings.add_argument("--csv", default=None,
                            help="a manifest or a folder of audio files (default: the synthetic set)")
    embeddings.add_argument("--synthetic-dir", default=".cache/synthetic", help="folder of the built-in synthetic set")
    embeddings.add_argument("--out", required=True,
                            help="OUT.npy (float32, one row per clip) and OUT.csv (row i: path, clip, "
                                 "start_seconds and the manifest's columns); resumable (parts in OUT.parts)")
    embeddings.add_argument("--layer", default="encoder", choices=("encoder", "projection"),
                            help="embeddings from the encoder output h or the projection head z")
    embeddings.add_argument("--max-clips", type=int, default=16,
                            help="consecutive clips kept per file, evenly spread, as the probe does (default "
                                 "%(default)s; raise it to keep every clip)")
    embeddings.add_argument("--batch-size", type=int, default=64, help="clips per forward pass (default %(default)s)")
    add_export_flags(embeddings)
    model = commands.add_parser("model", allow_abbrev=False,
                                help="a model file for sharing: weights and the settings to embed, no optimizer")
    model.add_argument("checkpoint", help="checkpoint file, model file or run folder (its latest loadable file)")
    model.add_argument("--out", required=True, help="the model file to write (e.g. model.pt)")
    return parser


# ---------------------------------------------------------------- the encoder and its embeddings

def load_encoder(checkpoint, args, device):
    """The model and its settings, from a checkpoint or model file (models.load_pretrained),
    or from the flags for 'random'.

    Returns (model, settings) with model a models.ContrastiveModel in eval mode and
    settings holding models.SETTINGS, a cache key (the file's SHA-256; for 'random', the
    flags and seed that build it) and what results record: file (the file read, None for
    'random'), step (training steps, 0 for 'random') and sha256 (the key's first 12 hex
    digits, None for 'random'). args: only read for 'random' (the model flags and --seed).
    """
    if checkpoint != "random":
        pretrained = models.load_pretrained(checkpoint, device=device)
        key = utils.file_digest(pretrained.file)
        return pretrained.model, dict(pretrained.settings, key=key, file=pretrained.file, step=pretrained.step,
                                      sha256=key[:12])
    settings = {"encoder": args.encoder, "width": args.width, "sample_rate": args.sample_rate,
                "clip_samples": int(round(args.clip_seconds * args.sample_rate)),
                "hidden_dim": args.hidden_dim, "projection_dim": args.projection_dim}
    key = "random-" + hashlib.sha256(f"{sorted(settings.items())}-{args.seed}".encode()).hexdigest()
    # A private RNG stream: building the random encoder leaves the caller's seed state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = models.build_model(settings)
    return model.to(device).eval(), dict(settings, key=key, file=None, step=0, sha256=None)


def corruption_generator(path, seed):
    """A CPU generator for one file's corruption draws, fixed by the seed and the file name.

    The file's base name (not its folder or manifest position) sets the stream, so the
    same file is corrupted the same way on every machine, for every checkpoint.
    """
    digest = hashlib.sha1(f"{seed}:{os.path.basename(path)}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def corruption_name(corruption):
    """'clean', or the transforms and severity, e.g. 'noise,reverb@1.5'."""
    return "clean" if corruption is None else f"{','.join(corruption['names'])}@{corruption['severity']:g}"


class Embedded(NamedTuple):
    """Clip embeddings of a list of files: x `[M, E]` float32, owners `[M]` file indices, clips `[M]`
    each row's index among its file's consecutive clips, failed: messages of unreadable files."""
    x: np.ndarray
    owners: np.ndarray
    clips: np.ndarray
    failed: list


@torch.no_grad()
def embed_files(model, paths, settings, layer, device, max_clips, corruption=None, batch_size=64, bar=None,
                allow_none=False):
    """Embeddings of every file's consecutive clips (datasets.read_kept_clips), optionally of corrupted audio.

    corruption: None, or {"names": transform names, "severity": s, "seed": int}; each
    file's clips `[K, T]` go through augment's chain with corruption_generator(path).
    A file that cannot be read is left out and listed; none readable is a UserError unless
    allow_none. bar: a tqdm bar advanced by one per file. Returns an Embedded.
    """
    chain = None
    if corruption is not None:
        chain = augment.build_chain(corruption["names"], corruption["severity"], settings["sample_rate"])
    chunks, owners, kept, failed, pending = [], [], [], [], []

    def flush():
        audio = torch.cat(pending).to(device)  # [m, T]
        chunks.append(models.embed(model, audio, layer).float().cpu())
        pending.clear()

    for index, path in enumerate(paths):
        try:
            clips, indices = datasets.read_kept_clips(path, settings["clip_samples"], settings["sample_rate"],
                                                      max_clips)
        except datasets.AudioError as error:
            failed.append(str(error))
            clips = None
        if clips is not None:
            if chain is not None:
                clips = chain(clips.to(device), corruption_generator(path, corruption["seed"]))  # [K, T]
            pending.append(clips)
            owners.extend([index] * len(clips))
            kept.extend(indices.tolist())
            if sum(len(p) for p in pending) >= batch_size:
                flush()
        if bar is not None:
            bar.update(1)
    if pending:
        flush()
    if not chunks and not allow_none:
        raise utils.UserError(f"none of the {len(paths)} files could be read, e.g. {failed[0] if failed else ''}; "
                              f"check them with `python train.py --check-data`")
    x = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)  # [M, E]
    return Embedded(x, np.array(owners, dtype=np.int64), np.array(kept, dtype=np.int64), failed)


def track_embeddings(embeddings, owners, tracks):
    """Track-level embeddings: the mean of each track's clip embeddings -> `[len(tracks), E]`.

    embeddings `[M, E]` (on any device; the result stays there), owners `[M]` track
    indices, tracks: the sorted distinct owners.
    """
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    index = torch.as_tensor(np.searchsorted(tracks, owners), device=x.device)
    summed = torch.zeros(len(tracks), x.shape[1], device=x.device).index_add_(0, index, x)
    counts = torch.zeros(len(tracks), device=x.device).index_add_(0, index, torch.ones(len(owners), device=x.device))
    return summed / counts[:, None]


# ---------------------------------------------------------------- the embedding cache

def hold(lock, seconds=120):
    """Acquire a FolderLock, waiting up to `seconds` for a live holder (cache writes take moments)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return lock.acquire()
        except utils.UserError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_cache_entry(base, index, count):
    """The Embedded stored at BASE.npy / BASE.json for `index`, or None with the reason printed.

    None when the entry is absent, written for other inputs, or damaged (truncated,
    unreadable, or rows that do not add up): the caller embeds again and rewrites it.
    """
    if not (os.path.isfile(base + ".npy") and os.path.isfile(base + ".json")):
        return None
    try:
        with open(base + ".json", encoding="utf-8") as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in index} != index or "clip_index" not in saved:
            print(f"embedding cache: {base}.json was written for other inputs or by an older version; rebuilding it")
            return None
        x = np.load(base + ".npy", allow_pickle=False)
        owners = np.repeat(np.arange(count), saved["clips"])  # [M]
        if x.ndim != 2 or len(x) != len(owners) or len(saved["clip_index"]) != len(owners):
            raise ValueError(f"{len(x)} rows for {len(owners)} clips")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
        print(f"embedding cache: {base} is damaged ({str(error).splitlines()[0][:120]}); rebuilding it")
        return None
    return Embedded(x, owners, np.asarray(saved["clip_index"], dtype=np.int64), saved["failed"])


def cached_embeddings(model, paths, settings, args, device, corruption=None):
    """embed_files over `paths`, cached in --cache-dir as DIGEST.npy plus a DIGEST.json index.

    The digest covers the checkpoint's SHA-256 (settings["key"]), the files and their
    modification times, the layer, the clip settings and the corruption, so embeddings of
    another checkpoint (even one saved under the same file name) are never reused: a new
    checkpoint gets its own entry, and the message says so. The index records these
    inputs and is checked on load; a damaged entry is rebuilt. Entries are written under
    the cache folder's lock (the writes only, so that probes can share a cache). Returns an
    Embedded (its clip indices are not cached: zeros on reuse).
    """
    paths = list(paths)
    if args.cache_dir == "none":
        return embed_files(model, paths, settings, args.layer, device, args.max_clips, corruption)
    files = json.dumps([paths, [os.path.getmtime(p) if os.path.exists(p) else 0 for p in paths]])
    index = {"checkpoint": settings["key"], "files": hashlib.sha1(files.encode()).hexdigest(),
             "num_files": len(paths), "layer": args.layer, "max_clips": args.max_clips,
             "sample_rate": settings["sample_rate"], "clip_samples": settings["clip_samples"],
             "corruption": corruption}
    base = os.path.join(args.cache_dir, hashlib.sha1(json.dumps(index, sort_keys=True).encode()).hexdigest()[:20])
    found = read_cache_entry(base, index, len(paths))
    if found is not None:
        print(f"embedding cache: reusing {base}.npy (checkpoint {settings['key'][:12]}, "
              f"{corruption_name(corruption)})")
        return found
    print(f"embedding cache: extracting {len(paths)} files with checkpoint {settings['key'][:12]} "
          f"({corruption_name(corruption)}) into {base}.npy")
    embedded = embed_files(model, paths, settings, args.layer, device, args.max_clips, corruption)
    lock = hold(safety.FolderLock(args.cache_dir, f"--cache-dir {args.cache_dir}", name="cache.lock"))
    try:
        safety.write_file(base + ".npy", lambda f: np.save(f, embedded.x))
        # The index last: an entry without it is incomplete and is rebuilt.
        safety.write_json(base + ".json", index | {
            "clips": np.bincount(embedded.owners, minlength=len(paths)).tolist(),
            "clip_index": embedded.clips.tolist(), "failed": embedded.failed})
    finally:
        lock.release()
    return embedded


# ---------------------------------------------------------------- export in parts

def open_export_parts(parts, job):
    """Prepare the (locked) parts folder of an export; empty it first if its parts are of another job.

    job: the inputs that decide the parts' contents (checkpoint, files, flags), kept in
    PARTS/job.json so that a rerun with the same inputs continues.
    """
    job_file = os.path.join(parts, "job.json")
    try:
        with open(job_file, encoding="utf-8") as f:
            previous = json.load(f)
    except FileNotFoundError:
        previous = job
    except (OSError, ValueError):
        previous = None  # a damaged job file: its parts cannot be trusted
    if previous != job:
        print(f"export: {parts} holds parts of other inputs (checkpoint, files or flags); starting over")
        for name in os.listdir(parts):
            if name.startswith("part-"):
                os.remove(os.path.join(parts, name))
    safety.write_json(job_file, job)


def embed_part(model, paths, rows, settings, args, device, bar):
    """Embeddings of the files at `rows`, in batches of about --batch-size clips.

    Returns (x `[clips, E]` float32, or `[tracks, E]` with --per-track; table with
    row and clip / start_seconds, or row and clips; messages of the unreadable files).
    """
    embedded = embed_files(model, [paths[r] for r in rows], settings, args.layer, device, args.max_clips,
                           batch_size=args.batch_size, bar=bar, allow_none=True)
    x, owners = embedded.x, np.asarray(rows, dtype=np.int64)[embedded.owners]  # x [clips, E]
    if args.per_track and len(owners):
        tracks = np.unique(owners)
        x = track_embeddings(x, owners, tracks).numpy()  # [tracks, E]
        return x, pd.DataFrame({"row": tracks, "clips": np.bincount(owners)[tracks]}), embedded.failed
    clip_seconds = settings["clip_samples"] / settings["sample_rate"]
    table = pd.DataFrame({"row": owners, "clip": embedded.clips})
    table["start_seconds"] = (table["clip"] * clip_seconds).round(6)
    return x, table, embedded.failed


def write_part(path, x, table, skipped):
    """Save one finished part as one file (PART.npz: x, the table's columns, the skipped messages)."""
    buffer = io.BytesIO()
    np.savez(buffer, x=x.astype(np.float32), skipped=np.array(json.dumps(skipped)),
             **{f"column_{c}": table[c].to_numpy() for c in table.columns})
    safety.write_bytes(path, buffer.getvalue())


def read_part(path):
    """(x, table, skipped) of a part written by write_part, or None if absent or damaged (said why)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as part:
            table = pd.DataFrame({k[len("column_"):]: part[k] for k in part.files if k.startswith("column_")})
            return part["x"], table, json.loads(str(part["skipped"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        print(f"export: {path} is damaged ({str(error).splitlines()[0][:120]}); embedding its files again")
        return None


def join_parts(parts, csv, paths):
    """The parts in order: (x `[rows, E]` float32, table with row, skipped messages)."""
    arrays = [x for x, _, _ in parts if x.size]
    if not arrays:
        skipped = [message for _, _, messages in parts for message in messages]
        raise utils.UserError(f"none of the {len(paths)} files of {csv} could be read, e.g. "
                              f"{skipped[0] if skipped else ''}")
    return (np.concatenate(arrays).astype(np.float32), pd.concat([t for _, t, _ in parts], ignore_index=True),
            [message for _, _, messages in parts for message in messages])


def export_embeddings(args, checkpoint, out, device, flag="--out"):
    """Frozen embeddings of every file of args.csv, written for one's own use.

    Writes OUT.npy (float32 `[rows, E]`) and OUT.csv, whose row i describes row i: path
    (relative to OUT.csv's folder, so OUT.csv reads as a manifest), clip (its index among
    the file's consecutive clips), start_seconds, then the manifest's own columns; with
    --per-track one row per file (the mean of its clips; columns path, clips, ...). The
    clips and values are those the probe embeds. Files are embedded in parts of
    --export-part-files, each saved in OUT.parts/ as it finishes (a damaged one is
    embedded again), so a rerun with the same inputs skips finished parts; the parts are
    removed once OUT is complete. OUT's folder is checked writable first, and OUT.parts
    is locked: a second export to the same OUT stops in one line naming the first.
    flag: how the user named OUT (for messages). Returns {"npy", "csv", "rows", "dim", "skipped"}.
    """
    if args.export_part_files < 1:
        raise utils.UserError(f"--export-part-files {args.export_part_files}: must be at least 1")
    out = out[:-4] if out.endswith((".npy", ".csv")) else out
    out_folder, parts = os.path.dirname(os.path.abspath(out)), out + ".parts"
    safety.check_writable(out_folder, f"{flag} {out}")
    # Released however the export ends; on success remove_parts releases it as it goes.
    with safety.FolderLock(parts, f"{flag} {out}", name="export.lock") as lock:
        model, settings = load_encoder(checkpoint, args, device)
        csv = datasets.manifest_or_scan(args.csv, datasets.SCAN_CACHE) if args.csv else \
            synthetic.make_synthetic_set(args.synthetic_dir)
        manifest = datasets.read_manifest(csv)
        paths = list(manifest["path"])
        open_export_parts(parts, {"checkpoint": settings["key"], "layer": args.layer, "max_clips": args.max_clips,
                                  "per_track": args.per_track, "part_files": args.export_part_files,
                                  "files": hashlib.sha256(json.dumps(paths).encode()).hexdigest()})
        starts = range(0, len(paths), args.export_part_files)
        done = {k: read_part(os.path.join(parts, f"part-{k:05d}.npz")) for k in range(len(starts))}
        done = {k: part for k, part in done.items() if part is not None}
        if done:
            print(f"export: {len(done)} of {len(starts)} parts already in {parts}; continuing")
        with tqdm(total=len(paths), desc="embed", unit="file") as bar:
            for k, start in enumerate(starts):
                rows = list(range(start, min(start + args.export_part_files, len(paths))))
                if k in done:
                    bar.update(len(rows))
                    continue
                done[k] = embed_part(model, paths, rows, settings, args, device, bar)
                write_part(os.path.join(parts, f"part-{k:05d}.npz"), *done[k])
        x, table, skipped = join_parts([done[k] for k in range(len(starts))], csv, paths)  # x [rows, E]
        owners = table.pop("row").to_numpy()
        table.insert(0, "path", [os.path.relpath(paths[r], out_folder).replace(os.sep, "/") for r in owners])
        for column in [c for c in manifest.columns if c not in ("path", "source", "source_row")]:
            table[column] = manifest[column].to_numpy()[owners]
        safety.write_file(out + ".npy", lambda f: np.save(f, x))
        safety.write_csv(out + ".csv", table)
        remove_parts(parts, lock)
    unit = "track" if args.per_track else "clip"
    warned = sum(p in datasets.DECODER_WARNINGS for p in paths)
    print(f"embeddings: {x.shape[0]} {unit}s x {x.shape[1]} ({args.layer}, {checkpoint}, step {settings['step']}) -> "
          f"{out}.npy, row i described by row i of {out}.csv; {len(skipped)} unreadable file(s) skipped"
          + (f"; {warned} file(s) with decoder warnings (caught)" if warned else ""))
    for message in skipped[:10]:
        print(f"  skipped: {message}")
    return {"npy": out + ".npy", "csv": out + ".csv", "rows": int(x.shape[0]), "dim": int(x.shape[1]),
            "skipped": skipped}


def remove_parts(parts, lock):
    """Delete a finished export's parts folder, its lock last (held until then)."""
    for name in os.listdir(parts):
        if name != os.path.basename(lock.path):
            os.remove(os.path.join(parts, name))
    os.remove(lock.path)
    lock.release()
    try:
        os.rmdir(parts)
    except OSError as error:
        # Only a second export that started in the moment since the lock file went leaves files here.
        print(f"export: {parts} left in place: {error.strerror}")


# ---------------------------------------------------------------- a model file for sharing

def export_model(checkpoint, out):
    """Write the model file for sharing of a checkpoint (safety.model_file): weights, the
    settings to embed, labels, step and format; no optimizer state. It loads with
    weights_only=True in models.load_pretrained, torch.hub and probe.py, not in --resume.
    Returns {"path", "bytes", "step", "source"}."""
    safety.check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}")
    found, state = safety.find_checkpoint(checkpoint)
    if state is None:
        raise safety.CheckpointError(f"{checkpoint}: no checkpoint or model file in this folder loads")
    safety.save_torch(out, safety.model_file(state))
    size = os.path.getsize(out)
    print(f"model file: {out} ({size:,} bytes, step {state['step']}, from {found}): weights and the settings to "
          f"embed, no optimizer state; load it with models.load_pretrained or probe.py --checkpoint")
    return {"path": out, "bytes": size, "step": int(state["step"]), "source": found}


def main(argv=None):
    """Run the `embeddings` or `model` command; returns what export_embeddings or export_model returns."""
    args = build_parser().parse_args(argv)
    if args.command == "model":
        return export_model(args.checkpoint, args.out)
    if args.checkpoint == "random":
        raise utils.UserError("--checkpoint random: export.py embeds a trained model; for a random-init encoder "
                              "use probe.py --checkpoint random --export-embeddings OUT with its model flags")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return export_embeddings(args, args.checkpoint, args.out, device)


if __name__ == "__main__":
    utils.run_cli(main)
