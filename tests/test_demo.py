"""`make demo`: its SEED variable, and its last line, the README's claims checked on the run
just made (reports.demo_check and `python reports.py check`)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import probe
import reports
import safety
import synthetic
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = (("pitch_class", "accuracy", "semi-supervised", "self-supervised", 0.10),
          ("timbre", "accuracy", "self-supervised", "random", 0.10))


def result(checkpoint, probe_name, accuracy, label_map=0.5):
    """A results dict as probe.py writes it, with only what the check reads."""
    return {"checkpoint": checkpoint, "probe": probe_name, "test": {"accuracy": accuracy, "macro_f1": 0.0},
            "retrieval": {"label_map": label_map}}


def demo_results(pitch, timbre, prefix="runs/demo"):
    """Results of the demo's three encoders: pitch and timbre accuracy as (self, semi, random)."""
    names = [f"{prefix}-selfsup", f"{prefix}-semisup", "random"]
    return ([result(name, "pitch_class", value) for name, value in zip(names, pitch)]
            + [result(name, "timbre", value) for name, value in zip(names, timbre)])


def test_check_says_as_expected_with_the_measured_gaps():
    line = reports.demo_check(demo_results((0.30, 0.55, 0.45), (0.95, 0.85, 0.62)), CLAIMS)
    assert line == ("as expected: semi-supervised above self-supervised on pitch class by 0.25, "
                    "self-supervised above random on timbre by 0.33")


def test_check_names_each_encoder_by_its_folder_whatever_the_seed():
    results = demo_results((0.30, 0.55, 0.45), (0.95, 0.85, 0.62), prefix="runs/demo-seed3")
    assert reports.demo_check(results, CLAIMS).startswith("as expected: ")


def test_check_says_unexpected_when_the_order_turns_or_the_gap_shrinks():
    turned = reports.demo_check(demo_results((0.50, 0.40, 0.45), (0.95, 0.85, 0.62)), CLAIMS)
    assert turned == ("unexpected: semi-supervised 0.40 against self-supervised 0.50 on pitch class accuracy "
                      "(at least 0.10 above expected); see README, 'Start here'")
    narrow = reports.demo_check(demo_results((0.30, 0.55, 0.45), (0.70, 0.85, 0.62)), CLAIMS)
    assert narrow.startswith("unexpected: self-supervised 0.70 against random 0.62 on timbre accuracy")
    assert "pitch class" not in narrow  # the claim that held is not reported as a failure


def test_check_reads_retrieval_metrics_too():
    results = demo_results((0.30, 0.55, 0.45), (0.95, 0.85, 0.62))
    for r, value in zip(results, (0.2, 0.4, 0.1, 0.9, 0.8, 0.6)):
        r["retrieval"]["label_map"] = value
    claim = [("pitch_class", "label_map", "semi-supervised", "self-supervised", 0.15)]
    assert reports.demo_check(results, claim) == ("as expected: semi-supervised above self-supervised on pitch "
                                                  "class by 0.20")
    claim = [("pitch_class", "label_map", "semi-supervised", "self-supervised", 0.25)]
    assert reports.demo_check(results, claim).startswith("unexpected: ")


def test_check_says_unexpected_when_a_checkpoint_is_missing():
    results = [r for r in demo_results((0.30, 0.55, 0.45), (0.95, 0.85, 0.62)) if "semisup" not in r["checkpoint"]]
    assert reports.demo_check(results, CLAIMS) == ("unexpected: no pitch class accuracy for the semi-supervised "
                                                   "encoder; see README, 'Start here'")
    assert reports.demo_check([], CLAIMS).count("no ") == 2


def test_the_readme_states_exactly_the_claims_the_demo_checks():
    assert reports.DEMO_CLAIMS == CLAIMS  # this file's cases are about the claims the demo makes
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    for claim in reports.DEMO_CLAIMS:
        assert reports.claim_text(claim) in readme, f"README does not state: {reports.claim_text(claim)}"
    assert readme.count(" by at least ") == len(reports.DEMO_CLAIMS), "README states a claim the demo does not check"


def make_dry_run(*variables):
    """The commands `make demo` would run (make -n), one per line, continuations joined.

    Under `make test` this make is a sub-make: without --no-print-directory and a clean
    MAKEFLAGS it would print "Entering directory" lines around the commands.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/installed", "demo", *variables],
                         cwd=ROOT, env=env, text=True, capture_output=True, check=True).stdout
    return out.replace("\\\n", " ").splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_seed_seeds_both_trainings_and_the_probe_in_their_own_folders():
    commands = make_dry_run("SEED=3")
    assert [c.split()[1] for c in commands] == ["train.py", "train.py", "probe.py", "reports.py"]
    assert all(c.split().count("--seed") == 1 and "--seed 3 " in c for c in commands[:3])
    assert "--out runs/demo-seed3-selfsup" in commands[0] and "--out runs/demo-seed3-semisup" in commands[1]
    assert commands[3].endswith("reports.py check runs/demo-seed3-results.json")
    default = make_dry_run()
    assert "--out runs/demo-selfsup" in default[0] and "--seed 0 " in default[2]
    assert default[3].endswith("reports.py check runs/demo-results.json")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_steps_shortens_both_trainings_in_their_own_folders_without_the_check():
    commands = make_dry_run("STEPS=10")
    assert all(c.split().count("--steps") == 1 and "--steps 10 " in c for c in commands[:2])
    assert "--out runs/demo-steps10-selfsup" in commands[0] and "--out runs/demo-steps10-semisup" in commands[1]
    assert "--out runs/demo-steps10-results.json" in commands[2]
    assert commands[3].startswith("echo") and "not checked" in commands[3]  # the claims are for 150 steps
    assert all("--steps 150 " in c for c in make_dry_run()[:2])


def test_check_command_on_a_real_results_file_prints_the_functions_line_and_exits_0(tmp_path):
    manifest = synthetic.make_synthetic_set(str(tmp_path / "synthetic"), num_files=80, seconds=1.2, sample_rate=8000)
    model = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000"]
    train.main(model + ["--train-csv", manifest, "--out", str(tmp_path / "demo-selfsup"), "--steps", "2",
                        "--batch-size", "8", "--workers", "0", "--val-every", "0", "--save-every", "2",
                        "--augment", "none"])
    os.makedirs(tmp_path / "demo-semisup")
    shutil.copy(safety.list_checkpoints(str(tmp_path / "demo-selfsup"))[-1], tmp_path / "demo-semisup")
    out = str(tmp_path / "results.json")
    probe.main(["--checkpoint", str(tmp_path / "demo-selfsup"), "--checkpoint", str(tmp_path / "demo-semisup"),
                "--checkpoint", "random", *model, "--csv", manifest, "--label-column", "pitch_class",
                "--label-column", "timbre", "--head", "linear", "--retrieval", "--max-epochs", "2", "--patience", "2",
                "--cache-dir", str(tmp_path / "cache"), "--out", out])
    with open(out, encoding="utf-8") as f:
        expected = reports.demo_check(json.load(f))
    done = subprocess.run([sys.executable, "reports.py", "check", out], cwd=ROOT, text=True, capture_output=True)
    assert done.returncode == 0 and done.stdout == expected + "\n" and done.stderr == ""
    # The same encoder under both names: no gap, so the pitch-class claim cannot hold.
    assert expected.startswith("unexpected: semi-supervised ") and "see README, 'Start here'" in expected


def test_check_command_refuses_a_file_that_is_not_results_in_one_line(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{\"not\": \"a list\"}")
    done = subprocess.run([sys.executable, "reports.py", "check", str(path)], cwd=ROOT, text=True,
                          capture_output=True)
    assert done.returncode == 2 and done.stderr.startswith("reports.py: error: ") and len(done.stderr.splitlines()) == 1
