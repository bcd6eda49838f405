"""The long-tail benchmark's results page (``longtail.py --report-only``): the template, how
to read the rows and each row's note come from ``longtail_page.md``; the tables from the
records (``paired_stats.py``)."""

import math
import os
import re

import longtail_rows as lr
import paired_stats as ps

from lvis_longtail.utils.io import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "segm/AP", "segm/APr",
                "segm/APc", "segm/APf", "segm/thin", "bbox/thin")  # fmt: skip
CLS_KEYS = ("bbox/APr", "bbox/AP", "bbox/APc", "bbox/APf", "segm/APr")
MASK_KEYS = ("segm/AP", "segm/APr", "segm/thin", "segm/APf", "bbox/AP")


def page_prose(path: str = os.path.join(REPO, "benchmarks", "longtail_page.md")) -> tuple:
    """``longtail_page.md``'s page template, how to read the rows, and ``{row: note}``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    how = re.search(r"## How to read the rows\n\n(.*?)\n\n", text, re.S).group(1)
    notes = dict(re.findall(r"^- `(\w+)`: (.+)$", text, re.M))
    return re.search(r"```markdown\n(.*?)\n```", text, re.S).group(1), how, notes


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def write_page(args, records: dict, stale, categories, datasets: dict) -> str:
    """Write ``<results>/longtail[_mode].md`` from ``records`` (those of the plan; the
    pre-training's is ``pretrain_seed0``; ``stale``: the keys of the others; ``datasets``: the
    generator options of each dataset folder)."""
    classes, table, sfx = ps.class_info(categories), lr.methods_by_name(), args.suffix
    runs = [r for r in records.values() if r["row"] in table]
    per_class = {}
    for rec in runs:
        per_class.setdefault(rec["row"], {})[rec["seed"]] = rec["per_class"]
    shown = [m for m in table.values() if m.name in per_class]

    def deltas(mask, keys):
        pairs = [(m.name, m.label, m.reference, table[m.reference].label) for m in shown
                 if m.reference and (m.group == "mask") == mask]  # fmt: skip
        return ps.delta_table(pairs, per_class, classes, keys)

    base = per_class.get(lr.BASELINE, {}).values()
    base_ap = _mean([ps.run_metrics(pc, classes)["bbox/AP"] for pc in base])
    pre = records.get("pretrain_seed0")
    head, how_to_read, notes = page_prose()
    flag = {"quick": " --quick", "cuda": " --device cuda"}.get(args.mode, "")
    fields = dict(mode=args.mode, sfx=sfx, flag=flag, wall=_mean([r["wall_s"] for r in runs]),
        runs=len(runs), iters=args.iters,
        spi=_mean([r["s_per_iter"] for r in runs if not table[r["row"]].base]),
        pre=(f"; pre-training {pre['wall_s'] / 60:.1f} min" if pre else "") + "".join(
            f"; {r['row'][len('pretrain_'):]}'s own pre-training {r['wall_s'] / 60:.1f} min"
            for r in records.values() if r["row"].startswith("pretrain_")) + ".",
        datasets="; ".join(f"`{name}`: `{opts}`" for name, opts in datasets.items()),
        val=datasets["lt_bench"]["num_val"], classes=len(categories),
        thin=sum(c.get("thin") is True for c in categories), threshold=args.repeat_threshold,
        longer="".join(f"; {', '.join(m.name for m in shown if m.schedule == x)}: {x:g}× that"
                       for x in sorted({m.schedule for m in shown} - {1.0})),
        device=args.device, seeds=", ".join(str(s) for s in sorted({r["seed"] for r in runs})),
        base_ap=base_ap, met="met" if base_ap >= 30 else "NOT met", pretrain=args.pretrain_iters,
        **{k: sum(c.get("frequency") == k for c in categories) for k in "rcf"})  # fmt: skip
    none = "- Initialisation: none (every row from scratch)."
    head = head if args.pretrain_iters else re.sub("^- Initialisation: .*$", none, head, flags=re.M)
    stale = ", ".join(stale)
    stale = stale and f" Records not shown (other overrides or pre-training): {stale}."
    summary = ps.summary_table([(m.name, m.label) for m in shown], per_class, classes, SUMMARY_KEYS)
    notes = "\n".join(f"- *{m.label}*: {notes[m.name]}" for m in shown if m.name in notes)
    tables = dict(summary=summary, cls=deltas(False, CLS_KEYS), mask=deltas(True, MASK_KEYS))
    lines = [head.format(**fields, **tables, how_to_read=how_to_read, stale=stale, notes=notes)]
    interpretation = os.path.join(args.results, f"longtail{sfx}_notes.md")
    if os.path.isfile(interpretation):
        with open(interpretation) as f:
            lines += ["", "## Interpretation", "", f.read()]
    path = os.path.join(args.results, f"longtail{sfx}.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path
