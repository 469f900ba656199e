"""Fault, load and security suite (issue 6): crashes, outages, throttling, hostile input, HA."""
