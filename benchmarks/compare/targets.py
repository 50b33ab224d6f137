"""The performance targets of the comparison and their evaluation on a report's rows.

Per workload kind, against the fastest ewc_fast row of the task (``x plain`` = time / one plain
forward+backward over the same data, measured in the same process):

* MLP: Fisher <= 1.2x and Fisher+MAS <= 1.7x plain; Fisher no slower than BackPACK.
* Transformer: Fisher <= 2x plain; >= 3x faster than the fastest peer that gives the exact
  empirical Fisher within its tolerance; extra peak memory beyond the plain row's <= 2 parameter copies.
* CNN: Fisher <= 1.3x and Fisher+MAS <= 2.0x plain; Fisher >= 5x faster than BackPACK and than Opacus
  at equal results (the peer's row within its tolerance of the oracle; the ratio of the two rows'
  ``x plain``, as for the Hugging Face workloads); extra peak memory beyond the
  plain row's <= 2 parameter copies + one layer's activations (the largest output of a single layer
  over one batch, ``act_bytes`` of the workload), for Fisher and for Fisher+MAS.
* Hugging Face models (``hf-*``): Fisher <= 1.2x and Fisher+MAS <= 1.9x plain; Fisher >= 1.5x faster
  than the batch-1 loop (ratio of the two rows' ``x plain``); no parameter on the torch.func fallback
  (``meta["fallback"]`` empty on every ewc_fast row).

A target is ``met``, ``not met`` or ``n/a`` (no ewc_fast result, no peer result to compare with, or a
ratio that rests on too few or too scattered timings: :func:`unreliable`).
"""

from __future__ import annotations

from ..contenders import FISHER

TARGETS_DOC = """\
* MLP: Fisher <= 1.2x and Fisher+MAS <= 1.7x one plain forward+backward; Fisher no slower than BackPACK.
* Transformer: Fisher <= 2x plain; >= 3x faster than the fastest peer that gives the exact answer;
  extra peak memory <= 2 parameter copies (beyond what the plain forward+backward row needs: activations
  and one gradient copy are the unit's, not the method's).
* CNN: Fisher <= 1.3x and Fisher+MAS <= 2.0x plain; Fisher >= 5x faster than BackPACK and than Opacus at
  equal results (ratio of the two rows' `x plain`); extra peak memory beyond plain <= 2 parameter copies
  + one layer's activations (Fisher, Fisher+MAS)."""
HF_TARGETS_DOC = """\
* Hugging Face models: Fisher <= 1.2x and Fisher+MAS <= 1.9x plain; Fisher >= 1.5x faster than the
  batch-1 loop (per-sample-loop; the ratio of the two rows' `x plain`, each against its own interleaved
  plain runs); no parameter on the torch.func fallback (meta["fallback"] empty)."""

NO_RESULT = "ewc_fast did not produce a result"

#: a ratio needs at least this many timed repeats of the row and of its interleaved plain runs ...
MIN_REPEATS = 3
#: ... and neither may scatter by more than this factor (max / min): beyond it the median says more
#: about the machine's load than about the method
MAX_SPREAD = 2.0


def unreliable(row: dict) -> str | None:
    """Why ``row``'s ``x plain`` ratio cannot decide a target (too few repeats, or a max/min spread over
    :data:`MAX_SPREAD` in its own or its plain timings), or None when it can."""
    for what, t in (("its", row.get("time")), ("its plain", row.get("plain"))):
        if not t:
            continue
        if t.get("repeats", MIN_REPEATS) < MIN_REPEATS:
            return f"unreliable: {what} timing has {t['repeats']} repeat(s) (< {MIN_REPEATS})"
        if t.get("min_s") and t["max_s"] / t["min_s"] > MAX_SPREAD:
            return f"unreliable: {what} timings spread {t['max_s'] / t['min_s']:.1f}x (max/min > {MAX_SPREAD:g})"
    return None


def ok_rows(rows: list[dict], contender: str | None = None, task: str = "fisher", pred=None) -> list[dict]:
    """The timed, successful rows of ``task`` (of ``contender`` if given, satisfying ``pred`` if given)."""
    return [
        r
        for r in rows
        if r["status"] == "ok"
        and r["task"] == task
        and "time" in r
        and (contender is None or r["contender"] == contender)
        and (pred is None or pred(r))
    ]


def best_ewc_fast(rows: list[dict], task: str) -> dict | None:
    """The fastest successful ewc_fast row of ``task``, or None."""
    cands = ok_rows(rows, task=task, pred=lambda r: r["kind"] == "ewc_fast")
    return min(cands, key=lambda r: r["time"]["median_s"]) if cands else None


def evaluate_targets(report: dict) -> list[dict]:
    """One ``{workload, target, value, status, detail}`` per target of each workload in ``report``."""
    out = []

    def add(workload, target, value, met, detail=""):
        out.append(
            {
                "workload": workload,
                "target": target,
                "value": value,
                "status": "n/a" if met is None else ("met" if met else "not met"),
                "detail": detail,
            }
        )

    def ratio_to_plain(workload, target, row, limit):
        why = row and unreliable(row)
        if why:
            add(workload, target, f"{row['ratio_to_plain']:.2f}x", None, why)
            return
        add(
            workload,
            target,
            row and f"{row['ratio_to_plain']:.2f}x",
            row and row.get("ratio_to_plain", 9e9) <= limit,
            row["contender"] if row else NO_RESULT,
        )

    def speedup_over(workload, target, row, peer, limit, why_none, value="{sp:.2f}x"):
        """``row`` (ours) vs ``peer`` (their row): met when speed-up = peer time / our time >= limit;
        ``value`` formats the speed-up ``sp`` and the peer's name ``peer``."""
        if row and peer:
            sp = peer["time"]["median_s"] / row["time"]["median_s"]
            add(workload, target, value.format(sp=sp, peer=peer["contender"]), sp >= limit, row["contender"])
        else:
            add(workload, target, None, None, NO_RESULT if not row else why_none)

    by_wl: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_wl.setdefault(r["workload"], []).append(r)
    for wname, rows in by_wl.items():
        kind = report["workloads"][wname]["kind"]
        ef = best_ewc_fast(rows, "fisher")
        if kind == "mlp":
            ratio_to_plain(wname, "Fisher <= 1.2x plain fwd+bwd", ef, 1.2)
            ratio_to_plain(wname, "Fisher+MAS <= 1.7x plain fwd+bwd", best_ewc_fast(rows, "fisher+mas"), 1.7)
            bp = ok_rows(rows, "backpack")
            speedup_over(
                wname,
                "Fisher no slower than BackPACK",
                ef,
                bp[0] if bp else None,
                1.0,
                "BackPACK gave no result",
                value="{sp:.2f}x faster",
            )
        elif kind == "transformer":
            ratio_to_plain(wname, "Fisher <= 2x plain fwd+bwd", ef, 2.0)
            peers = ok_rows(
                rows,
                pred=lambda r: (
                    r["kind"] != "ewc_fast"
                    and r.get("exact")
                    and r["quantities"].get(FISHER, {}).get("oracle") == FISHER
                    and r.get("within_tolerance", True)
                ),
            )
            fastest = min(peers, key=lambda r: r["time"]["median_s"]) if peers else None
            speedup_over(
                wname,
                ">= 3x faster than the fastest exact peer",
                ef,
                fastest,
                3.0,
                "no exact peer gave a result",
                value="{sp:.2f}x vs {peer}",
            )
            tgt = "extra peak memory beyond plain fwd+bwd <= 2 parameter copies"
            if ef and ef.get("copies_over_plain") is not None:
                add(
                    wname,
                    tgt,
                    f"{ef['copies_over_plain']:.2f} copies ({ef['param_copies']:.2f} in all)",
                    ef["copies_over_plain"] <= 2.0,
                    ef["contender"],
                )
            else:
                add(wname, tgt, None, None, NO_RESULT if not ef else "memory not measured (in-process run)")
        elif kind == "hf":
            hf_targets(wname, rows, ef, add, ratio_to_plain)
        elif kind == "cnn":
            cnn_targets(wname, report["workloads"][wname], rows, ef, add, ratio_to_plain)
    return out


def cnn_targets(wname, wl, rows, ef, add, ratio_to_plain) -> None:
    """The CNN workloads' targets (module doc)."""
    ratio_to_plain(wname, "Fisher <= 1.3x plain fwd+bwd", ef, 1.3)
    ratio_to_plain(wname, "Fisher+MAS <= 2.0x plain fwd+bwd", best_ewc_fast(rows, "fisher+mas"), 2.0)
    # speed-up from the two rows' x-plain ratios (each against the plain runs interleaved in its own
    # process), as for the Hugging Face workloads: on a shared machine the load differs between rows
    for peer in ("backpack", "opacus"):
        pr = ok_rows(rows, peer, pred=lambda r: r.get("within_tolerance", True) and r.get("ratio_to_plain"))
        tgt = f">= 5x faster than {peer} at equal results"
        why = ef and pr and (unreliable(ef) or unreliable(pr[0]))
        if why:
            add(wname, tgt, None, None, why)
        elif ef and ef.get("ratio_to_plain") and pr:
            sp = pr[0]["ratio_to_plain"] / ef["ratio_to_plain"]
            how = f"x plain {pr[0]['ratio_to_plain']:.2f} / {ef['ratio_to_plain']:.2f}"
            add(wname, tgt, f"{sp:.2f}x ({how})", sp >= 5.0, ef["contender"])
        elif not ef:
            add(wname, tgt, None, None, NO_RESULT)
        else:
            why = f"{peer} gave no result" if not ok_rows(rows, peer) else f"{peer}'s result is not within tolerance"
            add(wname, tgt, None, None, why)
    act = wl.get("act_bytes")
    for task, row in (("Fisher", ef), ("Fisher+MAS", best_ewc_fast(rows, "fisher+mas"))):
        tgt = f"{task}: extra peak memory beyond plain <= 2 parameter copies + one layer's activations"
        if row and row.get("copies_over_plain") is not None and act and row.get("param_bytes"):
            limit = 2.0 + act / row["param_bytes"]
            value = f"{row['copies_over_plain']:.2f} copies (limit {limit:.2f}: 2 + {act / 2**20:.1f} MiB activations)"
            add(wname, tgt, value, row["copies_over_plain"] <= limit, row["contender"])
        elif not row:
            add(wname, tgt, None, None, NO_RESULT)
        elif not act:
            add(wname, tgt, None, None, "the workload's largest layer activation was not recorded")
        else:
            add(wname, tgt, None, None, "memory not measured (in-process run)")


def hf_targets(wname, rows, ef, add, ratio_to_plain) -> None:
    """The Hugging Face workloads' targets (module doc)."""
    ratio_to_plain(wname, "Fisher <= 1.2x plain fwd+bwd", ef, 1.2)
    ratio_to_plain(wname, "Fisher+MAS <= 1.9x plain fwd+bwd", best_ewc_fast(rows, "fisher+mas"), 1.9)
    # speed-up from the two rows' x-plain ratios (each against the plain runs interleaved in its own
    # process): on a shared machine the load differs between the rows' processes, not within one
    loop = ok_rows(rows, "per-sample-loop", pred=lambda r: r.get("ratio_to_plain") is not None)
    tgt = ">= 1.5x faster than the batch-1 loop"
    why = ef and loop and (unreliable(ef) or unreliable(loop[0]))
    if why:
        add(wname, tgt, None, None, why)
    elif ef and loop and ef.get("ratio_to_plain"):
        sp = loop[0]["ratio_to_plain"] / ef["ratio_to_plain"]
        how = f"x plain {loop[0]['ratio_to_plain']:.2f} / {ef['ratio_to_plain']:.2f}"
        add(wname, tgt, f"{sp:.2f}x faster ({how})", sp >= 1.5, ef["contender"])
    else:
        add(wname, tgt, None, None, NO_RESULT if not ef else "the batch-1 loop gave no result")
    ours = [r for r in rows if r["kind"] == "ewc_fast" and r["status"] == "ok" and "fallback" in r]
    fb = sorted({k for r in ours for k in r["fallback"]})
    add(
        wname,
        "no parameter on the torch.func fallback",
        (f"{len(fb)} parameter(s): {', '.join(fb[:3])}" + (" ..." if len(fb) > 3 else ""))
        if fb
        else "none"
        if ours
        else None,
        (not fb) if ours else None,
        ", ".join(sorted({r["contender"] for r in ours})) if ours else NO_RESULT,
    )
