"""Gradient competition, summary: the markdown report of the design, the readings table (every
claim in every reading beside algebra's value, and whether the verdict depends on the
reading), the per-checkpoint exponents and their resolution, diverged trials, and the two
open questions."""

from __future__ import annotations

import math
from typing import Any

from batchlab.experiments.gradient_competition_claims import (
    LATE_TRAIN_ACC,
    PRIMARY_READING,
    READINGS,
)
from batchlab.experiments.options import GradientCompetition as GCOptions
from batchlab.experiments.outputs import md_table


def _iv(lo: float, hi: float) -> str:
    def f(v: float) -> str:
        return f"{v:.3g}" if math.isfinite(v) else ("-inf" if v < 0 else "inf")

    return f"[{f(lo)}, {f(hi)}]"


def summary_md(rows: list[dict[str, Any]], claims: list[Any], o: GCOptions, cfg: Any,
               T: int, n_reps: int) -> str:
    by_id = {c.id: c for c in claims}
    reading_rows, dependent = [], []
    for x in (r for r in rows if r["kind"] == "reading"):
        c = by_id.get(f"{x['reading']}:{x['claim']}")
        verdict = c.verdict if c is not None else "n/a"
        if c is not None and c.reason is not None:
            verdict += f" ({c.reason['code']}{', check ' + c.reason['check'] if 'check' in c.reason else ''})"
        alg = x["algebra"]
        reading_rows.append({
            "finding": x["finding"], "claim": x["claim"],
            "reading": x["reading"] + (" (primary)" if x["primary"] else ""),
            "estimate": x["estimate"], "95% CI": _iv(x["ci_lo"], x["ci_hi"]), "n": x["n"],
            "algebra alone": "-" if alg is None else f"{alg:.3g}", "verdict": verdict})
    seen: dict[str, set[str]] = {}
    seen_data: dict[str, set[str]] = {}
    for x in (r for r in rows if r["kind"] == "reading"):
        key = f"{x['finding']} {x['claim']}"
        seen.setdefault(key, set()).add(x["data_outcome"])
        if not x["by_algebra"]:
            seen_data.setdefault(key, set()).add(x["data_outcome"])
    dependent = [k for k, v in seen_data.items() if len(v) > 1]
    by_algebra = [k for k, v in seen.items() if len(v) > 1 and k not in dependent]
    fits = [r for r in rows if r["kind"] == "fit"]
    fit_rows = [{"regime": f["regime"], "mode": f["mode"], "exponent": f["exponent"],
                 "95% CI over seeds": _iv(f["ci_low"], f["ci_high"]), "seeds": f["replicates"],
                 "within-checkpoint SE": f["within_se"]} for f in fits]
    form_rows = [{"regime": f["regime"], "mode": f["mode"],
                  "std ~ b^q: q": f.get("std_power_q", math.nan),
                  "rms log resid (power)": f.get("std_power_rms_log", math.nan),
                  "sqrt(a+b·B): a": f.get("std_alpha", math.nan),
                  "beta": f.get("std_beta", math.nan),
                  "rms log resid (sqrt)": f.get("std_sqrt_rms_log", math.nan),
                  "better": f.get("std_best", "n/a")} for f in fits]
    norm_rows = [x for x in rows if x["kind"] == "norm"]
    blow = [x for x in norm_rows if x["diverged"]]
    n_div = sum(x["diverged"] for x in norm_rows)
    n_all = sum(x["trials"] for x in norm_rows)
    dec_rows = [x for x in rows if x["kind"] == "decomposition"]
    se = [f["within_se"] for f in fits if math.isfinite(f["within_se"])]
    lines = [
        f"Checkpoints: default MLP, Glorot, SGD lr {o.lr}, batch 1024 on {cfg.dataset}; "
        f"early = epoch {o.early_epochs}, late = epoch {o.late_epochs}"
        f" (late batch size {o.late_batch_size}). **{n_reps} replicate(s)** = the checkpoints "
        f"of {n_reps} training seed(s); {T} trials per batch size, regime and checkpoint, "
        f"{o.n_samples} samples each (fresh samples per trial"
        f"{'; SAME sample set in every trial' if o.same_samples else ''}). Every interval is "
        "taken across checkpoints, over one estimate per checkpoint (its trials summarised "
        "first); one checkpoint gives an unbounded interval. "
        "Remainder rule: floor(n/b) steps of b, then one step with the n mod b left over. "
        f"Engine: {', '.join(sorted({str(x['engine']) for x in norm_rows}))} "
        "(`batchlab.analysis.gradcomp`; every trial replays from its seed in trials.csv).",
        "",
        "Readings: " + "; ".join(f"`{m}` = {READINGS[m]}" for m in o.modes) + ". "
        f"The primary reading of every claim is `{PRIMARY_READING}`: algebra alone makes it "
        "independent of b, so what depends on b is the data's. In `displacement` the claims "
        "about a scale that varies with b are decided by algebra (the 1/b of a mean-reduced "
        "loss): they are shown as checks (untestable, construction), not evidence.",
        "",
        f"S8 needs a late checkpoint that is late in training: its train accuracy must be >= "
        f"{LATE_TRAIN_ACC:g} across seeds, else S8 is untestable at this budget.",
        "",
        "## Every claim in every reading",
        "",
        md_table(reading_rows),
        ("**The verdict depends on the reading** among the readings the data decide (their "
         "intervals fall on different sides of the region) for: " + ", ".join(dependent) + "."
         ) if dependent else "Among the readings the data decide, no verdict depends on the "
        "reading.",
        ("Only the displacement reading's check (decided by algebra) differs for: " +
         ", ".join(by_algebra) + ".") if by_algebra else "",
        "",
        "## Exponent p of the mean norm (norm ~ b^p; the study: p = 0.5), one fit per checkpoint",
        "",
        md_table(fit_rows),
        (f"Resolution of the trials per checkpoint: the within-checkpoint standard error of the "
         f"exponent is {min(se):.2g}-{max(se):.2g} (from the trials' cv), against the regions' "
         "width of 0.3 and the spread between checkpoints that the interval measures." if se
         else ""),
        "",
        "## Diverged trials",
        "",
        f"{n_div} of {n_all} trial records diverged (a step loss non-finite or > "
        f"{o.blowup_loss:g} nats, or a non-finite sum); they are kept in the tensor files "
        "and trials.csv, excluded from every statistic, and counted in each claim's evidence.",
        "",
        (md_table(blow, ["regime", "mode", "replicate", "b", "trials", "diverged"]) if blow
         else ""),
        "## Norm statistics per checkpoint",
        "",
        md_table(norm_rows, ["regime", "mode", "replicate", "b", "kept", "diverged", "mean",
                             "std", "cv", "median_abs", "tail_fraction", "threshold",
                             "seconds"]),
        "`tail_fraction`: the fraction of values with |value| >= `threshold`, ONE threshold "
        "per checkpoint, regime and reading, common to every b (4 x the RMS pooled over b).",
        "",
        "## Open question 1: functional form of std(norm) vs b (seeds' mean std)", "",
        md_table(form_rows),
        "## Open question 2: the norm's spread across sample sets", "",
        f"Nested design per checkpoint: {o.decomp_sets} fixed sample sets x "
        f"{o.decomp_orders} orders each. With a fixed set and plain SGD the only remaining "
        "randomness is the order of the samples (which samples share a batch, the sequence of "
        "steps): at b = n it reduces to float summation order, so `share_samples` is 1 there "
        "by construction. S6 is judged on `relative_spread` = sd of the sets' mean norms / "
        "their mean.", "",
        md_table(dec_rows, ["regime", "mode", "replicate", "b", "relative_spread",
                            "var_samples", "var_order", "share_samples"]),
    ]
    return "\n".join(lines)
