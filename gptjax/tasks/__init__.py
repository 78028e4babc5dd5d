"""Supervised tasks for fine-tuning: what a task is (`spec`), where its examples come
from (TFDS builders, the offline BBC News demo task, users' files), how examples become
model inputs (`transforms`) and how predictions are scored (`metrics`)."""
