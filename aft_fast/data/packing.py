"""Padding-free layouts (docs/design.md section 4): several sequences per row, up to a token budget.

packed  one sequence per member, ``[prompt | member]`` (the padded layout's rows laid end to end):
        positions restart at 0 in each sequence, which attends causally to itself only.
shared  one sequence per group, ``[prompt | member_1 | ... | member_k]`` (the AFT group's reference chain
        is one of the members): the prompt is encoded once. Each member's positions continue from the
        prompt's end (P, P + 1, ...), exactly as if it followed the prompt alone, and a member token
        attends to the prompt and causally to its own member, never to another member or sequence.

The prompt's last position predicts the first token of every member, so in the shared layout one hidden
row appears k times in `rows` (the fused operator gathers it per scored token).

Who attends to whom is stored per token (Batch.sequence_ids, Batch.member_ids), not as a mask: the
attention kernel decides the mask's form (aft_fast/models/attention.py).

Cutting: members are cut to max_length exactly as in the padded layout (each [prompt | member] on its
own), so every member sees the same tokens at the same positions in all three layouts. Members of a group
whose prompts were cut differently (only over-long ones) go to separate sequences.

Budget (max_tokens): sequences are placed first-fit by decreasing length into rows of at most max_tokens
tokens; a group longer than that is split into several sequences, each with its own copy of the prompt.
None means the longest sequence: no row is longer than the micro batch needs, which matters where
attention costs the square of the row length (SDPA with a dense mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aft_fast.data.batch import Batch, Member, Segments


@dataclass
class _Sequence:
    prompt: list[int]
    members: list[Member] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(m.chain) for m in self.members)


def _sequences(members: list[Member], shared: bool, max_tokens: int | None) -> list[_Sequence]:
    if not shared:
        return [_Sequence(m.prompt, [m]) for m in members]
    by_prompt: dict[tuple[int, tuple[int, ...]], _Sequence] = {}
    for m in members:
        by_prompt.setdefault((m.group, tuple(m.prompt)), _Sequence(m.prompt)).members.append(m)
    out = []
    for seq in by_prompt.values():
        if max_tokens is None or seq.length <= max_tokens:
            out.append(seq)
            continue
        # Too long for one row: split the members, repeating the prompt in each part.
        part = _Sequence(seq.prompt)
        for m in seq.members:
            if part.members and part.length + len(m.chain) > max_tokens:
                out.append(part)
                part = _Sequence(seq.prompt)
            part.members.append(m)
        out.append(part)
    return out


def _first_fit(seqs: list[_Sequence], capacity: int) -> list[list[_Sequence]]:
    """First-fit decreasing: few rows, each at most `capacity` tokens. Ties keep batch order."""
    rows: list[list[_Sequence]] = []
    free: list[int] = []
    for seq in sorted(seqs, key=lambda s: -s.length):
        for r, room in enumerate(free):
            if seq.length <= room:
                rows[r].append(seq)
                free[r] -= seq.length
                break
        else:
            rows.append([seq])
            free.append(capacity - seq.length)
    return rows


def pack(
    members: list[Member], segs: Segments, *, pad_id: int, shared: bool, max_tokens: int | None = None
) -> Batch:
    """The packed (shared=False) or shared (shared=True) layout of `members` (from collate.fit_members)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens: must be positive or None, got {max_tokens}")
    seqs = _sequences(members, shared, max_tokens)
    longest = max(s.length for s in seqs)
    if max_tokens is not None and longest > max_tokens:
        raise ValueError(
            f"max_tokens {max_tokens} is shorter than a [prompt | member] sequence of {longest} tokens; "
            "raise it to at least max_length"
        )
    layout = _first_fit(seqs, max_tokens or longest)
    B, L = len(layout), max(sum(s.length for s in row) for row in layout)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    sequence_ids = torch.full((B, L), -1, dtype=torch.long)
    member_ids = torch.zeros((B, L), dtype=torch.long)
    seg_rows: list[torch.Tensor | None] = [None] * len(members)
    seq_id = 0
    for b, row in enumerate(layout):
        start = 0
        for seq in row:
            P = len(seq.prompt)
            end = start + seq.length
            sequence_ids[b, start:end] = seq_id
            input_ids[b, start : start + P] = torch.tensor(seq.prompt)
            position_ids[b, start : start + P] = torch.arange(P)
            last_prompt = b * L + start + P - 1
            at = start + P
            for i, m in enumerate(seq.members, start=1):
                n = len(m.chain)
                input_ids[b, at : at + n] = torch.tensor(m.chain)
                position_ids[b, at : at + n] = torch.arange(P, P + n)
                member_ids[b, at : at + n] = i
                # chain[0] is predicted by the prompt's last position, chain[j] by the member's token j - 1.
                seg_rows[m.segment] = torch.cat(
                    [torch.tensor([last_prompt]), torch.arange(b * L + at, b * L + at + n - 1)]
                )
                at += n
            attention_mask[b, start:end] = 1
            start, seq_id = end, seq_id + 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        rows=torch.cat(seg_rows),
        targets=torch.tensor([t for m in members for t in m.chain], dtype=torch.long),
        segments=torch.cat([torch.full((len(m.chain),), m.segment, dtype=torch.long) for m in members]),
        group=segs.group,
        label=segs.label,
        is_reference=segs.is_reference,
        ref_logp=segs.ref_logp,
        sequence_ids=sequence_ids,
        member_ids=member_ids if shared else None,
    )
