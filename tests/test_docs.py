"""The docs and the scripts agree: every flag a script offers is documented, and every flag
the docs name exists; the README links only files that are in the repository."""
import contextlib
import glob
import io
import os
import re
import sys

import pytest

import bench
import datasets
import export
import manifests
import models
import probe
import similar
import synthetic
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
# Flags of other programs the docs show: torchrun, SLURM, pip, tensorboard, pytest, git.
OTHER_PROGRAMS = {"--nproc_per_node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--max-restarts",
                  "--standalone", "--node-rank", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
                  "--signal", "--requeue", "--open-mode", "--nodes", "--time", "--no-deps", "--target", "--no-index",
                  "--find-links", "--quiet", "--only-binary", "--platform", "--python-version", "--logdir",
                  "--durations", "--depth", "--rdzv_backend", "--rdzv_endpoint", "--monitor-interval", "--help"}
# Shown in the docs as a mistake that train.py refuses (no argparse abbreviations).
MISTAKES = {"--label-col"}


def help_text(run):
    """What a script prints for --help (argparse exits after printing it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run()
    return out.getvalue()


def script_flags():
    """{script: set of its flags}, from each parser's own --help (unwrapped: a wide terminal)."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"
    try:
        return {name: set(FLAG.findall(text)) - {"--help"} for name, text in help_texts().items()}
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def help_texts():
    """{script: its --help text}."""
    texts = {
        "train.py": train.build_parser().format_help(),
        "probe.py": probe.build_parser().format_help(),
        "similar.py": similar.build_parser().format_help(),
        "export.py": "".join(help_text(lambda c=c: export.main([c, "--help"])) for c in ("embeddings", "model")),
        "manifests.py": manifests.build_parser().format_help(),
        "bench.py": bench.build_parser().format_help(),
        "datasets.py": "".join(help_text(lambda c=c: datasets.main([c, "--help"])) for c in ("scan", "cache")),
        "synthetic.py": synthetic.build_parser().format_help(),
    }
    argv = sys.argv
    try:
        sys.argv = ["models.py", "--help"]
        texts["models.py"] = help_text(models.parse_args)
    finally:
        sys.argv = argv
    return texts


def documents():
    paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    texts = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts[os.path.relpath(path, ROOT)] = f.read()
    return texts


def test_every_flag_of_every_script_is_documented():
    docs = "\n".join(documents().values())
    named = set(FLAG.findall(docs))
    missing = {script: sorted(flags - named) for script, flags in script_flags().items() if flags - named}
    assert not missing, f"flags in --help that no doc names: {missing}"


def test_every_flag_the_docs_name_exists():
    known = set().union(*script_flags().values()) | OTHER_PROGRAMS | MISTAKES
    unknown = {name: sorted(set(FLAG.findall(text)) - known) for name, text in documents().items()}
    unknown = {name: flags for name, flags in unknown.items() if flags}
    assert not unknown, f"flags the docs name that no script has: {unknown}"


def test_docs_link_only_files_in_the_repository():
    for name, text in documents().items():
        folder = os.path.dirname(os.path.join(ROOT, name))
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" not in target:
                assert os.path.exists(os.path.join(folder, target)), f"{name} links {target}, which is not here"
        assert "METHOD.md" not in text and "../shared" not in text, f"{name} cites a file outside the repository"


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300


def test_readme_own_music_blocks_are_the_ones_the_tests_run():
    # tests/test_own_music.py runs docs/own-music.md's first bash and python blocks as written.
    texts = documents()
    for language in ("bash", "python"):
        readme = re.findall(rf"```{language}\n(.*?)```", texts["README.md"], re.S)
        docs = re.findall(rf"```{language}\n(.*?)```", texts[os.path.join("docs", "own-music.md")], re.S)
        assert readme and readme[0] == docs[0], f"README's {language} block differs from docs/own-music.md's"
