"""The one table format of bench/: rows {name, value, unit, baseline, ratio, target, pass, note}."""
from __future__ import annotations


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def format_rows(rows: list[dict]) -> str:
    """An aligned text table (name, unit, target, note left-aligned; numbers right-aligned)."""
    head = ("name", "value", "unit", "baseline", "ratio", "target", "pass", "note")
    cells = [[_cell(r.get(k)) for k in head] for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c[i].ljust(w[i]) if i in (0, 2, 5, 7) else c[i].rjust(w[i]) for i in range(len(head))).rstrip()
              for c in cells]
    return "\n".join(lines)
