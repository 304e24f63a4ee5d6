"""Sidebar widgets for the imported catalogue fields (``pixquery meta import``), turned into the same
conditions as ``--where`` (``category=shoes|hats``, ``price>=10``, ``price<=50``), plus a box for any
other condition. The conditions are typed and checked by the Engine (bound parameters only)."""

from __future__ import annotations

from datetime import date

import streamlit as st

from indexer.engine import Engine
from indexer.storage.catalogue import parse_condition

MAX_CHOICES = 50  # a text field with more distinct values gets a "contains" box instead of a list


@st.cache_data(max_entries=4, show_spinner=False)
def catalogue_widgets(_engine: Engine, generation: int, stamp: str) -> list[dict]:
    """[{name, kind, choices}] of the catalogue fields: text values (when few) or (min, max)."""
    out = []
    for field in _engine.catalogue.fields():
        choices = _engine.catalogue.choices(field["name"], MAX_CHOICES + 1)
        out.append({"name": field["name"], "kind": field["kind"], "choices": choices})
    return out


def _number_step(low: float, high: float) -> float:
    return 1.0 if float(low).is_integer() and float(high).is_integer() else 0.01


def restore(where: list[str], fields: list[dict]) -> None:
    """Put conditions from the URL back into the widgets (before they are drawn): ``f=a|b`` into a
    field's list, ``f>=x`` / ``f<=y`` into its range, anything else into the conditions box."""
    kinds = {f["name"]: f for f in fields}
    rest = []
    for spec in where:
        try:
            cond = parse_condition(spec)
        except Exception:  # noqa: BLE001 - a bad URL value becomes a visible condition the Engine rejects
            rest.append(spec)
            continue
        field = kinds.get(cond.field)
        if field and field["kind"] == "text" and cond.op == "=" and isinstance(field["choices"], list) \
                and len(field["choices"]) <= MAX_CHOICES:
            st.session_state[f"m_{cond.field}"] = [v for v in cond.value.split("|") if v in field["choices"]]
        elif field and field["kind"] in ("number", "date") and cond.op in (">=", "<=") and None not in field["choices"]:
            low, high = st.session_state.get(f"m_{cond.field}", field["choices"])
            try:
                value = float(cond.value) if field["kind"] == "number" else date.fromisoformat(cond.value)
            except ValueError:
                rest.append(spec)
                continue
            st.session_state[f"m_{cond.field}"] = (value, high) if cond.op == ">=" else (low, value)
        else:
            rest.append(spec)
    if rest:
        st.session_state["f_where"] = "\n".join(rest)


def catalogue_ui(fields: list[dict]) -> list[str]:
    """The widgets for ``fields`` in the sidebar -> the conditions they set (plus the free ones)."""
    sb = st.sidebar
    conds: list[str] = []
    if fields:
        sb.caption("Catalogue fields")
    for field in fields:
        name, kind, choices = field["name"], field["kind"], field["choices"]
        key = f"m_{name}"
        if kind == "text" and len(choices) <= MAX_CHOICES:
            picked = sb.multiselect(name, sorted(choices, key=str.casefold), key=key)
            if picked:
                conds.append(f"{name}={'|'.join(picked)}")
        elif kind == "text":
            text = sb.text_input(f"{name} contains", key=key, max_chars=200)
            if text.strip():
                conds.append(f"{name}~{text.strip()}")
        elif None not in choices:
            low, high = choices
            if low == high:
                continue
            if kind == "number":
                step = _number_step(low, high)
                low, high = float(low), float(high)
                st.session_state.setdefault(key, (low, high))
                picked = sb.slider(name, low, high, step=step, key=key)
            else:
                st.session_state.setdefault(key, (low, high))
                picked = sb.slider(name, low, high, key=key)
            shown = (lambda v: f"{v:g}") if kind == "number" else str  # noqa: E731
            if picked[0] > low:
                conds.append(f"{name}>={shown(picked[0])}")
            if picked[1] < high:
                conds.append(f"{name}<={shown(picked[1])}")
    free = sb.text_area("Other conditions", key="f_where", height=68,
                        placeholder="one per line, e.g. price<50 or title~linen",
                        help="FIELD OP VALUE with OP one of = != < <= > >= ~ (contains); a|b for any of") \
        if fields or st.session_state.get("f_where") else ""
    conds += [line.strip() for line in (free or "").splitlines() if line.strip()]
    return conds
