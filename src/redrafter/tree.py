"""Dynamic tree attention: verify all W beams in one target forward (REDRAFTER.md).

Beams drafted by beam search share prefixes (they all start with g0, and many share more). We keep
one copy of every distinct prefix node, pack those nodes into a short sequence, and give the target
an attention mask under which each packed token sees the cached context plus exactly its ancestors.

Worked example (one row, W = 3, L = 3)::

    beams = [[5, 1, 2],        packed tokens  [5, 1, 2, 3, 4, 2]
             [5, 1, 3],        depths         [0, 1, 2, 2, 1, 2]
             [5, 4, 2]]        unpacker       [[0, 1, 2], [0, 1, 3], [0, 4, 5]]

    mask (packed x packed; 1 = may attend)
        5 1 2 3 4 2
    5 [ 1 . . . . . ]
    1 [ 1 1 . . . . ]
    2 [ 1 1 1 . . . ]
    3 [ 1 1 . 1 . . ]
    4 [ 1 . . . 1 . ]
    2 [ 1 . . . 1 1 ]

Node (beam i, position k) is *owned* by the smallest beam index j whose first k+1 tokens equal
beam i's; only owned nodes are packed, in beam-major order, so every ancestor precedes its
descendants. All functions are pure tensor code without Python loops over beams. On CPU tensors,
``cap_tree_scored`` and ``pack`` run our C++ versions (``kernels.tree``, csrc/tree.cpp) when they are
built: the same results (tests/test_tree.py) in one call instead of about 25 small tensor operations.

A beam may end early: positions holding ``NO_TOKEN`` (always a suffix of the beam) are no nodes at
all; they are not packed and never accepted. ``cap_tree`` makes such beams, keeping only the most
probable nodes of a draft (``BeamConfig.max_tree_tokens``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

NO_TOKEN = -1  # a beam position past the beam's end (cap_tree); never packed, never accepted


@dataclasses.dataclass(frozen=True)
class PackedTree:
    """The packed form of a batch of beams.

    Attributes:
        tokens:   (batch, n) packed token ids; rows shorter than n are padded with 0.
        depths:   (batch, n) depth of each packed token in its beam (g0 has depth 0).
        mask:     (batch, n, n) bool, True where packed token q may attend packed token k.
                  Padding tokens attend only themselves (so no attention row is empty).
        unpacker: (batch, W, L) index into the packed axis with ``tokens[b, unpacker[b]] == beams[b]``
                  (at ``NO_TOKEN`` positions some valid index that callers must not use).
        lengths:  (batch,) number of real (non-padding) packed tokens per row.
    """

    tokens: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    unpacker: torch.Tensor
    lengths: torch.Tensor


def prefix_match(beams: torch.Tensor) -> torch.Tensor:
    """Which beam pairs share their first k+1 tokens.

    Args:
        beams: (batch, W, L) token ids.
    Returns:
        (batch, W, W, L) bool; ``[b, i, j, k]`` is True iff ``beams[b, i, :k+1] == beams[b, j, :k+1]``.
    """
    equal = beams[:, :, None, :] == beams[:, None, :, :]  # (batch, W, W, L)
    # A prefix matches while every earlier position matched: cumulative sum equals position + 1.
    positions = torch.arange(1, beams.shape[-1] + 1, device=beams.device)
    return equal.long().cumsum(dim=-1) == positions


def owners(beams: torch.Tensor) -> torch.Tensor:
    """The smallest beam index sharing each node's prefix.

    Args:
        beams: (batch, W, L) token ids.
    Returns:
        (batch, W, L) long; ``[b, i, k]`` = min j such that beams i and j agree on positions 0..k.
    """
    match = prefix_match(beams)  # (batch, W, W, L)
    # argmax returns the first maximal index; match[b, i, i, k] is True so a True always exists.
    return match.to(torch.uint8).argmax(dim=2)


def owned_nodes(beams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owners(beams), whether each position is its node's owner): the distinct tree nodes, one
    position each; ``NO_TOKEN`` positions own nothing."""
    owner = owners(beams)
    beam_index = torch.arange(beams.shape[1], device=beams.device).view(1, -1, 1)
    return owner, (owner == beam_index) & (beams != NO_TOKEN)


def node_scores(beams: torch.Tensor, path_scores: torch.Tensor) -> torch.Tensor:
    """Path scores made fit for ``cap_tree`` when the beams come from several proposers.

    Beams of one beam search agree on the score of a shared node and never score a node above its
    parent; beams scored by different rules (the drafter's q, context lookup's confidence) need not.
    Each node takes the best score of any beam through it, then each position the lowest score on
    its path from g0, so shared nodes agree again and scores never rise with depth.

    Args:
        beams, path_scores: (batch, W, L); ``NO_TOKEN`` positions and NaN scores are ignored (as -inf).
    Returns:
        (batch, W, L) float, -inf at ``NO_TOKEN``.
    """
    batch, width, length = beams.shape
    owner, _ = owned_nodes(beams)
    node = (owner * length + torch.arange(length, device=beams.device)).reshape(batch, -1)  # (batch, W*L)
    scores = path_scores.float()
    scores = torch.where((beams != NO_TOKEN) & ~scores.isnan(), scores, float("-inf")).reshape(batch, -1)  # NaN as -inf
    best = torch.full_like(scores, float("-inf")).scatter_reduce(1, node, scores, reduce="amax")
    return best.gather(1, node).view(batch, width, length).cummin(dim=-1).values


def cap_tree(beams: torch.Tensor, path_scores: torch.Tensor, max_tokens: int, *,
             sure_log_prob: float = math.inf, most_tokens: int = 0) -> torch.Tensor:
    """Keep only the ``max_tokens`` most probable distinct nodes of each row's tree, and past them the
    nodes scoring at least ``sure_log_prob``, up to ``most_tokens`` in all (``BeamConfig.extend_prob``).

    Args:
        beams:       (batch, W, L) token ids, g0 first.
        path_scores: (batch, W, L) summed log q of each beam's drafted tokens up to and including
                     position k (0 at g0); non-increasing along a beam, equal for beams sharing a prefix.
        max_tokens:  how many distinct nodes (g0 included) may stay, >= 1.
    Returns:
        beams with ``NO_TOKEN`` at every dropped node. Nodes rank by score, ties by depth (shallower
        first), so a node is only kept together with all its ancestors and a beam loses a suffix.
    """
    batch, width, length = beams.shape
    if width * length <= max_tokens:
        return beams
    device = beams.device
    owner, is_owner = owned_nodes(beams)
    depth = torch.arange(length, device=device).view(1, 1, length).expand(batch, width, length)
    score = torch.where(is_owner, path_scores.float(), torch.full_like(path_scores, float("-inf"), dtype=torch.float))
    # Rank by (score desc, depth asc): a stable sort by depth, then a stable sort by score.
    by_depth = depth.reshape(batch, -1).argsort(dim=1, stable=True)
    by_score = score.reshape(batch, -1).gather(1, by_depth).argsort(dim=1, descending=True, stable=True)
    order = by_depth.gather(1, by_score)  # flat node indices, best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width * length, device=device).expand(batch, -1))
    # the sure nodes lead that order: each row keeps max(max_tokens, min(its sure nodes, most_tokens))
    sure = (score >= sure_log_prob).reshape(batch, -1).sum(dim=1, keepdim=True).clamp(max=most_tokens)
    kept_node = (rank < sure.clamp(min=max_tokens)).view(batch, width, length) & is_owner
    # A position is kept when the node owning it is.
    kept = kept_node.reshape(batch, -1).gather(1, (owner * length + depth).reshape(batch, -1)).view(batch, width, length)
    return torch.where(kept, beams, torch.full_like(beams, NO_TOKEN))


def drop_below(beams: torch.Tensor, scores: torch.Tensor, min_prob: float) -> torch.Tensor:
    """``beams`` with every node whose log score is below log(min_prob) (or NaN) set to ``NO_TOKEN``.
    Scores never rise along a path, so this cuts the ends of beams and leaves a tree."""
    return torch.where(scores >= math.log(min_prob), beams, torch.full_like(beams, NO_TOKEN))


def cap_tree_scored(beams: torch.Tensor, path_scores: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """``cap_tree(beams, node_scores(beams, path_scores), max_tokens)``: the cap for beams of any
    proposers (for one beam search's scores ``node_scores`` changes nothing)."""
    module = tree_kernel(beams, torch.long)
    if module is not None:
        return module.cap_tree_scored(beams, path_scores, max_tokens)
    return cap_tree(beams, node_scores(beams, path_scores), max_tokens)


def pack(beams: torch.Tensor) -> PackedTree:
    """Deduplicate shared prefixes and build the packed tokens, depths, mask and unpacker.

    Args:
        beams: (batch, W, L) token ids (position 0 is g0, identical across a row's beams); a beam
               may end early with ``NO_TOKEN`` positions, which are left out.
    Returns:
        PackedTree with n = the largest number of distinct nodes in any row (n <= W * L).
    """
    module = tree_kernel(beams, torch.long)
    if module is not None:
        tokens, depths, mask, unpacker, lengths = module.pack_tree(beams)
        return PackedTree(tokens=tokens, depths=depths, mask=mask, unpacker=unpacker, lengths=lengths)
    return pack_tensors(beams)


def tree_kernel(tensor: torch.Tensor, *dtypes: torch.dtype):
    """Our C++ tree bookkeeping for ``tensor`` (on CPU, and of one of ``dtypes`` when given), or None
    (other devices or dtypes, or not built here)."""
    from redrafter.models import kernels  # here: importing models imports this module

    if tensor.device.type != "cpu" or (dtypes and tensor.dtype not in dtypes):
        return None
    return kernels.tree()


def pack_tensors(beams: torch.Tensor) -> PackedTree:
    """``pack`` in tensor operations (any device; the definition the C++ version is tested against)."""
    batch, width, length = beams.shape
    device = beams.device
    owner, is_owner = owned_nodes(beams)  # (batch, W, L) each

    flat_owned = is_owner.reshape(batch, width * length)  # beam-major order
    packed_slot = flat_owned.long().cumsum(dim=1) - 1  # (batch, W*L): slot of each owned node
    lengths = flat_owned.sum(dim=1)  # (batch,)
    n = int(lengths.max())

    # unpacker[b, i, k] = packed slot of the owning node (owner[b, i, k], k).
    depth_index = torch.arange(length, device=device).view(1, 1, length)
    owner_flat = owner * length + depth_index  # (batch, W, L) flat index of the owning node
    unpacker = packed_slot.gather(1, owner_flat.reshape(batch, -1)).view(batch, width, length)

    # Scatter owned nodes into their slots; unowned nodes go to a discarded extra slot n.
    target = torch.where(flat_owned, packed_slot, torch.full_like(packed_slot, n))
    tokens = torch.zeros(batch, n + 1, dtype=beams.dtype, device=device)
    tokens.scatter_(1, target, beams.reshape(batch, -1))
    depths = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
    depths.scatter_(1, target, depth_index.expand(batch, width, length).reshape(batch, -1))

    # Node (i, k) sees the packed slots of its ancestors (i, k') for k' <= k.
    ancestors = torch.zeros(batch, width, length, n + 1, dtype=torch.long, device=device)
    ancestors.scatter_(3, unpacker.unsqueeze(-1), 1)
    sees = ancestors.cumsum(dim=2) > 0  # (batch, W, L, n+1)
    mask = torch.zeros(batch, n + 1, n + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, target.unsqueeze(-1).expand(-1, -1, n + 1), sees.reshape(batch, width * length, n + 1))
    mask = mask[:, :n, :n]
    padding = torch.arange(n, device=device).view(1, n) >= lengths.view(batch, 1)  # (batch, n)
    mask = mask | (torch.diag_embed(padding))
    return PackedTree(tokens=tokens[:, :n], depths=depths[:, :n], mask=mask, unpacker=unpacker, lengths=lengths)


def unpack(packed: torch.Tensor, unpacker: torch.Tensor) -> torch.Tensor:
    """Gather per-packed-token values back to beam layout.

    Args:
        packed:   (batch, n, ...) values per packed token (logits, hidden states, token ids).
        unpacker: (batch, W, L) packed indices.
    Returns:
        (batch, W, L, ...) with ``out[b, i, k] = packed[b, unpacker[b, i, k]]``.
    """
    batch, width, length = unpacker.shape
    index = unpacker.reshape(batch, width * length)
    trailing = packed.shape[2:]
    index = index.view(batch, width * length, *([1] * len(trailing))).expand(-1, -1, *trailing)
    return packed.gather(1, index).view(batch, width, length, *trailing)
