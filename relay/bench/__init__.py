"""`fastrelay bench`: every relay path measured side by side in the namespace lab.

- paths.py: the paths as plug-ins (how to start each relay, what its clients need)
- runner.py: one scenario per path and subscriber count, the measured window, the figures
- measure.py: /proc counters (machine and process CPU, interface packets, eBPF run time)
- report.py: table, JSON document, PNG plots
"""
