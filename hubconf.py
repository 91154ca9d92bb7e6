"""torch.hub entry point: a trained SemiSupCon encoder, ready to embed audio.

    model = torch.hub.load("path/to/this/repository", "semisupcon", source="local",
                           checkpoint="runs/my-music")
    h = model.embed(waveform, sample_rate)  # [clips, D]

The file is read with weights_only=True: a checkpoint, a model file for sharing
(`python export.py model`, or a run's model.pt) or a run folder; nothing in it can run code.
"""
import models

dependencies = ["torch", "torchaudio"]


def semisupcon(checkpoint, layer="encoder", device=None):
    """A trained encoder as a models.Pretrained in eval mode (see models.load_pretrained).

    checkpoint: a checkpoint-STEP.pt file, a model file, or a run folder (its latest loadable file).
    layer: "encoder" (embeddings h) or "projection" (z). device: default the GPU if present.
    """
    return models.load_pretrained(checkpoint, layer, device)
