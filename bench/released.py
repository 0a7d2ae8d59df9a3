"""The released code's computation of l(x|D) and the matrix l_ij, as issue #15 describes it (the
authors' source was not available here): one full forward per sequence, B^2 + 2B forwards of batch
1, each through the HF model with `labels` (soft positions labelled -100), so transformers forms
full-vocabulary logits at every position and its own fp32 cross-entropy (`outputs.loss`, the
per-sequence mean NLL). The yardstick of bench/train_step.py and bench/train_step_gpu.py."""
from __future__ import annotations

import torch

from domino.training.objective import NLL


def released_nll(model, domain, samples, input_ids, attention_mask):
    """B^2 + 2B forwards of one sequence each through the HF model with labels (see the docstring)."""
    emb = model.get_input_embeddings()(input_ids)
    B = input_ids.shape[0]

    def one(prefix, j):
        T = int(attention_mask[j].sum())
        x = torch.cat([prefix.to(emb.dtype), emb[j, :T]], dim=0)[None]
        labels = torch.cat([input_ids.new_full((prefix.shape[0],), -100), input_ids[j, :T]])[None]
        loss = model(inputs_embeds=x, labels=labels, use_cache=False).loss  # mean over the T text tokens
        return loss.float() * T

    count = attention_mask.sum(1).float()
    dom = torch.stack([one(domain, j) for j in range(B)])
    mat = torch.stack([torch.stack([one(torch.cat([domain, samples[i]]), j) for j in range(B)])
                       for i in range(B)])
    pos = torch.stack([one(torch.cat([domain, samples[i]]), i) for i in range(B)])
    eye = torch.eye(B, dtype=torch.bool, device=input_ids.device)
    mat = torch.where(eye, torch.diag_embed(pos), mat)
    return NLL(dom, count), NLL(mat, count.unsqueeze(0).expand(B, B).clone())
