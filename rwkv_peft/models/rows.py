"""What the blocks know about the rows besides the hidden state: padding, and where packed samples start.

Packed rows hold several samples one after another. Marked the Hugging Face way - ``position_ids`` that restart
at 0 where a sample starts (``DataCollatorWithFlattening``, TRL's ``padding_free``), or ``cu_seqlens`` (the
cumulative sample lengths over the flattened ``[B * T]`` tokens, as flash-attention's varlen API takes them) -
every sample starts from the sequence's initial state, as if it ran alone: the WKV state and both token-shift
states go back to zeros, or to the learned states when state tuning is on.

- Token shift: at a start, a token sees the initial shift state instead of the token before it
  (``models.common.token_shift``).
- WKV: :class:`Segments` gathers each sample's tokens into its own row (``[S, L, ...]``, longest first,
  right-padded, the padding neutral under the version's padding rule), runs the version's WKV op on them with
  each sample's initial state, and scatters the output back. The op runs in at most ``MAX_PIECES`` pieces of
  ``L`` with the state carried from one to the next, each on the samples still running (a prefix, as they are
  longest first), so a few long samples do not make every short one pay for their length. Any WKV path
  (PyTorch recurrent or chunked, CUDA) runs it unchanged, and the learned initial state's gradient sums over
  the samples. Only the WKV inputs are regrouped; the projections run on the packed tokens. Where the op takes
  packed samples itself (fla's ``cu_seqlens``: RWKV-7 and RWKV-6 on the fla path), the rows are flattened into
  one instead, with no gather and no padding.

A start in a row's first column resets that row's incoming state (``state=``); a row's first sample continues
from it otherwise (a long packed row run in chunks, whose chunk begins inside a sample). The state handed back
for a row is the one its last sample leaves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def sample_starts(batch: int, length: int, position_ids: Optional[Tensor] = None,
                  cu_seqlens: Optional[Tensor] = None, device=None) -> Optional[Tensor]:
    """``[B, T]`` bool: True where a sample starts, from ``position_ids`` ([B, T] or [T]; 0 = a start) or
    ``cu_seqlens`` ([S + 1] offsets into the flattened ``B * T`` tokens, from 0 to B * T); None when neither."""
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens).to(device=device, dtype=torch.long).flatten()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != batch * length or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to B*T = {batch * length} (the flattened tokens); got "
                             f"{cu.tolist()[:8]}{' ...' if cu.numel() > 8 else ''}")
        starts = torch.zeros(batch * length, dtype=torch.bool, device=device)
        starts[cu[:-1][cu[:-1] < batch * length]] = True
        return starts.view(batch, length)
    if position_ids is None:
        return None
    pos = torch.as_tensor(position_ids).to(device)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.shape[-1] != length or pos.shape[0] not in (1, batch) or pos.dim() != 2:
        raise ValueError(f"position_ids has shape {tuple(pos.shape)}; expected [B, T] = [{batch}, {length}] or [T]")
    return (pos == 0).expand(batch, length)


MAX_PIECES = 8       # WKV calls per layer for packed rows, at most
PIECE_MULTIPLE = 16  # piece lengths are multiples of this (the chunk of the chunked forms and the kernels)


class Segments:
    """Each sample of packed rows as its own row: gather ``[B, T, ...] -> [S, L, ...]`` and back.

    Segments begin at every sample start and at every row's first column; ``L`` is the longest segment up to its
    last real token (``mask``; the padding after it is gathered but never run). In the gathered layout the
    segments are sorted longest first (``order``: gathered row -> segment); ``cu_seqlens``,
    ``initial`` and ``last`` keep the segments' own order (the flattened rows').
    """

    def __init__(self, starts: Tensor, mask: Optional[Tensor] = None):
        B, T = starts.shape
        bound = starts.clone()
        bound[:, 0] = True
        flat = bound.flatten()                                                   # [B*T]
        self.shape = (B, T)
        self.seg = flat.long().cumsum(0) - 1                                     # [B*T] segment of each token
        first = flat.nonzero().squeeze(1)                                        # [S] its first token
        self.offset = torch.arange(B * T, device=starts.device) - first[self.seg]  # [B*T] place in the segment
        self.count = first.numel()                                                # S
        self.row = first // T                                                    # [S]
        self.cu_seqlens = torch.cat([first, first.new_tensor([B * T])])           # [S + 1] over the B*T tokens
        self.continues = (first % T == 0) & ~starts.flatten()[first]            # [S] goes on from the row's state
        self.last = self.seg.view(B, T)[:, -1]                                   # [B] each row's last segment
        lengths = self.cu_seqlens.diff()                                         # [S] tokens, padding included
        self.span = int(lengths.max())                                           # the gathered rows' length
        if mask is not None:  # up to the last real token: the padding after it changes no output nor state
            ends = (self.offset + 1) * (mask.flatten() != 0)
            lengths = torch.zeros_like(lengths).scatter_reduce(0, self.seg, ends, "amax")
        self.order = torch.sort(lengths, descending=True, stable=True).indices    # [S] gathered row -> segment
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(self.count, device=rank.device)          # [S] segment -> gathered row
        self.slot = rank[self.seg]                                               # [B*T] gathered row of each token
        self.last_slot = rank[self.last]                                         # [B]
        self.sorted_lengths = lengths[self.order].tolist()                       # the one host sync
        self.length = max(self.sorted_lengths[0], 1)                             # L: what the op runs over

    def pieces(self):
        """``(start, stop, running)`` spans of ``L`` for the op calls, ``running`` the number of segments (longest
        first) with tokens in ``[start, stop)``: at most ``MAX_PIECES`` spans, multiples of ``PIECE_MULTIPLE``."""
        step = -(-self.length // MAX_PIECES)
        step = -(-step // PIECE_MULTIPLE) * PIECE_MULTIPLE
        for start in range(0, self.length, step):
            running = sum(n > start for n in self.sorted_lengths)
            if running == 0:
                return
            yield start, min(start + step, self.length), running

    def gather(self, x: Tensor) -> Tensor:
        """``[B, T, *rest] -> [S, span, *rest]``, longest segment first, zeros after each segment's end
        (differentiable)."""
        rest = tuple(x.shape[2:])
        out = x.new_zeros((self.count, self.span) + rest)
        return out.index_put((self.slot, self.offset), x.flatten(0, 1))

    def scatter(self, y: Tensor) -> Tensor:
        """``[S, span, *rest] -> [B, T, *rest]`` (the inverse of ``gather`` on real positions)."""
        return y[self.slot, self.offset].view(*self.shape, *y.shape[2:])

    def initial(self, row_state: Optional[Tensor], blank: Tensor) -> Tensor:
        """Each segment's initial state ``[S, ...]``: ``blank`` (a sample's start), or the row's incoming state
        ``row_state [B, ...]`` for a row's first segment that does not start a sample."""
        init = blank.unsqueeze(0).expand(self.count, *blank.shape)
        if row_state is None or row_state.dim() == blank.dim():  # no per-row state: every segment starts blank
            return init
        keep = self.continues.view(-1, *([1] * blank.dim()))
        return torch.where(keep, row_state.to(blank.dtype)[self.row], init)

    def run(self, fn: "WkvFn", tensors: Sequence[Tensor], mask: Tensor, initial: Tensor) -> Tuple[Tensor, Tensor]:
        """``fn`` over the gathered ``tensors`` ``[S, span, ...]`` and ``mask`` ``[S, span]`` piece by piece (up to
        ``L``), from ``initial`` ``[S, ...]`` (gathered order): ``(out [S, span, ...], final state [S, ...])``, the
        output zero where the op did not run."""
        if self.sorted_lengths[0] == 0:  # nothing real anywhere: one call over the padding (it changes nothing)
            return fn(tensors, mask, initial)
        outs, state = [], initial
        for start, stop, running in self.pieces():
            out, final = fn([t[:running, start:stop] for t in tensors], mask[:running, start:stop],
                            state[:running])
            if running < self.count:  # the segments that have ended keep their final state
                out = torch.cat([out, out.new_zeros((self.count - running,) + tuple(out.shape[1:]))])
                final = torch.cat([final, state[running:].to(final.dtype)])
            outs.append(out)
            state = final
        if self.span > self.length:
            outs.append(outs[0].new_zeros((self.count, self.span - self.length) + tuple(outs[0].shape[2:])))
        return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]), state


WkvFn = Callable[..., Tuple[Tensor, Tensor]]  # (tensors, mask, initial_state[, cu_seqlens=]) -> (out, final)


@dataclass
class Rows:
    """Padding and sample starts of a batch; built once per forward (``Rows.of``) and handed to every block.

    mask: [B, T] (1 = real token) or None (all real); starts: [B, T] bool or None (no sample starts).
    """
    mask: Optional[Tensor] = None
    starts: Optional[Tensor] = None
    first: Optional[Tensor] = None          # [B] rows whose first column starts a sample (None: none)
    segments: Optional[Segments] = None     # set where a sample starts after a row's first column
    _seg_mask: Optional[Tensor] = field(default=None, repr=False)

    @classmethod
    def of(cls, mask: Optional[Tensor], starts: Optional[Tensor]) -> "Rows":
        if starts is None or not bool(starts.any()):
            return cls(mask=mask)
        first = starts[:, 0] if bool(starts[:, 0].any()) else None
        segments = Segments(starts, mask) if starts.shape[1] > 1 and bool(starts[:, 1:].any()) else None
        return cls(mask=mask, starts=starts, first=first, segments=segments)

    def incoming(self, state: Optional[Tensor], blank: Callable[[], Tensor]) -> Optional[Tensor]:
        """A row's incoming state (``[B, ...]``), put back to ``blank()`` where its first column starts a sample."""
        if state is None or self.first is None:
            return state
        b = blank().to(state.dtype)
        if state.dim() == b.dim():  # one state shared by the batch (a learned one): every row starts from it
            return state
        return torch.where(self.first.view(-1, *([1] * b.dim())), b, state)

    def run_wkv(self, fn: WkvFn, tensors: Sequence[Tensor], state: Optional[Tensor], learned: Optional[Tensor],
                zeros: Callable[[], Tensor], varlen: bool = False) -> Tuple[Tensor, Tensor]:
        """``fn(tensors, mask, initial_state) -> (out [B, T, ...], final state [B, ...])`` on these rows, every
        sample from the version's initial state: ``learned`` (state tuning), or ``zeros()`` (its blank state).

        tensors: per-token ``[B, T, ...]``; ``fn`` applies the version's padding rule with ``mask`` and calls
        its WKV op. ``state``: the rows' incoming state ([B, ...]); None starts every row from the initial state.
        ``varlen``: the op takes packed samples itself (fla's ``cu_seqlens``): the rows are flattened into one and
        ``fn`` gets ``cu_seqlens=`` instead of the samples gathered into rows of their own.
        """
        blank = (lambda: learned) if learned is not None else zeros  # noqa: E731
        state = self.incoming(state, blank)
        if self.segments is None:
            return fn(tensors, self.mask, state if state is not None else learned)
        seg = self.segments
        if varlen:
            B, T = seg.shape
            flat = [t.reshape(1, B * T, *t.shape[2:]) for t in tensors]
            mask = self.mask.reshape(1, B * T) if self.mask is not None else None
            out, final = fn(flat, mask, seg.initial(state, blank()), cu_seqlens=seg.cu_seqlens)
            return out.view(B, T, *out.shape[2:]), final[seg.last]
        if self._seg_mask is None:
            real = self.mask if self.mask is not None else torch.ones(seg.shape, device=tensors[0].device)
            self._seg_mask = seg.gather(real.to(torch.float32)[..., None])[..., 0]              # [S, span]
        out, final = seg.run(fn, [seg.gather(t) for t in tensors], self._seg_mask,
                             seg.initial(state, blank())[seg.order])
        return seg.scatter(out), final[seg.last_slot]
