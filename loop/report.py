"""What the demo reports per round: ``report.json``, ``report.md`` and a plot of mAP50-95 against labels.

``report.json`` holds ``{"rounds": [...], ...}``; round 0 is the first model before any curation.
Every round records what was curated (batch size, labels in total, the dataset version), what
was trained and whether it passed the gate, what the edge runs afterwards (each agent's heartbeat),
how good the registered model is on the shifted world's frozen test split, what the cameras did
(frames seen, kept, uploaded, bytes) and the seconds each stage took.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Gate:
    passed: bool
    reason: str


@dataclass
class RoundReport:
    """One round of the loop (round 0: the first model, before any curation)."""

    round: int
    batch_size: int
    labels_total: int
    dataset_version: str
    model_version: str
    gate: Gate
    edge_model_version: dict[str, str]
    map50: float
    map50_95: float
    frames_seen: int
    frames_kept: int
    frames_uploaded: int
    bytes_uploaded: int
    flow_run_id: str
    seconds: dict[str, float] = field(default_factory=dict)
    #: Per camera, the share of the frames it scored this round that it kept (random picks included).
    keep_share: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoReport:
    """The whole run: its settings, the rounds, and the plain word that the curator was an oracle."""

    world: str
    curator: str
    rounds: list[RoundReport] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, out: Path) -> list[Path]:
        """Write report.json, report.md and map.png into ``out``; returns the files written."""
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "report.json", out / "report.md", out / "map.png"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths[1].write_text(self.markdown())
        self.plot(paths[2])
        return paths

    def markdown(self) -> str:
        lines = [
            "# edgeloop demo report",
            "",
            f"World: {self.world}. Curator: {self.curator}.",
            "",
            "| round | batch | labels | dataset | model | gate | edge runs | mAP50 | mAP50-95 | frames seen / kept / "
            "uploaded | kept per camera | MB uploaded | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rounds:
            edge = ", ".join(f"{dev}: {v}" for dev, v in sorted(r.edge_model_version.items())) or "-"
            gate = ("passed" if r.gate.passed else "rejected") + (f" ({r.gate.reason})" if r.gate.reason else "")
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r.seconds.items())
            kept = ", ".join(f"{cam} {share:.0%}" for cam, share in sorted(r.keep_share.items())) or "-"
            lines.append(
                f"| {r.round} | {r.batch_size} | {r.labels_total} | {r.dataset_version or '-'} | "
                f"{r.model_version or '-'} | {gate} | {edge} | {r.map50:.3f} | {r.map50_95:.3f} | "
                f"{r.frames_seen} / {r.frames_kept} / {r.frames_uploaded} | {kept} | {r.bytes_uploaded / 1e6:.1f} | "
                f"{stages} |"
            )
        if len(self.rounds) > 1:
            first, last = self.rounds[0], self.rounds[-1]
            lines += [
                "",
                f"mAP50-95 on the shifted world's test split: {first.map50_95:.3f} (round 0) -> {last.map50_95:.3f} "
                f"(round {last.round}) with {last.labels_total - first.labels_total} curated labels.",
            ]
        if self.urls:
            lines += ["", *(f"- {name}: {url}" for name, url in self.urls.items())]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [r.labels_total for r in self.rounds]
        ax.plot(labels, [r.map50_95 for r in self.rounds], marker="o", label="mAP50-95")
        ax.plot(labels, [r.map50 for r in self.rounds], marker="s", linestyle="--", label="mAP50")
        for r in self.rounds:
            ax.annotate(f"r{r.round}", (r.labels_total, r.map50_95), textcoords="offset points", xytext=(4, -12))
        ax.set_xlabel("labels in the training set")
        ax.set_ylabel("test mAP (shifted world)")
        ax.set_title("edgeloop demo: the edge model, round by round")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
