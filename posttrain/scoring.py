"""Score a causal LM on completion tokens: the held-out loss every training stage reports.

    loss, predictions = completion_scores(model, examples, pad_id)   # examples from formatting.encode_example

SFT (loss before/after), distillation (student vs teacher, argmax agreement) and quantization
(loss change, agreement with the source) all measure with this one function, so their figures are
comparable: mean cross-entropy per completion token, prompt tokens excluded by the loss mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain import formatting


@torch.no_grad()
def completion_scores(model, examples: list[dict], pad_id: int, batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy per completion token, and the model's argmax at every completion position."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens, predictions = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in formatting.pad_batch(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        # Position t predicts token t+1: score where the NEXT token is a completion token.
        mask = batch["labels"][:, 1:] != formatting.IGNORE_INDEX
        selected = logits[mask]
        total_loss += F.cross_entropy(selected, batch["labels"][:, 1:][mask], reduction="sum").item()
        total_tokens += selected.shape[0]
        predictions.append(selected.argmax(-1).cpu())
    return total_loss / max(total_tokens, 1), torch.cat(predictions) if predictions else torch.empty(0)
