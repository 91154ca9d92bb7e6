"""The four forks of docs/forking.md, each made in its one place and run end to end.

A test changes what a fork would change in the module (through monkeypatch, so the suite
stays clean), then trains (and probes) with it.
"""
import numpy as np
import pandas as pd
import pytest
import torch

import augment
import losses
import models
import probe
import train
from test_reliability import tiny_set, train_args  # noqa: F401
from test_validation import scalars


class TinyConv(torch.nn.Module):
    """A new encoder written to the contract at the top of models.py: two blocks through apply_block."""

    def __init__(self, num_samples, sample_rate, width=1.0):
        super().__init__()
        channels = models.scaled_channels(64, width)
        self.blocks = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.Conv1d(1, channels, 9, stride=4), torch.nn.BatchNorm1d(channels),
                                torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 9, stride=4), torch.nn.BatchNorm1d(channels),
                                torch.nn.ReLU())])
        self.embed_dim = channels
        self.is_checkpointed = False

    def forward(self, x):
        h = x[:, None]  # [B, 1, T]
        for block in self.blocks:
            h = models.apply_block(block, h, is_checkpointed=self.is_checkpointed)
        return h.mean(-1)  # [B, embed_dim]


def test_a_new_encoder_registered_in_one_place_trains_and_probes(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setitem(models.ENCODERS, "tinyconv", TinyConv)
    assert models.check_encoder(models.build_encoder("tinyconv", 4000, 8000, 0.125), 4000) == []
    out = tmp_path / "run"
    result = train.main(train_args(tiny_set, out, 3, "--encoder", "tinyconv", "--activation-checkpointing"))
    assert result["step"] == 3 and (out / "model.pt").exists()
    results = probe.main(["--checkpoint", str(out), "--csv", tiny_set, "--label-column", "timbre", "--head",
                          "linear", "--max-epochs", "3", "--out", str(tmp_path / "probe.json")])
    assert results[0]["test"]["accuracy"] * 6 == pytest.approx(round(results[0]["test"]["accuracy"] * 6))


def test_a_loss_variant_in_losses_changes_training_and_its_logged_parts(tiny_set, tmp_path, monkeypatch):
    train.main(train_args(tiny_set, tmp_path / "plain", 2, "--label-column", "timbre"))
    real = losses.log_probabilities

    def hard_negatives(z, temperature=0.1, anchors=None):
        # Sharper over the negatives; the self-pair's large negative value stays finite (clamped).
        return torch.log_softmax(real(z, temperature, anchors).clamp(min=-1e4) * 1.5, dim=1)

    monkeypatch.setattr(losses, "log_probabilities", hard_negatives)
    train.main(train_args(tiny_set, tmp_path / "variant", 2, "--label-column", "timbre"))
    plain, variant = scalars(str(tmp_path / "plain")), scalars(str(tmp_path / "variant"))
    for tag in ("loss/total", "loss/views", "loss/labels"):
        assert np.isfinite(variant[tag][0]) and variant[tag][0] != pytest.approx(plain[tag][0], rel=1e-3), tag


def test_a_new_transform_in_augment_joins_the_chain_by_name(tiny_set, tmp_path, monkeypatch):
    calls = []

    def swap_channels_of_time(x, amount):
        calls.append(len(x))
        return torch.roll(x, 1, dims=-1) * amount[:, None].to(x.device)

    def sample_swap(n, length, setting, draw, sample_rate):
        return {"amount": draw.uniform(*setting["amount"], n)}

    monkeypatch.setitem(augment.SEVERITY_TABLE, "roll", lambda s: {"p": 1.0, "amount": (1 - 0.1 * s, 1.0)})
    monkeypatch.setitem(augment.TRANSFORMS, "roll", (swap_channels_of_time, sample_swap))
    monkeypatch.setattr(augment, "TRANSFORM_NAMES", augment.TRANSFORM_NAMES + ("roll",))
    result = train.main(train_args(tiny_set, tmp_path / "run", 2, "--augment", "gain,roll"))
    assert result["step"] == 2 and calls


def test_a_new_supervision_signal_needs_a_column_and_its_flags(tiny_set, tmp_path, monkeypatch):
    # Domain knowledge as a class similarity: timbres that share an excitation are half positives.
    similarity = tmp_path / "timbre-similarity.csv"
    names = ["bell", "bowed", "organ", "pluck"]
    table = np.eye(4)
    table[0, 3] = table[3, 0] = 0.5  # bell and pluck: both struck
    pd.DataFrame(table, index=names, columns=names).to_csv(similarity)
    seen = []
    real = losses.semisupcon_loss

    def recording(z, clip_ids, signals=(), *args, **kwargs):
        seen.extend(signals)
        return real(z, clip_ids, signals, *args, **kwargs)

    monkeypatch.setattr(losses, "semisupcon_loss", recording)
    train.main(train_args(tiny_set, tmp_path / "run", 2, "--label-column", "timbre", "--class-similarity",
                          str(similarity)))
    # The batches' signal carries the similarity, in the column's class order; its targets take it.
    spec = seen[0].spec
    assert spec.similarity.tolist() == table.tolist()  # names sorted as the column's classes
    labels = torch.tensor([0, 3, 1])  # bell, pluck, bowed
    target = losses.labels_target(labels, torch.ones(3, dtype=torch.bool), spec)
    assert target.tolist() == [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]
