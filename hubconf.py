"""torch.hub entry point: a trained SemiSupCon encoder, ready to embed audio.

    model = torch.hub.load("path/to/this/repository", "semisupcon", source="local",
                           checkpoint="runs/my-music")
    h = model.embed(waveform, sample_rate)  # [clips, D]
"""
import models

dependencies = ["torch", "torchaudio"]


def semisupcon(checkpoint, layer="encoder", device=None):
    """A train.py checkpoint as a models.Pretrained in eval mode (see models.load_pretrained).

    checkpoint: a checkpoint-STEP.pt file or a run folder (its latest checkpoint).
    layer: "encoder" (embeddings h) or "projection" (z). device: default the GPU if present.
    """
    return models.load_pretrained(checkpoint, layer, device)
