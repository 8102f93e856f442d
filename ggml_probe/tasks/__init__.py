"""Tasks: declarative definitions (ggml_probe/tasks/defs/*.toml) and the examples built from their data.

    from ggml_probe.tasks import get_task, load_examples
    data = load_examples(get_task("boolq"), data_path="boolq_validation.jsonl", limit=100)
    data.examples[0].prompt, data.examples[0].gold, data.labels

Adding a task is adding a TOML file to defs/ (see spec.py for the format), or passing the path
of one to get_task. `make_task` builds a task from arguments for a local file.
"""

from .loading import (
    OFFLINE_TASK,
    BadRow,
    Example,
    TaskData,
    fetch_hub_file,
    hub_offline,
    load_examples,
)
from .answers import Answer, label_answers, label_continuation
from .readers import SUPPORTED_SUFFIXES
from .spec import (
    BuiltinSource,
    FittedPrompt,
    HubSource,
    TaskSpec,
    Tokenizer,
    get_task,
    list_tasks,
    load_task_file,
    make_task,
    parse_label_map,
    positional_gold_values,
)

__all__ = [
    "OFFLINE_TASK",
    "Answer",
    "SUPPORTED_SUFFIXES",
    "BadRow",
    "BuiltinSource",
    "Example",
    "FittedPrompt",
    "HubSource",
    "TaskData",
    "TaskSpec",
    "Tokenizer",
    "fetch_hub_file",
    "get_task",
    "hub_offline",
    "label_answers",
    "label_continuation",
    "list_tasks",
    "load_examples",
    "load_task_file",
    "make_task",
    "parse_label_map",
    "positional_gold_values",
]
