import os

# Keep the suite deterministic and friendly to a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
