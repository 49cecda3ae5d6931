"""GRPO and its variants (Dr. GRPO, DAPO): RL with verifiable rewards on completions the model
samples during the step.

    begin_step   B prompts --generate_many (G samples each, adapters merged, no grad)--> B*G completions
                 --rewards.compute_rewards--> r (B*G,) --losses.grpo.group_advantages--> A (B*G,)
                 --> rows {prompt_ids, completion_ids, advantage, loss (counts in the loss), old_logps?}
    split        micro-batches of whole groups (the G completions of a prompt), within the token budget
    collate      each group in one row [prompt, c_1, ..., c_G] (`batching.pack_shared_prefix`): the
                 prompt is computed once for its G completions, each completion attending to the
                 prompt and itself only, so every token's log-prob is the one its own row would give
    __call__     log-probs of the completion tokens (B*G, T) in chunks, the base's too when grpo.beta > 0
                 --losses.grpo.grpo_loss--> this micro-batch's share of the step's loss

The step's normaliser (`units`) makes micro-batches and processes add up to one batch:
dapo / bnpo divide by the step's loss tokens on all processes (TRL's dapo `num_items_in_batch`;
bnpo is TRL's per-micro-batch token mean, which here is the step's, so it equals dapo); grpo and
dr_grpo by the step's completions (a sequence mean, or a sum over max_new_tokens, per completion).

Completions end at the end-of-turn token (generation stops there); grpo.mask_truncated drops every
token of a completion cut by max_new_tokens. With grpo.num_iterations = mu > 1 a batch of
completions is sampled every mu-th step and trained on for mu steps, clipped against the log-probs
stored when it was sampled; the prompts the loop hands the steps in between are not used.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ...config import CHUNK_SIZE
from ...data.batching import pack_shared_prefix, split_by_tokens
from ...data.preference import split_rows
from ...data.prepare import Prepared
from ...data.prompts import last_user, prompt_rows
from ...data.reader import load_chats
from ...data.render import IGNORE
from ...data.tools import render_all
from ...errors import ConfigError
from ...generate import GenSettings, generate_many, merged, stop_ids
from ...losses import grpo as G
from ...losses.preference import token_logps
from ...rewards import BUILTINS, compute_rewards, load_function, parse_specs
from ...utils import eval_mode
from ..forward import (
    base_hidden,
    chunk_with_reference,
    hidden_states,
    output_layer,
    reference_head,
)
from ..precision import use_attention, with_groups
from .base import Objective, StepOut, append_samples, process_place, sample_seed
from .paired import collate_sequences


def _unwrapped(model):
    """The model under DDP (generation and merging act on the PEFT model itself)."""
    return getattr(model, "module", model)


def _merging(net):
    """`generate.merged`, unless the adapters are switched off (the base answering: nothing to merge)."""
    off = any(getattr(m, "disable_adapters", False) is True for m in net.modules())
    return nullcontext() if off else merged(net)


def completion_scores(model, batch: dict, ref_model=None, want_ref: bool = False, chunk_size: int = CHUNK_SIZE) -> dict:
    """Per-token scores of a batch's n completions: logps (n, Tc) with grad, ref_logps (n, Tc) or
    None, entropy (n, Tc) no grad; zeros past each completion's end (Tc = the longest completion).
    The batch: `batching.pack_shared_prefix`'s (pred_at / target_ids / lengths: each group's prompt
    once) or collate_sequences' rows (labels, one row per completion)."""
    if "pred_at" in batch:
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
        if "groups" in batch:  # ATTENTION skips the masked blocks
            inputs["attention_mask"] = with_groups(inputs["attention_mask"], batch["groups"])
        tokens, lengths = batch["target_ids"], batch["lengths"]

        def pick(hidden):                                    # (R, T, H) -> (N, H), N = completion tokens
            return hidden.flatten(0, 1)[batch["pred_at"]]
    else:
        inputs = batch
        targets = batch["labels"][:, 1:]                     # position t predicts token t+1
        sel = targets != IGNORE                              # (B, T-1): the completion tokens, in order
        tokens, lengths = targets[sel], sel.sum(1)

        def pick(hidden):
            return hidden[:, :-1][sel]
    kw = {}
    if want_ref:  # the base first, while no autograd graph is held
        kw = dict(ref_hidden=pick(base_hidden(model, inputs, ref_model)), **reference_head(model, ref_model))
        chunk_size = chunk_with_reference(chunk_size)
    h = pick(hidden_states(model, inputs))
    Tc = int(lengths.max()) if lengths.numel() else 0
    head = output_layer(model)
    tl = token_logps(h, head.weight, tokens, bias=head.bias, chunk_size=chunk_size, logit_softcap=head.softcap,
                     logit_scale=head.scale, entropy=True, **kw)
    within = torch.arange(Tc, device=lengths.device)[None, :] < lengths[:, None]   # (n, Tc)

    def spread(flat):                                        # (N,) -> (n, Tc), completion by completion
        return None if flat is None else torch.zeros(within.shape, dtype=flat.dtype, device=flat.device).masked_scatter(within, flat)

    return {"logps": spread(tl.logps), "ref_logps": spread(tl.ref_logps), "entropy": spread(tl.entropy),
            "within": within}


PACKABLE = {"sdpa", "slimtune_sdpa", "eager"}
"""Attention implementations that take pack_shared_prefix's (R, 1, T, T) mask (eager as an additive one)."""


def attention_kind(model) -> str:
    """The model's attention implementation (transformers' config._attn_implementation)."""
    net = _unwrapped(model)
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return getattr(getattr(base, "config", None), "_attn_implementation", None) or "eager"


class GRPO(Objective):
    """Group relative policy optimisation on prompt rows (spec rows "prompts"); knobs in `grpo.*`."""

    name = "grpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        gc = cfg.grpo
        if not gc.rewards:
            raise ConfigError("loss.objective=grpo needs grpo.rewards, e.g. [{name: ifeval}, {name: ended, weight: 0.2}]")
        self.rewards = parse_specs(gc.rewards)
        self.functions = {s["name"]: load_function(s["name"]) for s in self.rewards if s["name"] not in BUILTINS}
        self.tokenizer = None
        self._reuse: dict[int, tuple[int, list[dict]]] = {}
        """grpo.num_iterations > 1: batch position in the step -> (step sampled, its rows)."""
        self._calls = (-1, 0)
        """(step, begin_step calls in it): which batch of the step this is."""
        self._pending: dict[str, float] = {}
        """The sampled completions' statistics, added to the step's first micro-batch's sums."""
        self.length_max = 0
        """Longest completion of the last step on this process."""
        self.attention = "eager"
        """The policy's attention implementation (set at each step): `PACKABLE` ones get packed groups."""

    @property
    def uses_reference(self) -> bool:
        """The base's log-probs are needed only for the KL term."""
        return self.cfg.grpo.beta > 0

    # --- data

    def prepare_data(self, tokenizer, seed: int = 0, log=None):
        """cfg.data -> Prepared(train, val) of prompt rows (data/prompts.prompt_rows); general
        prompts stay SFT examples (KL to base on unrelated chats)."""

        dc, gc = self.cfg.data, self.cfg.grpo
        self.tokenizer = tokenizer
        if not dc.train:
            raise ConfigError("no training data: set data.train (prompts: messages or text; builtin:grpo_prompts)")
        kw = dict(system_prompt=dc.system_prompt, columns=dc.columns, split=dc.split, subset=dc.subset,
                  max_prompt_tokens=dc.max_length - gc.max_new_tokens, drop_long=dc.drop_untrained)
        rows, dropped = prompt_rows(dc.train, tokenizer, **kw)
        if dc.val:
            train, val = rows, prompt_rows(dc.val, tokenizer, **kw)[0]
        else:
            train, val = split_rows(rows, dc.val_fraction, seed)
        train = train[:dc.max_examples] if dc.max_examples else train
        general = []
        if dc.general_prompts:
            general, _ = render_all(load_chats(dc.general_prompts), tokenizer, source=dc.general_prompts,
                                    train_on=dc.train_on, max_length=dc.max_length)
        if dropped and log:
            log(f"data: {len(dropped)} prompts longer than data.max_length - grpo.max_new_tokens dropped "
                f"(first: {dropped[0]})")

        def summary(rs):
            return {"rows": len(rs), "prompt_tokens": sum(len(r["prompt_ids"]) for r in rs), "trained_tokens": 0,
                    "completions_per_epoch": len(rs) * gc.num_generations}

        stats = {"format": "prompts", "train": {**summary(train), "dropped": len(dropped),
                                                "dropped_where": dropped[:10]}, "val": summary(val)}
        return Prepared(train, val, general, stats)

    def length(self, row: dict) -> int:
        return len(row["prompt_ids"]) + len(row.get("completion_ids", ()))

    # --- sampling

    def settings(self, step: int) -> GenSettings:
        gc = self.cfg.grpo
        return GenSettings(max_new_tokens=gc.max_new_tokens, temperature=gc.temperature, top_p=gc.top_p,
                           top_k=gc.top_k, autocast="bf16" if self.cfg.train.mixed_precision == "bf16" else "no")

    def seeds(self, rows: list[dict], step: int) -> list[int]:
        """One sampling seed per completion, from (train.seed, step, the prompt's file:line, g): the
        same completions whatever the batch, process count or order."""
        G_ = self.cfg.grpo.num_generations
        return [sample_seed(self.cfg.train.seed, step, r["where"], g) for r in rows for g in range(G_)]

    def begin_step(self, model, rows: list[dict], step: int, ref_model=None) -> list[dict]:
        """B prompt rows -> B*G completion rows (see the module docstring), G adjacent per prompt."""
        gc = self.cfg.grpo
        use_attention(_unwrapped(model))  # an SDPA model: packed groups attend without their masked blocks
        self.attention = attention_kind(model)
        k = self._calls[1] + 1 if self._calls[0] == step else 0
        self._calls = (step, k)
        if k == 0:
            self._pending = {}
            self.length_max = 0
        if gc.num_iterations > 1 and k in self._reuse and step - self._reuse[k][0] < gc.num_iterations:
            out, stats = self._reuse[k][1:]
        else:
            out, stats = self.sample(model, rows, step)
            if gc.num_iterations > 1:
                self.store_old_logps(model, out)
                self._reuse[k] = (step, out, stats)
            if gc.samples_every and step % gc.samples_every == 0 and process_place()[0] == 0:
                self.write_samples(out, step)
        for key, v in stats.items():  # what this step trains on, logged with its first micro-batch
            self._pending[key] = self._pending.get(key, 0.0) + v
        self.length_max = max([self.length_max, *(len(r["completion_ids"]) for r in out)])
        return out

    @torch.no_grad()
    def sample(self, model, rows: list[dict], step: int) -> tuple[list[dict], dict[str, float]]:
        """Generate, reward, and build the completion rows; returns (rows, their statistics' sums)."""
        gc = self.cfg.grpo
        G_ = gc.num_generations
        net = _unwrapped(model)
        chats = [r["messages"] for r in rows for _ in range(G_)]
        with eval_mode(net), merged(net):
            answers = generate_many(net, self.tokenizer, chats, self.settings(step), self.cfg.eval.gen_batch_size,
                                    seeds=self.seeds(rows, step), return_ids=True)
        prompts = [r for r in rows for _ in range(G_)]
        total, per = self.score(prompts, answers)
        adv = G.group_advantages(total, G_, gc.scale_rewards)
        ids = [a["ids"] for a in answers]
        width = max(1, max(map(len, ids)))
        padded = torch.tensor([i + [-1] * (width - len(i)) for i in ids])        # -1: no token id
        mask, ended = G.completion_mask(padded, stop_ids(self.tokenizer, net), gc.mask_truncated)
        out = []
        for j, (p, a) in enumerate(zip(prompts, answers)):
            n_loss = int(mask[j].sum())
            out.append({"prompt_ids": p["prompt_ids"], "completion_ids": ids[j], "loss": n_loss > 0, "advantage": float(adv[j]), "reward": float(total[j]),
                        "rewards": {k: float(v[j]) for k, v in per.items()}, "ended": bool(ended[j]),
                        "text": a["text"], "where": p["where"], "messages": p["messages"]})
        return out, self.stats(total, per, out)

    def score(self, prompts: list[dict], answers: list[dict]):
        """(total (n,), {label: (n,)}) rewards of the answers; errors name the reward and the row."""
        cols = sorted({c for p in prompts for c in p["columns"]})
        return compute_rewards(self.cfg.grpo.rewards, [p["messages"] for p in prompts], [a["text"] for a in answers],
                               {c: [p["columns"].get(c) for p in prompts] for c in cols},
                               [a["ended"] for a in answers], n_tokens=[a["n_tokens"] for a in answers],
                               where=[p["where"] for p in prompts], functions=self.functions)

    def stats(self, total, per, rows) -> dict[str, float]:
        """Sums over the completions (rewards total (n,), per function {label: (n,)}) to log."""
        G_ = self.cfg.grpo.num_generations
        lengths = [len(r["completion_ids"]) for r in rows]
        grouped = total.view(-1, G_)
        add = {"completions": len(rows), "groups": grouped.shape[0],
               "no_signal": G.no_signal_share(total, G_) * grouped.shape[0],
               "group_std": float(grouped.std(1).sum()) if G_ > 1 else 0.0,
               "reward": float(total.sum()), "reward_sq": float((total ** 2).sum()),
               "length": float(sum(lengths)), "truncated": float(sum(not r["ended"] for r in rows))}
        for label, v in per.items():
            add[f"r/{label}"], add[f"r2/{label}"] = float(v.sum()), float((v ** 2).sum())
        return add

    @torch.no_grad()
    def store_old_logps(self, model, rows: list[dict]) -> None:
        """rows[i]["old_logps"]: the policy's per-token log-probs now, before any update on them."""
        bs = max(1, self.cfg.eval.batch_size)
        device = next(model.parameters()).device
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.train.mixed_precision == "bf16")
        with eval_mode(model), amp:  # as the loss will compute them (train.mixed_precision)
            for s in range(0, len(rows), bs):
                part = rows[s:s + bs]
                batch = {k: v.to(device) for k, v in self.collate(part, self._pad()).items()}
                lp = completion_scores(model, batch, chunk_size=self.cfg.loss.chunk_size)["logps"]
                for r, row_lp in zip(part, lp.tolist()):
                    r["old_logps"] = row_lp[:len(r["completion_ids"])]

    def write_samples(self, rows: list[dict], step: int) -> None:
        """Append the step's completions with their rewards to RUN/samples.jsonl (one write per step)."""
        append_samples(self.cfg.train.output_dir, [
            {"step": step, "where": r["where"], "prompt": last_user(r["messages"]), "completion": r["text"],
             "reward": r["reward"], "rewards": r["rewards"], "advantage": round(r["advantage"], 4),
             "n_tokens": len(r["completion_ids"]), "ended": r["ended"]} for r in rows])

    # --- the loss

    def units(self, rows: list[dict]) -> float:
        """dapo / bnpo: the rows' loss tokens; grpo / dr_grpo: their completions."""
        if self.cfg.grpo.loss_type in ("dapo", "bnpo"):
            return float(sum(len(r["completion_ids"]) for r in rows if r["loss"]))
        return float(len(rows))

    def tokens(self, rows: list[dict]) -> int:
        """Completion tokens trained on (throughput)."""
        return sum(len(r["completion_ids"]) for r in rows)

    def _pad(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0

    def split(self, rows: list[dict], max_tokens: int) -> list[list[dict]]:
        """Micro-batches of whole groups (rows sharing a prompt, adjacent as begin_step makes them)
        where they fit, so each prompt is computed once: a group costs its packed length (prompt +
        its completions); a group longer than the budget is cut into runs of completions, each
        with the prompt. Pieces of at most `max_tokens` padded tokens, longest first."""
        if self.attention not in PACKABLE:
            return super().split(rows, max_tokens)
        units: list[list[dict]] = []
        for r in rows:
            if units and units[-1][0]["prompt_ids"] == r["prompt_ids"] and (
                    not max_tokens or self._packed(units[-1] + [r]) <= max_tokens):
                units[-1].append(r)
            else:
                units.append([r])
        return [[r for u in piece for r in u] for piece in split_by_tokens(units, max_tokens, self._packed)]

    @staticmethod
    def _packed(unit: list[dict]) -> int:
        """Tokens of one group packed: its prompt once, then each completion."""
        return len(unit[0]["prompt_ids"]) + sum(len(r.get("completion_ids", ())) for r in unit)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """The completions as `pack_shared_prefix` packs them (each prompt once; collate_sequences'
        one row per completion where the attention cannot take the mask: `PACKABLE`) + advantage (n,),
        loss_mask (n, Tc), old_logps (n, Tc)."""
        prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
        if self.attention in PACKABLE:
            batch = pack_shared_prefix(prompts, completions, pad_id)
            if self.attention == "eager":  # eager attention adds its mask to the scores, over the whole row
                batch["attention_mask"] = torch.zeros(batch["attention_mask"].shape).masked_fill(
                    ~batch["attention_mask"], torch.finfo(torch.float32).min)
                del batch["groups"]
        else:
            batch = collate_sequences(prompts, completions, pad_id)
        Tc = max(len(r["completion_ids"]) for r in rows)
        mask = torch.zeros(len(rows), Tc)
        for i, r in enumerate(rows):
            mask[i, :len(r["completion_ids"])] = float(r["loss"])
        batch.update(advantage=torch.tensor([r["advantage"] for r in rows]), loss_mask=mask)
        if all("old_logps" in r for r in rows):
            batch["old_logps"] = torch.tensor([r["old_logps"] + [0.0] * (Tc - len(r["old_logps"])) for r in rows])
        return batch

    def __call__(self, model, batch, normaliser, step, ref_model=None) -> StepOut:
        gc = self.cfg.grpo
        n = batch["advantage"].shape[0]
        sc = completion_scores(model, batch, ref_model, self.uses_reference, self.cfg.loss.chunk_size)
        mask = batch["loss_mask"]
        per_token = gc.loss_type in ("dapo", "bnpo")
        out = G.grpo_loss(sc["logps"], batch.get("old_logps"), batch["advantage"], mask, sc["ref_logps"],
                          beta=gc.beta, epsilon_low=gc.epsilon_low, epsilon_high=gc.epsilon_high,
                          loss_type="dapo" if per_token else gc.loss_type, max_completion_length=gc.max_new_tokens,
                          num_items=normaliser if per_token else None)
        # grpo / dr_grpo average over this piece's n completions: x n / (the step's completions)
        loss = out.loss if per_token else out.loss * n / max(normaliser, 1e-9)
        t = float(out.tokens)
        sums = {"loss": float(loss.detach()) * normaliser, "loss_tokens": t, "clip_low": out.clip_low * t,
                "clip_high": out.clip_high * t, "clip_region": out.clip_region * t, "kl": out.kl * t,
                "entropy": float((sc["entropy"] * mask).sum())}
        sums.update(self._pending)  # the sampled completions' statistics, once per step and process
        self._pending = {}
        return StepOut(loss, sums)

    def summarize(self, sums: dict[str, float], units: float, step: int) -> dict[str, float]:
        n, t = max(sums.get("completions", 0.0), 1.0), max(sums["loss_tokens"], 1.0)

        def std(s, s2):
            return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

        row = {"loss": sums["loss"] / max(units, 1e-9), "reward": sums.get("reward", 0.0) / n,
               "reward_std": std(sums.get("reward", 0.0), sums.get("reward_sq", 0.0)),
               "reward_group_std": sums.get("group_std", 0.0) / max(sums.get("groups", 0.0), 1.0)}
        for key in sorted(k for k in sums if k.startswith("r/")):
            label = key[2:]
            row[f"reward/{label}"] = sums[key] / n
            row[f"reward/{label}/std"] = std(sums[key], sums[f"r2/{label}"])
        row.update({"no_signal": sums.get("no_signal", 0.0) / max(sums.get("groups", 0.0), 1.0),
                    "completion_length": sums.get("length", 0.0) / n, "completion_length_max": self.length_max,
                    "truncated": sums.get("truncated", 0.0) / n, "clip_low": sums["clip_low"] / t,
                    "clip_high": sums["clip_high"] / t, "clip_region": sums["clip_region"] / t,
                    "kl": sums["kl"] / t if self.uses_reference else None, "entropy": sums["entropy"] / t})
        return row

    # --- evaluation

    @torch.no_grad()
    def evaluate(self, model, rows, pad_id, batch_size, ref_model=None, max_examples=None, kl=True, ref_cache=None):
        """Held-out prompts answered greedily once each (adapters merged): eval_reward (the weighted
        total), eval_reward/<label> per function, eval_length (tokens), eval_ended (share);
        eval_loss = -eval_reward (early stopping minimises it)."""
        rows = rows[:max_examples] if max_examples else rows
        if not rows:
            return {}
        net = _unwrapped(model)
        settings = GenSettings(max_new_tokens=self.cfg.grpo.max_new_tokens,
                               autocast="bf16" if self.cfg.train.mixed_precision == "bf16" else "no")
        with eval_mode(net), _merging(net):
            answers = generate_many(net, self.tokenizer, [r["messages"] for r in rows], settings,
                                    self.cfg.eval.gen_batch_size)
        total, per = self.score(rows, answers)
        mean = float(total.mean())
        ev = {"eval_loss": -mean, "eval_reward": mean, **{f"eval_reward/{k}": float(v.mean()) for k, v in per.items()},
              "eval_length": sum(a["n_tokens"] for a in answers) / len(answers),
              "eval_ended": sum(a["ended"] for a in answers) / len(answers)}
        return ev


OBJECTIVES = {GRPO.name: GRPO}
