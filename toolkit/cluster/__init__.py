"""Fleets on Docker Swarm: fleet.yaml -> node classes -> one plan per class -> stack file, verified per replica."""
