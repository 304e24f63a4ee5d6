"""The catalogue part of the :class:`~indexer.storage.store.Store`: imported metadata rows, in their own
file to keep the store readable (``Store`` inherits these methods; they use its private sessions)."""

from __future__ import annotations

from typing import Iterable

from sqlalchemy import delete, func, select

from indexer.errors import InputError
from indexer.storage import catalogue
from indexer.storage.schema import CatalogueField, CatalogueValue, ImageRow, utcnow


class CatalogueRows:
    """Reads and writes of catalogue fields and values (``pixquery meta``); mixed into ``Store``."""

    def import_catalogue(self, fields: dict[str, tuple[str, bool]], rows: list[tuple[int, dict[str, object]]],
                         replace: bool = False) -> dict[str, int]:
        """Write imported catalogue values in one transaction: ``fields`` {name: (kind, keyword)} are
        registered (a field keeps its kind), and for each (image id, {field: value or None}) the image's
        values of these fields become these (None: none). ``replace``: every catalogue field and value
        goes first. Returns the number of values written. Nothing is written when anything fails."""
        with self._session() as s:
            conn = s.connection()
            if replace:
                s.execute(delete(CatalogueValue))
                s.execute(delete(CatalogueField))
            known = {f.name: f for f in s.scalars(select(CatalogueField))}
            keywords_changed = False
            for name, (kind, keyword) in fields.items():
                field = known.get(name)
                if field is None:
                    s.add(CatalogueField(name=name, kind=kind, keyword=keyword))
                    keywords_changed |= keyword
                    continue
                if field.kind != kind:
                    raise InputError(f"{name} is a {field.kind} field already; drop it first to import it as "
                                     f"{kind} (pixquery meta drop {name})")
                keywords_changed |= field.keyword != keyword
                field.keyword, field.imported_at = keyword, utcnow()
            s.flush()
            written, removed, changed = catalogue.replace_values(conn, {n: k for n, (k, _) in fields.items()}, rows)
            if self.catalogue is not None:
                if keywords_changed or replace:
                    self.catalogue.rebuild(conn)
                elif any(keyword for _, keyword in fields.values()):
                    self.catalogue.refresh(conn, changed)
            return {"written": written, "removed": removed, "images": len(changed)}

    def drop_catalogue_field(self, name: str) -> int:
        """Forget catalogue field ``name`` and its values; returns how many values went."""
        with self._session() as s:
            field = s.get(CatalogueField, name)
            if field is None:
                raise InputError(f"no catalogue field {name!r}")
            n = s.execute(delete(CatalogueValue).where(CatalogueValue.field == name)).rowcount
            s.delete(field)
            s.flush()
            if self.catalogue is not None and field.keyword:
                self.catalogue.rebuild(s.connection())
            return int(n or 0)

    def catalogue_fields(self) -> list[dict]:
        """[{name, kind, keyword, values}] of every catalogue field, by name."""
        with self._session() as s:
            counts = dict(s.execute(select(CatalogueValue.field, func.count()).group_by(CatalogueValue.field)).all())
            return [{"name": f.name, "kind": f.kind, "keyword": f.keyword, "values": int(counts.get(f.name, 0))}
                    for f in s.scalars(select(CatalogueField).order_by(CatalogueField.name))]

    def catalogue_kinds(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return catalogue.field_kinds(conn)

    def catalogue_values(self, ids: Iterable[int]) -> dict[int, dict[str, object]]:
        """{id: {field: value}} of those ``ids`` that have catalogue values."""
        with self.engine.connect() as conn:
            return catalogue.values_of(conn, list(ids))

    def catalogue_texts(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: the text of its keyword fields} (what the ``meta`` signal scores)."""
        with self.engine.connect() as conn:
            return catalogue.keyword_texts(conn, list(ids))

    def catalogue_choices(self, name: str, kind: str, limit: int = 50) -> list | tuple:
        """Distinct text values (most frequent first, at most ``limit``) or the (min, max) of a number/date field."""
        with self.engine.connect() as conn:
            if kind == "text":
                return catalogue.distinct_texts(conn, name, limit)
            return catalogue.value_range(conn, name, kind)

    def key_lookup(self) -> list[tuple[int, str, str]]:
        """(id, path, content hash) of every image: what catalogue rows are matched against."""
        with self.engine.connect() as conn:
            return [(int(i), p, h) for i, p, h in conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.content_hash))]
