# myapp/tasks.py
import time

from progress_sse import set_message, set_progress, track

from .celery import app


def save(row: int) -> None:
    time.sleep(0.05)  # your real work


def deliver(address: str) -> None:
    time.sleep(0.05)  # your real work


@app.task
def import_rows(rows: int) -> dict[str, int]:
    set_message("Opening the file")  # no total yet: the bar is indeterminate
    time.sleep(1)
    for i in range(1, rows + 1):
        save(i)
        set_progress(i, rows, f"Imported {i} of {rows} rows")  # now it is determinate
    return {"imported": rows}


@app.task
def send_mails(count: int) -> dict[str, int]:
    addresses = [f"user{i}@example.com" for i in range(count)]
    for address in track(addresses, message="Sent {current} of {total}"):  # counts for you
        deliver(address)
    return {"sent": count}
