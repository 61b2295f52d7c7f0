"""Token tensors for the fused operator: examples and candidate groups -> a `Batch`.

Layout "padded": one row per group member, ``[bos, prompt | member, eos, pad...]``, right-padded to the
longest row. Member token j sits at position P + j (P = prompt length) and is predicted by the hidden row
of position P + j - 1, so with B rows of length L:

    rows[t] = b * L + P + j - 1,  targets[t] = member[j],  segments[t] = the member's index in the batch.

Layouts "packed" and "shared" (aft_fast/data/packing.py, DESIGN.md section 4) put several sequences in a
row without padding between them; "shared" encodes a group's prompt once for all its members. They fill
input_ids / position_ids / rows differently and describe who attends to whom per token (sequence_ids,
member_ids); segments, group, label, is_reference and ref_logp are the same in every layout, so the fused
operator's scores line up member by member.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.data.candidates import CandidateGroup
from aft_fast.data.formats import Example, prompt_text

LAYOUTS = ("padded", "packed", "shared")


@dataclass
class Encoded:
    """One group, tokenized. members[i] are chain token ids ending in eos; the reference chain, when
    present, is one member with is_reference True. label: 1/0 or a rank per member."""

    prompt: list[int]
    members: list[list[int]]
    label: list[int]
    is_reference: list[bool]
    ref_logp: list[float] | None = None


@dataclass
class Batch:
    """What one forward of the model and the fused loss needs. B rows of L tokens, T scored tokens,
    S segments (members).

    input_ids [B, L] int64; attention_mask [B, L] int64 (1 = token, 0 = pad); position_ids [B, L] or None
    (None: 0..L-1 per row); rows, targets, segments [T] int64; group, label [S] int64; is_reference [S]
    bool; ref_logp [S] float32 or None (summed log-prob under the frozen reference model, dpo modes).

    Padding-free layouts only (None in "padded"): sequence_ids [B, L] int64, the packed sequence of its row
    each token belongs to (unique in the batch, -1 for padding); member_ids [B, L] int64, "shared" only: 0
    for the prompt, m for the m-th member of its sequence. Token i attends to token j of its row iff they
    are in one sequence, j <= i, and j is in the prompt or in i's member. The mask itself is built at
    forward time in the form the attention kernel takes (aft_fast/train/attention.py)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    position_ids: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    member_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def token_index(self) -> dict[str, torch.Tensor]:
        """rows, targets, segments: the fused operator's per-token keywords (aft_loss, linear_logprob)."""
        return dict(rows=self.rows, targets=self.targets, segments=self.segments)

    def group_inputs(self) -> dict[str, torch.Tensor]:
        """group, label, is_reference: aft_loss's per-segment keywords (ref_logp is passed on its own)."""
        return dict(group=self.group, label=self.label, is_reference=self.is_reference)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: None if v is None else v.to(device) for k, v in self.tensors().items()})

    @property
    def layout(self) -> str:
        if self.sequence_ids is None:
            return "padded"
        return "packed" if self.member_ids is None else "shared"

    @property
    def num_segments(self) -> int:
        return self.group.numel()

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens the model reads."""
        return int(self.attention_mask.sum())

    @property
    def computed_tokens(self) -> int:
        """Token positions the model computes, padding included (B * L)."""
        return self.input_ids.numel()


def encode_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """bos (when the tokenizer has one) + the prompt template; generation starts right after it."""
    ids = tokenizer.encode(prompt_text(question), add_special_tokens=False)
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_chain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A chain's ids + eos: the model learns (and is scored on) where to stop."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def encode_example(example: Example, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """VFT: the reference chain alone."""
    return Encoded(
        encode_prompt(tokenizer, example.question), [encode_chain(tokenizer, example.reference)], [1], [True]
    )


def encode_group(
    group: CandidateGroup,
    tokenizer: PreTrainedTokenizerBase,
    *,
    with_reference: bool = True,
    with_ref_logp: bool = False,
) -> Encoded:
    """AFT: [reference] + candidates. The reference's label is the group's best (it is never paired:
    is_reference keeps it out of L_align). with_ref_logp reads each candidate's stored ref_logp."""
    labels = group.labels()
    members = [encode_chain(tokenizer, c.text) for c in group.candidates]
    is_ref = [False] * len(members)
    ref_logp = None
    if with_ref_logp:
        missing = [i for i, c in enumerate(group.candidates) if c.ref_logp is None]
        if missing:
            raise ValueError(
                f"group {group.id!r}: candidate {missing[0]} has no ref_logp (run the sample stage "
                "with mode dpo to store it)"
            )
        ref_logp = [float(c.ref_logp) for c in group.candidates]
    if with_reference and group.reference:
        members.insert(0, encode_chain(tokenizer, group.reference))
        labels.insert(0, max(labels, default=1))
        is_ref.insert(0, True)
        if ref_logp is not None:
            ref_logp.insert(0, 0.0)  # references feed L_vft only; dpo never reads this value
    return Encoded(encode_prompt(tokenizer, group.question), members, labels, is_ref, ref_logp)


def _fit(prompt: list[int], member: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut a row to max_length: the member's tail first; a prompt longer than half the row loses its
    start (the question's end and the answer cue matter most). Returns (prompt, member, was_cut)."""
    if len(prompt) + len(member) <= max_length:
        return prompt, member, False
    keep_prompt = min(len(prompt), max(max_length // 2, max_length - len(member)))
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, member[: max_length - len(prompt)], True


@dataclass
class Member:
    """One member after cutting to max_length: its segment index, group index, prompt and chain."""

    segment: int
    group: int
    prompt: list[int]
    chain: list[int]


@dataclass
class Segments:
    """The per-segment tensors every layout shares: group, label [S] int64, is_reference [S] bool,
    ref_logp [S] float32 or None."""

    group: torch.Tensor
    label: torch.Tensor
    is_reference: torch.Tensor
    ref_logp: torch.Tensor | None


def fit_members(items: list[Encoded], max_length: int) -> tuple[list[Member], Segments]:
    """Every member of `items` (group ids 0..len(items)-1 in order), cut to max_length, in segment order."""
    if not items:
        raise ValueError("collate: no groups")
    members, group, label, is_ref, ref_logp = [], [], [], [], []
    with_ref_logp = items[0].ref_logp is not None
    for g, item in enumerate(items):
        if (item.ref_logp is not None) != with_ref_logp:
            raise ValueError("collate: some groups carry ref_logp and some do not")
        for m, member in enumerate(item.members):
            prompt, chain, _ = _fit(item.prompt, member, max_length)
            if not chain or not prompt:
                raise ValueError(f"collate: max_length {max_length} leaves no room for group {g}, member {m}")
            members.append(Member(len(members), g, prompt, chain))
            group.append(g)
            label.append(item.label[m])
            is_ref.append(item.is_reference[m])
            if with_ref_logp:
                ref_logp.append(item.ref_logp[m])
    segs = Segments(
        group=torch.tensor(group, dtype=torch.long),
        label=torch.tensor(label, dtype=torch.long),
        is_reference=torch.tensor(is_ref, dtype=torch.bool),
        ref_logp=torch.tensor(ref_logp, dtype=torch.float32) if with_ref_logp else None,
    )
    return members, segs


def collate(
    items: list[Encoded],
    *,
    pad_id: int,
    max_length: int,
    layout: str = "padded",
    max_tokens: int | None = None,
) -> Batch:
    """Batch the groups `items` (group ids 0..len(items)-1 in order) in `layout`.

    max_length caps each [prompt | member] (as in every layout); max_tokens caps a row of the packed and
    shared layouts (None: the longest packed sequence; see aft_fast/data/packing.py). The padded layout
    ignores max_tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not available; expected one of {', '.join(LAYOUTS)}")
    members, segs = fit_members(items, max_length)
    if layout != "padded":
        from aft_fast.data.packing import pack  # packing builds on this module's types

        return pack(members, segs, pad_id=pad_id, shared=layout == "shared", max_tokens=max_tokens)
    seqs, rows, targets, segments = [], [], [], []
    for mb in members:
        seqs.append(mb.prompt + mb.chain)
        # Position P + j - 1 predicts chain[j]; rows are flattened later, once L is known.
        rows.append([len(mb.prompt) + j - 1 for j in range(len(mb.chain))])
        targets.extend(mb.chain)
        segments.extend([mb.segment] * len(mb.chain))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention_mask[b, : len(s)] = 1
    flat_rows = torch.cat([torch.tensor(r, dtype=torch.long) + b * L for b, r in enumerate(rows)])
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        rows=flat_rows,
        targets=torch.tensor(targets, dtype=torch.long),
        segments=torch.tensor(segments, dtype=torch.long),
        group=segs.group,
        label=segs.label,
        is_reference=segs.is_reference,
        ref_logp=segs.ref_logp,
    )
