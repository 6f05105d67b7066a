"""`tierlm bench`: the standard workloads against a local engine or any OpenAI-compatible URL.

workloads.py defines them (what to send), targets.py sends one streamed request to an
engine or a server and times its tokens, runner.py runs a workload's levels and repeats
and summarises them (table + JSON), plots.py draws the PNGs.
"""
