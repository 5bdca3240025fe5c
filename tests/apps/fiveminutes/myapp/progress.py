# myapp/progress.py
from progress_sse.allowlist import AllowedTask, AllowList, integer

TASKS = AllowList(
    [
        AllowedTask("myapp.tasks.import_rows", {"rows": (integer(1, 10_000), 100)}),
        AllowedTask("myapp.tasks.send_mails", {"count": (integer(1, 1_000), 20)}),
    ],
    title="Start a job",
)
