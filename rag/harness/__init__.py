"""The experiment harness: one sweep point end to end, the SLURM launcher, aggregation,
plots and the report.

Torch-free by design (a test checks it): the sweep process only starts servers and sends
load; the models live in the server processes it starts.
"""
