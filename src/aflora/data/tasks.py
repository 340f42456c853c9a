"""Task adapters: how a record becomes the user-turn text and the target the model must produce.

Records have one schema per task kind:

* classification / multiple choice: ``{"text": str, "label": int}`` (0-based class index)
* instruction: ``{"instruction": str, "context": str, "response": str, "category": str}``

No chat template is applied here; the model layer wraps :meth:`Task.prompt` in its own template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from aflora.data.sources import DataError

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple_choice"
INSTRUCTION = "instruction"
TASK_KINDS = (CLASSIFICATION, MULTIPLE_CHOICE, INSTRUCTION)

TEXT_SLOT = "{text}"
AG_NEWS_LABEL_WORDS = ("World", "Sports", "Business", "Technology")
SENTIMENT_LABEL_WORDS = ("negative", "neutral", "positive")
CHOICE_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Task:
    """What the model is asked (``prompt``) and what it should answer (``response``) for one record.

    ``template`` holds ``{text}`` where a classification / multiple-choice record's text goes; it is
    unused for instruction tasks, whose prompt is the instruction itself.
    """

    name: str
    kind: str
    label_words: tuple[str, ...] = ()
    template: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise DataError(f"task {self.name!r} has kind {self.kind!r}; expected one of {', '.join(TASK_KINDS)}.")
        if self.kind != INSTRUCTION and (len(self.label_words) < 2 or TEXT_SLOT not in self.template):
            raise DataError(
                f"{self.kind} task {self.name!r} needs at least two label words and a template containing "
                f"{TEXT_SLOT!r}; got label words {self.label_words} and template {self.template!r}."
            )

    def prompt(self, record: dict) -> str:
        """The user-turn text for ``record``."""
        if self.kind == INSTRUCTION:
            return instruction_prompt(record["instruction"], record.get("context", ""))
        return self.template.replace(TEXT_SLOT, record["text"])

    def response(self, record: dict) -> str:
        """The target text: the label word (classification / multiple choice) or the reference response."""
        if self.kind == INSTRUCTION:
            return record["response"]
        return self.label_words[self.label(record)]

    def label(self, record: dict) -> int | None:
        """The 0-based class index, or None for instruction tasks."""
        if self.kind == INSTRUCTION:
            return None
        return int(record["label"])

    def label_for_word(self, word: str) -> int:
        """The class index of a label word, ignoring case and surrounding whitespace."""
        wanted = word.strip().lower()
        for index, label_word in enumerate(self.label_words):
            if label_word.lower() == wanted:
                return index
        raise DataError(
            f"{word!r} is not a label word of task {self.name!r}; expected one of {', '.join(self.label_words)}."
        )


def classification_task(name: str, label_words: Sequence[str], *, instruction: str, text_heading: str) -> Task:
    """Article first, question last: the model reads the text before the instruction to answer it."""
    template = f"{instruction}\n\n{text_heading}: {TEXT_SLOT}\n\nAnswer with one word."
    return Task(name=name, kind=CLASSIFICATION, label_words=tuple(label_words), template=template)


def topic_classification_task(
    label_words: Sequence[str] = AG_NEWS_LABEL_WORDS, *, instruction: str | None = None
) -> Task:
    """AG News-style topic classification; the default prompt scored 49% zero-shot with SmolLM2-135M-Instruct."""
    if instruction is None:
        instruction = f"Classify the topic of this news article as {join_choices(label_words)}."
    return classification_task("topic_classification", label_words, instruction=instruction, text_heading="Article")


def sentiment_task(label_words: Sequence[str] = SENTIMENT_LABEL_WORDS, *, instruction: str | None = None) -> Task:
    """Financial sentiment in the shared label order negative=0, neutral=1, positive=2."""
    if instruction is None:
        instruction = f"Classify the sentiment of this financial text as {join_choices(label_words)}."
    return classification_task("financial_sentiment", label_words, instruction=instruction, text_heading="Text")


def multiple_choice_task(instruction: str = "Answer the following multiple choice question.") -> Task:
    """MMLU-style: the record text already shows the question and its lettered choices."""
    template = f"{instruction}\n\n{TEXT_SLOT}\n\nAnswer with the letter {join_choices(CHOICE_LETTERS)}."
    return Task(name="multiple_choice", kind=MULTIPLE_CHOICE, label_words=CHOICE_LETTERS, template=template)


def instruction_task() -> Task:
    """Dolly-style open generation: the response is free text, there are no labels."""
    return Task(name="instruction_following", kind=INSTRUCTION)


def instruction_prompt(instruction: str, context: str = "") -> str:
    if context and context.strip():
        return f"{instruction}\n\nContext: {context}"
    return instruction


def join_choices(words: Sequence[str]) -> str:
    """'World, Sports, Business or Technology'."""
    words = list(words)
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} or {words[-1]}"


def format_multiple_choice(question: str, choices: Sequence[str]) -> str:
    """The question, then one 'A. choice' line per choice."""
    if len(choices) != len(CHOICE_LETTERS):
        raise DataError(
            f"a multiple-choice question needs {len(CHOICE_LETTERS)} choices, got {len(choices)}: {question[:80]!r}."
        )
    lines = [question.strip()] + [
        f"{letter}. {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, choices, strict=True)
    ]
    return "\n".join(lines)


# AG News was scraped with HTML entities whose '&' got lost ("#39;" for an apostrophe) and with
# backslashes where the source had line breaks.
_AG_NEWS_ESCAPES = (("#39;", "'"), ("#36;", "$"), ("quot;", '"'), ("\\", " "), (" amp;", " &"))
_RUNS_OF_SPACE = re.compile(r"\s+")


def clean_news_text(text: str) -> str:
    """Undo AG News's broken HTML escapes and collapse runs of whitespace."""
    for escaped, plain in _AG_NEWS_ESCAPES:
        text = text.replace(escaped, plain)
    return _RUNS_OF_SPACE.sub(" ", text).strip()
