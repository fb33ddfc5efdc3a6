"""Processes: launching servers and replicas (locally or as SLURM jobs), the load balancer
and the autoscaler of the scaling variant.  Never imports torch."""
