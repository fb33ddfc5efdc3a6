"""ragbench: a RAG service and the harness that measures it under load.

Kept import-free on purpose: the load generator, balancer and autoscaler import from this
package and must not pull in torch.
"""
