# myapp/celery.py
from celery import Celery

import progress_sse

app = Celery("myapp", broker="redis://localhost:6379/3", include=["myapp.tasks"])
progress_sse.install(app)  # events go where the broker is: database 3 here
