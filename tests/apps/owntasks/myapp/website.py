# myapp/website.py
from flask import Flask, redirect

from progress_sse.tokens import watch_token

from .tasks import import_rows

app = Flask(__name__)


@app.get("/")
def home():
    return '<form method="post" action="/import"><button>Import 50 rows</button></form>'


@app.post("/import")
def start_import():
    task = import_rows.delay(50)  # this user's own task, so theirs to watch
    token = watch_token([task.id])  # signed with PROGRESS_SSE_SECRET; expires in an hour
    return redirect(f"http://localhost:8000/tasks/{task.id}#token={token}")
