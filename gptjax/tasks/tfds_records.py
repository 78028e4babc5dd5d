"""TFDS records of the paper's tasks as `Example`s (GLUE, SNLI/SciTail, RACE, Story Cloze).

Data sources return Text features as UTF-8 bytes and scalars as NumPy values; TFDS's mock
data gives str and 0-d arrays, which these accept as well.
"""

from collections.abc import Mapping
from typing import Any

from gptjax.tasks.spec import Example

RACE_ANSWERS = ("A", "B", "C", "D")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def glue_examples(
    record: Mapping[str, Any], fields: tuple[str, ...], regression: bool = False
) -> list[Example]:
    """A GLUE record as an Example; test splits have label -1 (-1.0 for STS-B): None."""
    if regression:
        score = float(record["label"])
        label = None if score < 0 else score
    else:
        index = int(record["label"])
        label = None if index < 0 else index
    texts = tuple(_text(record[field]) for field in fields)
    return [Example(texts=texts, label=label, uid=int(record["idx"]))]


def nli_examples(record: Mapping[str, Any]) -> list[Example]:
    """An SNLI or SciTail record; none for SNLI's pairs without a gold label (label -1).

    All SNLI splits are labelled; -1 marks pairs whose annotators did not agree, which the
    standard splits (and SNLI's reported accuracies) leave out.
    """
    label = int(record["label"])
    if label < 0:
        return []
    return [Example(texts=(_text(record["premise"]), _text(record["hypothesis"])), label=label)]


def flatten_race(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A TFDS ``race`` record (one article, several questions) as one record per question.

    The result has ``article``, ``question``, ``options`` (4), ``answer`` (index of the
    answer letter A-D), ``example_id`` (the article's file, e.g. ``high1234.txt``) and
    ``question_index`` (the question's place in that file), as stored by the
    ``gptjax_race`` builder.
    """
    questions, answers, options = record["questions"], record["answers"], record["options"]
    example_id = _text(record["example_id"])
    if not len(questions) == len(answers) == len(options):
        raise ValueError(
            f"RACE {example_id}: {len(questions)} questions, {len(answers)} answers and "
            f"{len(options)} option lists"
        )
    flat = []
    for index, (question, answer, choices) in enumerate(
        zip(questions, answers, options, strict=True)
    ):
        answer = _text(answer)
        if answer not in RACE_ANSWERS or len(choices) != len(RACE_ANSWERS):
            raise ValueError(
                f"RACE {example_id}: answer {answer!r} with {len(choices)} options, expected "
                f"one of {'/'.join(RACE_ANSWERS)} with {len(RACE_ANSWERS)}"
            )
        flat.append(
            {
                "article": _text(record["article"]),
                "question": _text(question),
                "options": [_text(choice) for choice in choices],
                "answer": RACE_ANSWERS.index(answer),
                "example_id": example_id,
                "question_index": index,
            }
        )
    return flat


def race_question_example(record: Mapping[str, Any]) -> list[Example]:
    """A per-question RACE record: context "article question", the 4 options as choices;
    its id the article's file and the question's place there (``high1234.txt/2``), as the
    RACE release names them (a record prepared before gptjax_race 1.1.0 has none)."""
    context = f"{_text(record['article'])} {_text(record['question'])}"
    choices = tuple(_text(option) for option in record["options"])
    uid = None
    if "question_index" in record:
        uid = f"{_text(record['example_id'])}/{int(record['question_index'])}"
    return [Example(texts=(context,), choices=choices, label=int(record["answer"]), uid=uid)]


def race_examples(record: Mapping[str, Any]) -> list[Example]:
    """A TFDS ``race`` record as one Example per question."""
    return [ex for flat in flatten_race(record) for ex in race_question_example(flat)]


def story_cloze_examples(record: Mapping[str, Any]) -> list[Example]:
    """A Story Cloze record; TFDS keeps the CSV's AnswerRightEnding (1 or 2, -1 if none)."""
    answer = int(record["label"])
    if answer not in (-1, 1, 2):
        raise ValueError(f"Story Cloze answer {answer}, expected 1 or 2 (or -1 for none)")
    endings = tuple(_text(ending) for ending in record["endings"])
    if len(endings) != 2:
        raise ValueError(f"Story Cloze story with {len(endings)} endings, expected 2")
    # TFDS already joined the four context sentences with spaces.
    label = None if answer == -1 else answer - 1
    return [Example(texts=(_text(record["context"]),), choices=endings, label=label)]
