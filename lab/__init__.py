"""The l3ptp test and benchmark harness (docs/lab.md): namespaces, hosts, demo, bench, booted machines.

It runs as root from the checkout and is never installed: nothing under
`l3ptp.*` imports it.
"""
