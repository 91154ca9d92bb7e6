"""More like this: the tracks nearest to a query, by cosine similarity of embeddings; and how
well that similarity finds the same track or the same label (probe.py --retrieval).

From an embeddings export (export.py embeddings, or probe.py --export-embeddings), a query
by row of OUT.csv, by a path in it, or an audio file embedded with the export's checkpoint:
    python similar.py --embeddings runs/my-music-embeddings --query 0 -k 10
    python similar.py --embeddings runs/my-music-embeddings --checkpoint runs/my-music --query song.flac
From a checkpoint and a folder or manifest (embedded through the probe's embedding cache):
    python similar.py --checkpoint runs/my-music --csv "My Music" --query song.flac
No query: the k nearest of every track, as a CSV table (path, rank, neighbour, similarity):
    python similar.py --embeddings runs/my-music-embeddings --out runs/my-music-neighbours.csv
One GPU: the same commands (the GPU is used when present).

A track is the mean of its clip embeddings, compared by cosine similarity. The search is
exact: queries and library are taken in blocks of --block-size tracks, so memory holds one
block x block similarity matrix and the running top k, whatever the library's size.
Past about a million tracks an approximate index is faster (docs/own-music.md).
"""
import argparse
import os
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import datasets
import export
import safety
import utils

BLOCK_ELEMENTS = 1 << 24  # similarities held at once by the retrieval metrics (64 MiB of float32)


def build_parser():
    """The command-line flags, in groups: library, query, run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    library = parser.add_argument_group("library")
    library.add_argument("--embeddings", default=None, metavar="OUT",
                         help="an embeddings export: OUT.npy and OUT.csv (one row per clip, or per track with "
                              "--per-track); a track is the mean of its rows")
    library.add_argument("--checkpoint", default=None,
                         help="checkpoint file, model file or run folder: embeds --csv, or a --query audio file "
                              "not in --embeddings (then the checkpoint the export was made with)")
    library.add_argument("--csv", default=None,
                         help="with --checkpoint and no --embeddings: a manifest or a folder of audio files")
    library.add_argument("--layer", default="encoder", choices=("encoder", "projection"),
                         help="embeddings from the encoder output h or the projection head z (as the export)")
    library.add_argument("--max-clips", type=int, default=16,
                         help="consecutive clips per file, evenly spread, as the export (default %(default)s)")
    library.add_argument("--cache-dir", default=".cache/embeddings",
                         help="embedding cache folder for --csv, 'none' disables (default %(default)s)")
    query = parser.add_argument_group("query")
    query.add_argument("--query", default=None,
                       help="a row number of OUT.csv (its track), a path listed in the library, or an audio file "
                            "(embedded with --checkpoint); none: the neighbour table of the whole library")
    query.add_argument("-k", "--neighbours", type=int, default=10, dest="k",
                       help="nearest tracks shown or written per track, k (default %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None,
                     help="no --query: the neighbour table (CSV: path, rank, neighbour, similarity), default "
                          "OUT-neighbours.csv next to --embeddings, else neighbours.csv")
    run.add_argument("--block-size", type=int, default=4096,
                     help="tracks per block of the exact search: memory holds block x block similarities "
                          "(default %(default)s)")
    return parser


# ---------------------------------------------------------------- exact search in blocks

@torch.no_grad()
def nearest(queries, library, k, block=4096, exclude=None):
    """The k library rows most similar (cosine) to each query, exact, best first.

    queries `[Q, E]`, library `[N, E]`; exclude: `[Q]` library row each query leaves out
    (itself), or None. Queries and library are taken block x block, keeping a running top
    k, so memory is about block x (block + k) similarities. Returns (similarity `[Q, k']`,
    index `[Q, k']` int64) with k' = min(k, N - 1 if exclude is given else N).
    """
    queries, library = F.normalize(queries.float(), dim=1), F.normalize(library.float(), dim=1)
    k = min(k, len(library) - (exclude is not None))
    found_values, found_indices = [], []
    for start in range(0, len(queries), block):
        q = queries[start:start + block]  # [b, E]
        best = torch.empty(len(q), 0, device=q.device)
        best_index = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for first in range(0, len(library), block):
            similarity = q @ library[first:first + block].T  # [b, n]
            if exclude is not None:
                own = torch.as_tensor(exclude[start:start + block], device=q.device) - first
                inside = torch.nonzero((own >= 0) & (own < similarity.shape[1])).flatten()
                similarity[inside, own[inside]] = -float("inf")
            index = torch.arange(first, first + similarity.shape[1], device=q.device).expand_as(similarity)
            similarity, index = torch.cat([best, similarity], 1), torch.cat([best_index, index], 1)  # [b, k + n]
            top = similarity.topk(min(k, similarity.shape[1]), dim=1)
            best, best_index = top.values, index.gather(1, top.indices)
        found_values.append(best.cpu())
        found_indices.append(best_index.cpu())
    return torch.cat(found_values), torch.cat(found_indices)


# ---------------------------------------------------------------- retrieval metrics

@torch.no_grad()
def track_retrieval(x, owners):
    """Same-track retrieval: each clip of a track's first half queries the second-half clips of all tracks.

    x `[M, E]` clip embeddings, owners `[M]` their track (a track's clips in time order);
    a track of K clips has floor(K / 2) first-half clips (a one-clip track only adds a
    candidate). Cosine similarity; a candidate of another track that ties with the best
    own-track one ranks ahead. Returns {"track_top1": share of queries whose nearest
    candidate is of their own track, "track_mrr": mean of 1 / rank of the first own-track
    candidate}, nan without queries.
    """
    _, track, counts = np.unique(owners, return_inverse=True, return_counts=True)
    order = np.argsort(track, kind="stable")
    position = np.empty(len(track), dtype=np.int64)
    position[order] = np.arange(len(track)) - np.repeat(np.cumsum(counts) - counts, counts)
    is_query = position < counts[track] // 2
    x = F.normalize(torch.as_tensor(x).float(), dim=1)
    queries, candidates = x[torch.as_tensor(is_query)], x[torch.as_tensor(~is_query)]  # [Q, E], [C, E]
    query_track, candidate_track = torch.as_tensor(track[is_query]), torch.as_tensor(track[~is_query])
    ranks, block = [], max(1, BLOCK_ELEMENTS // max(1, len(candidates)))
    for start in range(0, len(queries), block):
        similarity = queries[start:start + block] @ candidates.T  # [b, C]
        own = query_track[start:start + len(similarity), None] == candidate_track[None, :]  # [b, C]
        best_own = similarity.masked_fill(~own, -float("inf")).max(1).values  # [b]
        ranks.append(1 + ((similarity >= best_own[:, None]) & ~own).sum(1))
    if not ranks:
        return {"track_top1": float("nan"), "track_mrr": float("nan")}
    ranks = torch.cat(ranks).double()  # [Q]
    return {"track_top1": float((ranks == 1).double().mean()), "track_mrr": float((1 / ranks).mean())}


@torch.no_grad()
def label_retrieval(x, labels, task, k=10):
    """Label retrieval: each track queries the others, ranked by cosine similarity.

    x `[N, E]` track embeddings; labels `[N]` class indices (multiclass: relevant = the same
    class) or `[N, C]` multi-hot tags (multilabel: relevant = at least one shared tag).
    Ties rank by track index. Returns {"label_p10": precision among the min(k, N - 1)
    nearest, "label_map": mean average precision}, both averaged over the queries that have
    at least one relevant track (nan when none has).
    """
    x = F.normalize(torch.as_tensor(x).float(), dim=1)
    labels = torch.as_tensor(labels)
    n, k = len(x), min(k, len(x) - 1)
    precision, average = [], []
    block = max(1, BLOCK_ELEMENTS // max(1, n))
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n))
        similarity = x[rows] @ x.T  # [b, N]
        if task == "multiclass":
            relevant = labels[rows, None] == labels[None, :]  # [b, N]
        else:
            relevant = (labels[rows].float() @ labels.float().T) > 0
        similarity[torch.arange(len(rows)), rows] = -float("inf")  # the query itself, ranked last and dropped
        order = similarity.argsort(dim=1, descending=True, stable=True)[:, :n - 1]  # [b, N - 1]
        hits = relevant.gather(1, order).double()  # [b, N - 1]
        found = hits.sum(1) > 0
        precision.append(hits[found, :k].mean(1))
        at_hit = hits.cumsum(1) / torch.arange(1, n, dtype=torch.float64)  # precision at each rank
        average.append((at_hit * hits).sum(1)[found] / hits.sum(1)[found])
    precision, average = torch.cat(precision), torch.cat(average)
    if not len(average):
        return {"label_p10": float("nan"), "label_map": float("nan")}
    return {"label_p10": float(precision.mean()), "label_map": float(average.mean())}


def retrieval_metrics(x, owners, labels, task):
    """probe.py --retrieval: track_retrieval on the clips, and label_retrieval on the tracks
    (the mean of their clips) for class and tag labels.

    x `[M, E]`, owners `[M]` (a track's clips in time order); labels: one per track, in the
    order of the sorted distinct owners. Returns a dict of floats.
    """
    result = track_retrieval(x, owners)
    if task in ("multiclass", "multilabel"):
        tracks = np.unique(owners)
        result |= label_retrieval(export.track_embeddings(x, owners, tracks), labels, task)
    return result


# ---------------------------------------------------------------- the library and the command

class Library(NamedTuple):
    """Tracks to search: paths `[n]` (absolute), x `[n, E]` track embeddings (the mean of each
    track's rows), owners `[rows]` the track of each row of the export (or clip)."""
    paths: list
    x: torch.Tensor
    owners: np.ndarray


def tracks_of(paths, x):
    """A Library from one row per clip (or per track): rows with the same path form a track."""
    owners, unique = pd.factorize(pd.Series(paths))
    return Library(list(unique), export.track_embeddings(x, owners, np.arange(len(unique))), owners)


def read_export(out):
    """The Library of an embeddings export OUT (OUT.npy and OUT.csv; OUT may end in either)."""
    out = out[:-4] if out.endswith((".npy", ".csv")) else out
    for path in (out + ".npy", out + ".csv"):
        if not os.path.isfile(path):
            raise utils.UserError(f"--embeddings {out}: {path} not found; write it with `python export.py "
                                  f"embeddings --checkpoint C --csv FOLDER --out {out}`")
    table = datasets.read_table(out + ".csv", required=("path",), needs_rows=True)
    try:
        x = np.load(out + ".npy", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise utils.UserError(f"{out}.npy cannot be read ({str(error).splitlines()[0][:120]}); export it again") \
            from None
    if x.ndim != 2 or len(x) != len(table):
        raise utils.UserError(f"{out}.npy has {len(x)} rows for {len(table)} rows of {out}.csv; export it again")
    folder = os.path.dirname(os.path.abspath(out + ".csv"))
    paths = [datasets.nfc(os.path.normpath(os.path.join(folder, p))) for p in table["path"]]
    return tracks_of(paths, torch.from_numpy(x))


def embed_library(args, model, settings, device):
    """The Library of args.csv (a manifest or a folder), through the embedding cache."""
    csv = datasets.manifest_or_scan(args.csv, datasets.SCAN_CACHE)
    paths = list(datasets.read_manifest(csv)["path"])
    embedded = export.cached_embeddings(model, paths, settings, args, device)
    for message in embedded.failed:
        print(f"skipped: {message}")
    return tracks_of([datasets.nfc(os.path.normpath(paths[o])) for o in embedded.owners], torch.from_numpy(embedded.x))


def find_query(args, library, model, settings, device):
    """The query's embedding `[1, E]`, its name, and the library track it is (or None).

    --query: a row number of the export (its track), a path in the library, or an audio
    file, embedded with the checkpoint (the mean of its clips).
    """
    text = args.query
    if text.isdigit() and not os.path.exists(text):
        row = int(text)
        if args.embeddings is None or row >= len(library.owners):
            raise utils.UserError(f"--query {text}: not a row of --embeddings (rows 0 to {len(library.owners) - 1} "
                                  f"of its CSV)" if args.embeddings else f"--query {text}: a row number needs "
                                  f"--embeddings")
        track = int(library.owners[row])
        return library.x[track:track + 1], f"row {row} ({os.path.relpath(library.paths[track])})", track
    path = datasets.nfc(os.path.normpath(os.path.abspath(text)))
    if path in library.paths:
        track = library.paths.index(path)
        return library.x[track:track + 1], text, track
    if not os.path.isfile(text):
        raise utils.UserError(f"--query {text}: not a row number, a path of the library or an audio file")
    if model is None:
        raise utils.UserError(f"--query {text}: this file is not in --embeddings; give --checkpoint (the one the "
                              f"export was made with) to embed it")
    embedded = export.embed_files(model, [text], settings, args.layer, device, args.max_clips)
    return torch.from_numpy(embedded.x).mean(0, keepdim=True), text, None  # [1, E]


def neighbour_table(library, k, block, folder):
    """Every track's k nearest others as a DataFrame: path, rank, neighbour, similarity (paths
    relative to `folder`)."""
    similarity, index = nearest(library.x, library.x, k, block, exclude=np.arange(len(library.paths)))
    shown = np.array([os.path.relpath(p, folder).replace(os.sep, "/") for p in library.paths], dtype=object)
    count = similarity.shape[1]
    return pd.DataFrame({"path": np.repeat(shown, count), "rank": np.tile(np.arange(1, count + 1), len(shown)),
                         "neighbour": shown[index.numpy().ravel()],
                         "similarity": similarity.numpy().ravel().round(6)})


def main(argv=None):
    """Print the k nearest tracks of --query, or write the neighbour table; returns what was
    printed as a list of (path, similarity), or the table's path."""
    args = build_parser().parse_args(argv)
    if (args.embeddings is None) == (args.csv is None) or (args.csv is not None and args.checkpoint is None):
        raise utils.UserError("give --embeddings OUT (an export), or --checkpoint C with --csv FOLDER")
    if args.checkpoint == "random":
        raise utils.UserError("--checkpoint random: similar.py searches a trained model's embeddings; export "
                              "random-init embeddings with probe.py --checkpoint random --export-embeddings OUT")
    if args.k < 1 or args.block_size < 1:
        raise utils.UserError("-k and --block-size must be at least 1")
    stem = args.embeddings[:-4] if args.embeddings and args.embeddings.endswith((".npy", ".csv")) else args.embeddings
    out = args.out or (f"{stem}-neighbours.csv" if stem else "neighbours.csv")
    if args.query is None:
        safety.check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}")
    if args.csv is not None and args.cache_dir != "none":
        safety.check_writable(args.cache_dir, f"--cache-dir {args.cache_dir}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, settings = export.load_encoder(args.checkpoint, args, device) if args.checkpoint else (None, None)
    library = read_export(args.embeddings) if args.embeddings else embed_library(args, model, settings, device)
    if args.query is None:
        table = neighbour_table(library, args.k, args.block_size, os.path.dirname(os.path.abspath(out)))
        safety.write_csv(out, table)
        print(f"neighbours: the {table['rank'].max()} nearest of each of {len(library.paths)} tracks (cosine) -> {out}")
        return out
    query, name, own = find_query(args, library, model, settings, device)
    similarity, index = nearest(query.to(device), library.x.to(device), args.k, args.block_size,
                                None if own is None else np.array([own]))
    found = [(library.paths[i], float(s)) for s, i in zip(similarity[0].tolist(), index[0].tolist())]
    print(f"nearest {len(found)} of {len(library.paths)} tracks to {name} (cosine of mean clip embeddings):")
    for rank, (path, value) in enumerate(found, 1):
        print(f"{rank:4d}  {value:.4f}  {os.path.relpath(path)}")
    return found


if __name__ == "__main__":
    utils.run_cli(main)
