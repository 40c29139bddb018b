"""What a fold did: one record per batch norm (folded how, or left why) and model totals."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

from bnfold.reasons import Reason

Status = Literal["folded", "left"]


class Renderable(Protocol):
    @property
    def passed(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def render(self) -> str: ...


# The records are NamedTuples and the report a plain class, not dataclasses: making the classes costs a
# tenth of what dataclasses do, and a fold without verification never imports the dataclasses module.
class BnRecord(NamedTuple):
    """One batch norm: ``folded`` by ``pattern`` into ``into``, or ``left`` with a ``reason`` code.

    Runs of Mul/Add/Sub/Div by constants that fold without a batch norm get records too; ``op_type``
    tells them apart."""

    bn: str
    status: Status
    message: str
    pattern: str | None = None
    into: str | None = None
    reason: Reason | None = None
    scope: str = ""
    op_type: str = "BatchNormalization"

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class Totals(NamedTuple):
    bn_before: int
    bn_after: int
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int

    @classmethod
    def between(cls, before: tuple[int, int, int], after: tuple[int, int, int]) -> Totals:
        """From (batch norms, nodes, parameter bytes) counted before and after a fold."""
        return cls(before[0], after[0], before[1], after[1], before[2], after[2])


# The version of :meth:`FoldReport.to_dict`'s layout (docs/json-schema.md); raised whenever a key changes meaning.
JSON_SCHEMA = 2


class FoldReport:
    """The records of one fold, its totals, and (once verified) the verification's verdict; ``seconds``
    has the time each stage took, ``notes`` what the user should know about how the model was read or
    what the fold did to it (one line each). ``node_unit`` names what the totals' node counts count: graph
    nodes, or the modules of an ``nn.Module``."""

    def __init__(self, records: list[BnRecord] | None = None, totals: Totals | None = None,
                 verification: Renderable | None = None, seconds: dict[str, float] | None = None,
                 notes: list[str] | None = None, node_unit: str = "nodes") -> None:
        self.node_unit = node_unit
        self.records = [] if records is None else records
        self.totals = totals
        self.verification = verification
        self.seconds = {} if seconds is None else seconds
        self.notes = [] if notes is None else notes

    def __repr__(self) -> str:
        elementwise = len(self.folded) - len(self.folded_batchnorms)
        return (f"FoldReport({len(self.folded_batchnorms)} batch norms folded, {len(self.left)} left, "
                f"{elementwise} Mul/Add/Sub/Div nodes folded, totals={self.totals})")

    @property
    def folded(self) -> list[BnRecord]:
        """Every folded record: batch norms and Mul/Add/Sub/Div nodes folded without one."""
        return [r for r in self.records if r.status == "folded"]

    @property
    def folded_batchnorms(self) -> list[BnRecord]:
        return [r for r in self.folded if r.op_type == "BatchNormalization"]

    @property
    def left(self) -> list[BnRecord]:
        """The batch norms left (only batch norms are recorded when they stay)."""
        return [r for r in self.records if r.status == "left"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of docs/json-schema.md: counts of batch norms and of elementwise nodes apart."""
        batchnorms = [r for r in self.records if r.op_type == "BatchNormalization"]
        elementwise = [r for r in self.records if r.op_type != "BatchNormalization"]
        return {
            "schema": JSON_SCHEMA,
            "folded": len(self.folded_batchnorms),
            "left": len(self.left),
            "elementwise_folded": len(elementwise),
            "batchnorms": [r.to_dict() for r in batchnorms],
            "elementwise": [r.to_dict() for r in elementwise],
            "notes": list(self.notes),
            "totals": None if self.totals is None else self.totals._asdict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }

    def render(self) -> str:
        lines = [render_table(
            ["batch norm", "status", "pattern / reason", "into / why"],
            [
                [
                    _label(r),
                    r.status,
                    (r.pattern if r.status == "folded" else r.reason) or "",
                    (r.into if r.status == "folded" else r.message) or "",
                ]
                for r in self.records
            ],
        )] if self.records else ["no batch norms found"]
        if self.totals is not None:
            t = self.totals
            lines.append("")
            lines.append(
                f"batch norms {t.bn_before} -> {t.bn_after}   {self.node_unit} {t.nodes_before} -> {t.nodes_after}   "
                f"parameters {_bytes(t.param_bytes_before)} -> {_bytes(t.param_bytes_after)}"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        if self.verification is not None:
            lines.append("")
            lines.append(self.verification.render())
        return "\n".join(lines)


def _label(record: BnRecord) -> str:
    label = f"{record.scope}/{record.bn}" if record.scope else record.bn
    return label if record.op_type == "BatchNormalization" else f"{label} ({record.op_type})"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
