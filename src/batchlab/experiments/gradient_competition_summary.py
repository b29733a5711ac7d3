"""Gradient competition, summary: the markdown report of the design, fits, norm statistics,
blow-ups and the two open questions."""

from __future__ import annotations

import math

from batchlab.experiments.outputs import md_table


def summary_md(rows, fits, forms, dec_rows, o, cfg, T) -> str:
    fit_rows = [{"regime": r, "mode": m, "exponent": f["exponent"], "95% CI":
                 f"[{f['ci_low']:.3f}, {f['ci_high']:.3f}]", "reg. SE": f["se"],
                 "bootstrap CI": f"[{f['boot_low']:.3f}, {f['boot_high']:.3f}]", "R²": f["r2"]}
                for (r, m), f in fits.items()]
    form_rows = [{"regime": r, "mode": m, "std ~ b^q: q": f.get("power_q", math.nan),
                  "rms log resid (power)": f.get("power_rms_log", math.nan),
                  "sqrt(a+b·B): a": f.get("alpha", math.nan), "beta": f.get("beta", math.nan),
                  "rms log resid (sqrt)": f.get("sqrt_rms_log", math.nan), "better": f["best"]}
                 for (r, m), f in forms.items()]
    norm_rows = [x for x in rows if x["kind"] == "norm"]
    blow = [x for x in norm_rows if x["blowups"]]
    lines = [
        f"Checkpoints: default MLP, Glorot, SGD lr {o['lr']}, batch 1024 on {cfg.dataset}; "
        f"early = epoch {o['early_epochs']}, late = epoch {o['late_epochs']}"
        f" (late batch size {o['late_batch_size']}). {T} trials per batch size and regime, "
        f"{o['n_samples']} samples each (fresh samples per trial"
        f"{'; SAME sample set in every trial' if o['same_samples'] else ''}). "
        "Remainder rule: floor(n/b) steps of b, then one step with the n mod b left over. "
        f"Engine: {', '.join(sorted({str(x['engine']) for x in norm_rows}))} "
        "(`batchlab.analysis.gradcomp`; every trial replays from its seed in trials.csv).",
        "",
        "Modes: `displacement` = sum of mean-loss step gradients (= weight displacement / lr); "
        "`sample-sum` = the same steps, each gradient x its batch size (sum of per-sample "
        "gradients); `sum-loss` = sum-reduced loss for stepping (lr x B) and recording. "
        f"A sum-loss trial 'blows up' if a step loss is non-finite or > {o['blowup_loss']:g} "
        "nats or the summed gradient is non-finite; such trials are kept in the tensor files "
        "and trials.csv but excluded from the statistics.",
        "",
        "## Power-law fit of mean norm vs b (exponent p in norm ~ b^p; the study: p = 0.5)",
        "", md_table(fit_rows),
        "## Norm statistics", "",
        md_table(norm_rows, ["regime", "mode", "b", "trials", "blowups", "mean", "std", "cv",
                             "norm_std", "kurtosis", "tail_fraction", "seconds"]),
        "## Sum-loss blow-ups", "",
        (md_table(blow, ["regime", "mode", "b", "trials", "blowups"]) if blow
         else "No trial blew up.\n"),
        "## Open question 1: functional form of std(norm) vs b", "",
        md_table(form_rows),
        "## Open question 2: variance from which samples were drawn vs the rest", "",
        f"Nested design: {o['decomp_sets']} fixed sample sets x {o['decomp_orders']} orders "
        "each (same-samples option). With a fixed set and plain SGD the only remaining "
        "randomness is the order of the samples (which samples share a batch, the sequence of "
        "steps): at b = n it reduces to float summation order. `share_samples` = between-set "
        "variance (one-way random-effects ANOVA) / total.", "",
        md_table(dec_rows, ["regime", "mode", "b", "var_samples", "var_order", "share_samples"]),
    ]
    return "\n".join(lines)


