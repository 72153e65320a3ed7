"""Launchers: how the Flower app is started and stopped on one or many machines.

Simulation (a private SuperLink + Ray), deployment (SuperLink + SuperNodes), the per-site command,
processes and the watchdog that makes them die with the run, TLS and network namespaces.
"""
