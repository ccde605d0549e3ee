"""Drivers for independent MoQ implementations used as interop peers and benchmark anchors.

Each driver runs as its own process (`python -m relay.interop.<name> ...`), so a test or a
benchmark can place it in any network namespace and end it by PID. `moq_rs` drives the PyPI
package `moq-rs` (import name `moq`): server/relay, synthetic publisher, verifying subscriber.
"""
