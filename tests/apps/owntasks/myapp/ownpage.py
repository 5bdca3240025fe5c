# myapp/ownpage.py
from flask import Flask, render_template

from progress_sse.tokens import watch_token

from .tasks import import_rows

app = Flask(__name__)


@app.get("/")
def home():
    return '<form method="post" action="/import"><button>Import 50 rows</button></form>'


@app.post("/import")
def start_import():
    task = import_rows.delay(50)
    return render_template("import.html", task_id=task.id, token=watch_token([task.id]))
