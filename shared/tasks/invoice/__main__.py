"""``python -m llamaduo.tasks.invoice``: write the task's coverage dataset."""

from llamaduo.tasks.invoice.task import main

main()
