"""The site as deployed plus one probe URL, for the test that runs it under multi-worker gunicorn."""
