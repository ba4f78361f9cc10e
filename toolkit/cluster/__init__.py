"""Cluster: fleets on Docker Swarm. fleet.yaml -> node classes -> one plan per class (fleet.py, fleet_plan.py) ->
the stack file, gateway and per-host bundles (stack.py), the engine settings each GPU node needs (node_config.py),
and verification of every replica and the shared endpoint (verify.py).
"""
