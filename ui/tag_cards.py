"""Tags and caption confidence on the search page's cards: tag chips, a caption marked uncertain when its
confidence is below the index's threshold, and the hint to add tags to an index from before tags."""

from __future__ import annotations

import streamlit as st

from indexer.engine import Engine


def tag_chips(tags) -> str:  # noqa: ANN001 - retrieval.tagging.Tag sequence
    """Tags as badges: ``:blue-badge[cheeseburger 62%]`` (markdown)."""
    return " ".join(f":blue-badge[{t.name.replace(']', ')')} {t.probability:.0%}]" for t in tags)


def caption_ui(rank: int, hit) -> None:  # noqa: ANN001 - SearchHit
    """Rank, score, caption and tag chips of a result. A caption rated uncertain comes after the tags,
    greyed and marked, so the card never states it as if it were sure."""
    uncertain = bool(hit.caption) and hit.caption_is_confident is False
    head = f"**{rank}.** `{hit.score:.3f}`"
    if uncertain:
        st.markdown(f"{head} {tag_chips(hit.tags)}" if hit.tags else head)
        st.markdown(f":gray[*uncertain caption:* {hit.caption}]",
                    help=f"The caption model is not sure of this caption (confidence {hit.caption_confidence:.2f}).")
    else:
        st.markdown(f"{head} {hit.caption or ''}")
        if hit.tags:
            st.markdown(tag_chips(hit.tags))


def confidence_note(hit) -> str:  # noqa: ANN001 - SearchHit or None
    if hit is None or hit.caption_confidence is None:
        return ""
    sure = "confident" if hit.caption_is_confident else "**uncertain**"
    return f" ({sure}, confidence {hit.caption_confidence:.2f})"


@st.cache_data(max_entries=4, show_spinner=False)
def untagged(_engine: Engine, generation: int) -> int:
    """Images without tags (an index from before tags), when tags are on."""
    try:
        return _engine.untagged()
    except Exception:  # noqa: BLE001 - only a hint; the search itself reports real problems
        return 0
