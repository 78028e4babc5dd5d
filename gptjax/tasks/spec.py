"""What a fine-tuning task is: its examples, its input transformation, labels and metrics."""

import dataclasses
from collections.abc import Callable, Sequence

# The paper's four input transformations (Section 3.3, Figure 1 right).
KINDS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled (or, on a test split, unlabelled) example, as text.

    `texts` are the parts in the order the transformation reads them:
    classification (text,); entailment (premise, hypothesis); similarity (a, b);
    multiple choice (context,) with the candidate answers in `choices`.
    `label` is a class index (classification, entailment, similarity as classes, the
    correct choice of multiple choice), a float score (similarity as regression, STS-B),
    or None where the split has no labels (GLUE test sets).
    `uid` identifies the example in a submission file (GLUE's `idx`), else None.
    """

    texts: tuple[str, ...]
    label: int | float | None
    choices: tuple[str, ...] = ()
    uid: int | str | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: how to load each split and how to model and score it.

    `load(split, data_dir)` returns the split's examples; `data_dir` is where prepared
    datasets are cached (TFDS's data_dir). `label_names` are the classes in index order
    (empty for regression and multiple choice). `metrics` are names known to
    `gptjax.tasks.metrics`, the first being the one checkpoints are selected by.
    `paper` maps a metric to the paper's test-set number for it (in percent); a key
    "SPLIT/METRIC" gives one evaluation split its own number (MNLI's mismatched).
    `submission` maps a test split to a GLUE submission file name (e.g. "CoLA.tsv").
    `parts` maps a split that is other splits' examples one after the other (RACE's
    validation: its middle-school split, then its high-school one) to those splits, so
    that an evaluation of all of them predicts each example once.
    """

    name: str
    kind: str
    load: Callable[[str, str], Sequence[Example]]
    metrics: tuple[str, ...]
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    regression: bool = False
    num_choices: int = 0
    paper: dict[str, float] = dataclasses.field(default_factory=dict)
    submission: dict[str, str] = dataclasses.field(default_factory=dict)
    parts: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    description: str = ""

    @property
    def num_outputs(self) -> int:
        """Outputs of the linear head: classes, 1 for regression, 1 per choice."""
        if self.kind == "multiple_choice" or self.regression:
            return 1
        return len(self.label_names)
