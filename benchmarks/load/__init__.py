"""The load benchmark: the real site under gunicorn, driven by wrk (README.md beside this file)."""
