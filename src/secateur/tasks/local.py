"""Local lm-eval tasks: four-choice items in a JSONL file beside a task YAML, read offline through
--include-path (secateur's built-in tasks are written this way)."""

from __future__ import annotations

import json
from pathlib import Path

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  chance: {chance}
  source: {source}
"""


def write_multiple_choice(directory: Path, task: str, items: list[dict], source: str, chance: float = 0.25) -> Path:
    """`items` ({question, choices, answer, ...}) and their task YAML into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{task}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (directory / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data, chance=chance, source=source))
    return directory
