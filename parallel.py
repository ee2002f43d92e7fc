"""
One model over several processes under torchrun, in DeepSeek-V3's layout: what a rank holds and how the ranks'
partial results are joined. model.py builds every split layer from a `Shard`; without torchrun the Shard is
Shard(), the whole model, and torch.distributed is never called.

Split over the ranks: routed experts (rank r holds a contiguous range), attention heads, dense-MLP rows and the
vocabulary; each attention and MLP output is then a partial sum that one all-reduce completes. Router, skip
policy, norms and vision tower are replicated, so every rank skips the same slots. The loader reads each rank's
part of a tensor through `rank_part`. docs/multi-gpu.md has the commands and the memory per GPU.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Shard:
    """This process's part of a model that `world` processes run together; Shard() is the whole model."""
    rank: int = 0
    world: int = 1

    def split(self, n, what, shared=False):
        """This rank's count of n heads, experts or rows. shared: n smaller than world may instead be kept whole
        by world / n consecutive ranks each (GQA's kv heads: a rank keeps the one its query heads use)."""
        if n % self.world == 0:
            return n // self.world
        if shared and self.world % n == 0:
            return 1
        raise ValueError(f"{what} = {n} does not split over {self.world} processes")

    def reduce(self, x):
        """The sum over the ranks of their partial x, in place."""
        if self.world > 1:
            dist.all_reduce(x)
        return x


class ParallelEmbedding(nn.Embedding):
    """The token embedding with its vocabulary split over the ranks: a rank looks up the ids of its own range and
    gives zeros for the others, so the sum over ranks is the embedding (exactly: one term is non-zero)."""

    def __init__(self, vocab, dim, shard):
        super().__init__(shard.split(vocab, "vocab_size"), dim)
        self.shard = shard

    def forward(self, ids):
        if self.shard.world == 1:
            return super().forward(ids)
        ids = ids - self.shard.rank * self.num_embeddings
        outside = (ids < 0) | (ids >= self.num_embeddings)
        return self.shard.reduce(super().forward(ids.masked_fill(outside, 0)).masked_fill(outside[..., None], 0))


class ParallelHead(nn.Linear):
    """lm_head with its vocabulary split over the ranks: each computes its own ids' logits; all are gathered."""

    def __init__(self, dim, vocab, shard):
        super().__init__(dim, shard.split(vocab, "vocab_size"), bias=False)
        self.shard = shard

    def forward(self, x):
        y = super().forward(x)
        if self.shard.world == 1:
            return y
        parts = [torch.empty_like(y) for _ in range(self.shard.world)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts, dim=-1)  # [..., V], the ranks' vocabulary ranges in order


def rank_part(whole, mine, shard):
    """The slices (one per axis) of a tensor of shape `whole` that this rank holds as shape `mine`. An axis cut into
    parts = whole / mine pieces gives rank r piece r * parts // world: its own when there are as many pieces as
    ranks, the one that consecutive ranks share when there are fewer (GQA's kv heads), piece 0 when not cut."""
    part = []
    for n, m in zip(whole, mine):
        k = shard.rank * (n // m) // shard.world
        part.append(slice(k * m, (k + 1) * m))
    return tuple(part)
