"""Batches that waste little on padding: length grouping, packing, collate.

A padded batch (group_by_length keeps rows of a batch close in length):

    input_ids      [[ 1, 882, 198, 9, 2, 1, 520, 198, 17, 2 ],
                    [ 1, 882, 198, 5, 2, 1, 520, 198, 33, 2 ]]   (B, T), right-padded with pad_id
    labels         [[-100,-100,-100,-100,-100,-100,-100,-100, 17, 2 ], ...]   -100: not trained, padding
    attention_mask [[1, 1, ...]]

A packed row holds several examples; position_ids restart at 0 for each, and no attention mask is
passed, so transformers builds a block-diagonal causal mask from the position_ids (no token
attends across examples). The first label of each packed example is -100: it would otherwise be
the target of the previous example's last token.
"""

from __future__ import annotations

import random

import torch

from .render import IGNORE


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: bool = True,
                           mega: int = 32) -> list[list[int]]:
    """Index batches for one epoch: shuffled; with `group`, sorted by length inside chunks of
    `mega` batches (so each batch has similar lengths), then the batch order shuffled again."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group:
        size = batch_size * mega
        idx = [i for s in range(0, len(idx), size)
               for i in sorted(idx[s:s + size], key=lambda i: -lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


def row_length(row: dict) -> int:
    return len(row["input_ids"])


def split_by_tokens(rows: list[dict], max_tokens: int, length=row_length) -> list[list[dict]]:
    """Split one batch into pieces whose padded size (rows x longest row) is at most `max_tokens`
    (a piece always takes at least one row; 0: never split). Rows are sorted longest first, so
    the pieces pad little. The pieces' gradients sum to the whole batch's (the loss is normalised by
    the trained tokens of the whole step), so this bounds activation memory without changing the
    update.
    """
    if not max_tokens or len(rows) * max(length(r) for r in rows) <= max_tokens:
        return [rows]  # no budget, or it fits: the batch as it is
    rows = sorted(rows, key=lambda r: -length(r))
    out: list[list[dict]] = []
    for r in rows:
        # rows are longest first, so a piece's padded size is its first row's length x its rows
        if out and length(out[-1][0]) * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def pack(examples: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """First-fit-decreasing packing of shuffled examples into rows of at most max_length tokens.

    Each row: {input_ids, labels, position_ids, n_examples}.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(space):
            if free >= n:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    packed = []
    for members in rows:
        ids, labels, pos = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE] + ex["labels"][1:]
            pos += list(range(len(ex["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos, "n_examples": len(members)})
    random.Random(seed + 1).shuffle(packed)
    return packed


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest. Packed rows get position_ids and no attention mask, plus
    example_ids (B, T): 1, 2, ... for the examples of a row, 0 for padding (per-example KL positions)."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    packed = "position_ids" in rows[0]
    extra = torch.zeros((B, T), dtype=torch.long)  # attention mask, or position ids when packed
    examples = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        if packed:
            extra[b, :n] = torch.tensor(r["position_ids"])
            extra[b, n:] = torch.arange(T - n)  # padding is its own 'example', never trained
            examples[b, :n] = (extra[b, :n] == 0).long().cumsum(0)
        else:
            extra[b, :n] = 1
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": extra, "example_ids": examples}
    if bool(extra.all()):
        return {"input_ids": input_ids, "labels": labels}  # no padding: no mask needed
    return {"input_ids": input_ids, "labels": labels, "attention_mask": extra}


def count_trained(rows: list[dict]) -> int:
    """Trained target tokens of these rows (label at position t >= 1, i.e. after the shift)."""
    return sum(sum(lab != IGNORE for lab in r["labels"][1:]) for r in rows)


def pack_shared_prefix(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Completions of one prompt in one row: [prompt, c_1, ..., c_k], the prompt computed once.

    Adjacent rows with equal prompts form a group (GRPO's G samples of a prompt). Each completion
    attends to the prompt and to itself (causally), never to its siblings; its positions continue
    from the prompt's end, so every token sees exactly what it would in its own row [prompt, c_j].
    Returns input_ids, position_ids (R, T); attention_mask (R, 1, T, T) bool, True = attends
    (padding positions attend to themselves only, so no row of the mask is empty); pred_at (N,):
    the flat index into (R * T) of the position whose output predicts each completion token
    (the prompt's last position for a completion's first token), target_ids (N,), lengths (n,);
    N = the completions' tokens, completion by completion in row order.
    """
    groups: list[tuple[list[int], list[int]]] = []
    for i, p in enumerate(prompts):
        if groups and groups[-1][0] == p:
            groups[-1][1].append(i)
        else:
            groups.append((p, [i]))
    T = max(len(p) + sum(len(completions[i]) for i in idx) for p, idx in groups)
    ids, pos, seg = [], [], []
    pred: list[list[int]] = [[] for _ in completions]
    for r, (p, idx) in enumerate(groups):
        row, at, part = list(p), list(range(len(p))), [0] * len(p)
        for j, i in enumerate(idx, 1):
            c, start = completions[i], len(row)
            pred[i] = ([r * T + len(p) - 1] + [r * T + start + t for t in range(len(c) - 1)]) if c else []
            row += c
            at += range(len(p), len(p) + len(c))
            part += [j] * len(c)
        pad = T - len(row)
        ids.append(row + [pad_id] * pad)
        pos.append(at + [0] * pad)
        seg.append(part + [-1] * pad)
    seg_t = torch.tensor(seg)                                               # (R, T): 0 prompt, j completion j, -1 pad
    k = torch.arange(T)
    real = seg_t >= 0
    mask = ((k[None, :] <= k[:, None])[None]                                # causal: key <= query
            & ((seg_t[:, None, :] == 0) | (seg_t[:, None, :] == seg_t[:, :, None]))  # the prompt, or the same completion
            & real[:, None, :] & real[:, :, None]) | torch.eye(T, dtype=torch.bool)[None]
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "attention_mask": mask[:, None],
            "pred_at": torch.tensor([x for p in pred for x in p], dtype=torch.long),
            "target_ids": torch.tensor([t for c in completions for t in c], dtype=torch.long),
            "lengths": torch.tensor([len(c) for c in completions]),
            "groups": _group_layout(groups, completions, T)}


class GroupLayout(dict):
    """`_group_layout`'s tensors; moves to a device with the batch (`.to`)."""

    def to(self, device) -> GroupLayout:
        return GroupLayout({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.items()})


def _group_layout(groups: list[tuple[list[int], list[int]]], completions: list[list[int]], T: int) -> GroupLayout:
    """Index tensors for attention over pack_shared_prefix's rows without the masked blocks
    (`train.precision.grouped_attention`): each row's prompt (the first Pm = longest prompt
    positions, causal), then every completion as its own (Lm,) query block against [its row's
    prompt keys (Pm), its own keys (Lm)]. pmask (R, 1, Pm, Pm), cmask (C, 1, Lm, Pm + Lm) bool
    (padding queries attend to themselves: no empty row); at (C, Lm): flat (R * T) index of each
    completion token (padding: its row's first); row (C,); src (R * T,): where each position's output
    is in [prompt outputs (R * Pm), completion outputs (C * Lm)] (padding: 0)."""
    R, C = len(groups), sum(len(idx) for _, idx in groups)
    Pm = max(len(p) for p, _ in groups)
    Lm = max([len(completions[i]) for _, idx in groups for i in idx] + [1])
    P = torch.tensor([len(p) for p, _ in groups])
    at = torch.zeros(C, Lm, dtype=torch.long)
    row = torch.zeros(C, dtype=torch.long)
    lens = torch.zeros(C, dtype=torch.long)
    src = torch.zeros(R * T, dtype=torch.long)
    c = 0
    for r, (p, idx) in enumerate(groups):
        src[r * T + torch.arange(len(p))] = r * Pm + torch.arange(len(p))
        start = len(p)
        for i in idx:
            n = len(completions[i])
            at[c] = r * T
            at[c, :n] = r * T + start + torch.arange(n)
            src[r * T + start + torch.arange(n)] = R * Pm + c * Lm + torch.arange(n)
            row[c], lens[c] = r, n
            start += n
            c += 1
    k = torch.arange(Pm)
    pmask = ((k[None, :] <= k[:, None])[None] & (k[None, None, :] < P[:, None, None])) | torch.eye(Pm, dtype=torch.bool)
    j = torch.arange(Lm)
    own = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < lens[:, None, None])            # (C, Lm, Lm)
    own = own | (torch.eye(Lm, dtype=torch.bool)[None] & (j[None, :, None] >= lens[:, None, None]))
    prompt = (k[None, None, :] < P[row][:, None, None]) & (j[None, :, None] < lens[:, None, None])  # (C, Lm, Pm)
    return GroupLayout(pm=Pm, at=at, row=row, src=src, pmask=pmask[:, None],
                       cmask=torch.cat([prompt, own], dim=-1)[:, None])
