"""Tokenised reference batches for the contrastive objective.

Each item carries its reference index (which sample-token set S_i it owns). Texts are right-padded
and end with EOS so the domain tokens also learn where an example stops. The contrastive term
needs at least two references per batch, so a last batch of one is dropped (which reference is
dropped rotates with the epoch's shuffle).

The batch order is a function of (seed, pass over the data) alone, never of the global RNG, and the
training loader is resumable (domino.core.batching): Lightning stores its position in the checkpoint,
so a run resumed mid-epoch from `last.ckpt` sees exactly the batches the uninterrupted run would have seen."""
from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader

from domino.core.batching import Collate, IndexedTexts, resumable_loader, tokenize_texts

log = logging.getLogger(__name__)


class DomainDataModule(L.LightningDataModule):
    def __init__(self, tokenizer, references: list[str], heldout: list[str] | None = None,
                 batch_size: int = 4, max_len: int = 256, val_size: int | None = 16,
                 num_workers: int = 0, min_batch: int = 2, seed: int = 0):
        super().__init__()
        self.seed = seed
        if batch_size < min_batch:
            raise ValueError(f"data.batch_size={batch_size}: the contrastive objective needs at least "
                             f"{min_batch} references per batch")
        self.tokenizer, self.batch_size, self.num_workers = tokenizer, batch_size, num_workers
        self.min_batch = min_batch
        self.train_ids = tokenize_texts(tokenizer, references, max_len, "references")
        held = list(heldout or [])[: val_size if val_size is not None else None]
        self.val_ids = tokenize_texts(tokenizer, held, max_len, "held-out texts") if held else []
        self.collate = Collate(tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        per_rank = -(-len(self.train_ids) // world)
        drop_last = per_rank % self.batch_size != 0 and per_rank % self.batch_size < self.min_batch
        if per_rank < self.min_batch:
            raise ValueError(f"{len(self.train_ids)} references over {world} process(es) leave fewer than "
                             f"{self.min_batch} per batch")
        return resumable_loader(IndexedTexts(self.train_ids), self.batch_size, self.seed, self.trainer,
                                drop_last=drop_last, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_ids:
            return []
        return DataLoader(IndexedTexts(self.val_ids), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)
