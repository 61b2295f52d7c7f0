"""Token tensors for the fused operator: examples and candidate groups -> a `Batch`.

Layout "padded": one row per group member, ``[bos, prompt | member, eos, pad...]``, right-padded to the
longest row. Member token j sits at position P + j (P = prompt length) and is predicted by the hidden row
of position P + j - 1, so with B rows of length L:

    rows[t] = b * L + P + j - 1,  targets[t] = member[j],  segments[t] = the member's index in the batch.

Layouts "packed" and "shared" (aft_fast/data/packing.py, docs/design.md section 4) put several sequences in a
row without padding between them; "shared" encodes a group's prompt once for all its members. They fill
input_ids / position_ids / rows differently and describe who attends to whom per token (sequence_ids,
member_ids); segments, group, label, is_reference and ref_logp are the same in every layout, so the fused
operator's scores line up member by member.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from aft_fast.data.batch import LAYOUTS, Batch, Encoded, Member, Segments
from aft_fast.data.candidates import CandidateGroup
from aft_fast.data.formats import Example
from aft_fast.data.packing import pack
from aft_fast.data.prompts import prompt_ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The question's prompt ids in the tokenizer's bound format (aft_fast/data/prompts.py): plain is bos
    (when the tokenizer has one) + the paper's template; generation starts right after them."""
    return prompt_ids(tokenizer, question)


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
        ref_logp = [float(c.ref_logp) for c in group.candidates if c.ref_logp is not None]  # all of them
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


def fit_members(items: list[Encoded], max_length: int) -> tuple[list[Member], Segments]:
    """Every member of `items` (group ids 0..len(items)-1 in order), cut to max_length, in segment order."""
    if not items:
        raise ValueError("collate: no groups")
    members: list[Member] = []
    group, label, is_ref, ref_logp = [], [], [], []
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
            if item.ref_logp is not None:  # every item, or none (checked above)
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
