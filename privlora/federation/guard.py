"""What a client node accepts from the server, and what it never releases.

A malicious server can send crafted weights: a non-finite or huge value (a head weight of 3e38
makes a DP-SGD release NaN exactly when a target record is sampled: one bit per round that DP
does not cover), or a field the client's strategy does not use (``base_delta/...`` rewrites a
frozen base weight, and only FLoRA merges deltas into the base). The node checks every round
instruction before it charges its ledger or touches its model (`check_instruction`):

- the header: the node's own strategy, a round >= 1, a rank in [1, the node's configured rank];
- exactly the fields its strategy declares for that rank (`Strategy.incoming`), each of the
  declared shape and a float dtype;
- every value finite and within ``federation.broadcast_bound`` (public, in the config).

After training, an update holding a non-finite value is never released (`check_release`): the
node refuses the round and says why. Inside DP-SGD an example whose per-example gradient is
non-finite contributes zero before clipping (`privlora.federation.client.zero_nonfinite_samples`),
so the sensitivity stays the clip norm C.
"""

from __future__ import annotations

import numpy as np

from privlora.core.config import ExperimentConfig
from privlora.federation.messages import Message


def check_header(cfg: ExperimentConfig, client_id: int, header: dict) -> str | None:
    """None if a round instruction's header is one this node can follow, else why not."""
    strategy = header.get("strategy")
    if strategy != cfg.federation.strategy:
        return f"the instruction is for strategy {strategy!r} but this node's config runs {cfg.federation.strategy!r}"
    rnd, rank = header.get("round"), header.get("rank")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        return f"the instruction's round {rnd!r} is not an integer >= 1"
    own = cfg.client_rank(client_id)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= own:
        return f"the instruction's rank {rank!r} is not an integer in [1, {own}] (this client's configured rank; ranks only shrink)"
    return None


def check_instruction(cfg: ExperimentConfig, client_id: int, msg: Message, fields: dict[str, tuple[int, ...]]) -> str | None:
    """None if the instruction's tensors are exactly ``fields`` (name -> shape), of a float dtype,
    finite and within ``federation.broadcast_bound``; else the reason the node refuses it."""
    name = cfg.federation.strategy
    extra = sorted(set(msg.tensors) - set(fields))
    if extra:
        return (f"the instruction carries field(s) {extra[:5]} that strategy {name!r} does not use"
                f"{' (base-weight deltas are accepted by strategy flora only)' if any(k.startswith('base_delta/') for k in extra) else ''}; "
                "refusing it rather than let the server change what it was not meant to")
    missing = sorted(set(fields) - set(msg.tensors))
    if missing:
        return f"the instruction lacks field(s) {missing[:5]} that strategy {name!r} needs"
    bound = float(cfg.federation.broadcast_bound)
    for k in sorted(fields):
        v = msg.tensors[k]
        if tuple(v.shape) != tuple(fields[k]):
            return f"field {k!r} has shape {tuple(v.shape)}, this client expects {tuple(fields[k])}"
        if not np.issubdtype(v.dtype, np.floating):
            return f"field {k!r} has dtype {v.dtype}, not a float"
        finite = np.isfinite(v)
        if not finite.all():
            return f"field {k!r} holds {int((~finite).sum())} non-finite value(s) (NaN or infinity)"
        big = float(np.max(np.abs(v))) if v.size else 0.0
        if big > bound:
            return (f"field {k!r} holds a value of magnitude {big:.3g}, above federation.broadcast_bound = {bound:g} "
                    "(the largest value this node accepts in a broadcast)")
    return None


def check_release(update: bytes) -> str | None:
    """None if every tensor of a ``client_update`` is finite, else why it must not be released."""
    msg = Message.from_bytes(update, "client_update")
    bad = sorted(k for k, v in msg.tensors.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
    if bad:
        return (f"local training produced non-finite values in {bad[:5]}; the update is not released "
                "(a non-finite release could say whether a record was sampled)")
    return None


__all__ = ["check_header", "check_instruction", "check_release"]
