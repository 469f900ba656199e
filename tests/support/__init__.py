"""What the test suites and the benchmarks share, in one place (docs/adr/0006-layout.md).

- `data`: the organization and project ids, the token maker, tags, the seeded CybeDefend double,
  and the leak assertion.
- `config`: the one bridge-config builder (a raw config dict, or parsed `Settings`).
- `procs`: the one process wrapper (`ChildProcess`), `free_port`, `wait_for`, a loopback `http`.
- `openbao`: the real OpenBao launcher, with hvac helpers.
- `daemon`: `cybedefend-bridge run` as a child process (`DaemonProc`) and the `Stack` around it.
- `fakes`, `fake_source`, `cybedefend_mock`: the in-memory fakes of the ports and of the API.

`bench/` imports this package; nothing under `tests/` imports `bench/` (tests/test_layout.py).
"""
