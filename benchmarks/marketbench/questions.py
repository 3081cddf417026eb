"""The question set (``benchmarks/data/questions.json``) and the framing of
a session: the context opens with a ChatML system and user turn, the feed
lines follow, and a question closes the user turn and opens the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "questions.json"


@dataclass(frozen=True)
class Question:
    id: str
    kind: str  # last price, trend, range, volume spike, yes/no alert
    text: str


@dataclass(frozen=True)
class QuestionSet:
    system: str
    preamble: str
    context_template: str
    question_template: str
    max_tokens: int
    # Answers of exactly max_tokens tokens (no stop at end of sequence), so
    # every engine and every context decodes the same number of tokens.
    ignore_eos: bool
    questions: tuple[Question, ...]

    @classmethod
    def load(cls, path: str | Path | None = None) -> QuestionSet:
        raw = json.loads(Path(path or DEFAULT_PATH).read_text())
        qs = tuple(Question(q["id"], q["kind"], q["text"]) for q in raw["questions"])
        if len({q.id for q in qs}) != len(qs):
            raise ValueError("question ids must be unique")
        return cls(
            system=raw["system"],
            preamble=raw["preamble"],
            context_template=raw["context_template"],
            question_template=raw["question_template"],
            max_tokens=int(raw.get("max_tokens", 16)),
            ignore_eos=bool(raw.get("ignore_eos", False)),
            questions=qs,
        )

    def context_text(self, unit: str, line_format: str) -> str:
        """The text a session starts with (tokenized with special tokens)."""
        preamble = self.preamble.format(unit=unit, format=line_format)
        return self.context_template.format(system=self.system, preamble=preamble)

    def prompt(self, q: Question) -> str:
        """The question as asked after the stream (no special-token
        additions; the ChatML markers in it are the model's own tokens)."""
        return self.question_template.format(text=q.text)
