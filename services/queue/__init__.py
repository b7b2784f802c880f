"""The job queue that the control plane and the workers share: the Celery app's broker and settings
(``broker.py``), handing a job to the broker (``publish.py``) and the sweeper that requeues stalled jobs and
republishes lost messages (``reaper.py``). The API and the workers both import from here, never from each
other."""
