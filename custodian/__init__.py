"""Custos custodian: the model owner's server and console.

The server (``custodian serve``) keeps the models encrypted at rest, the
deployments and their quota in a SQLite ledger with a hash-chained audit log,
enrols attested enclaves, pushes them the model and leases them inferences.
It listens on three sockets (see ``docs/protocol.md``): enrolment over TLS,
the enclave gateway over mutual TLS, and the admin API on a unix socket in the
data directory, which the console subcommands use (optionally also on TCP with
mutual TLS, ``admin_access``).

Modules, by job:

- ``config``: the server's configuration and its bounds; ``errors``: the error
  classes (mapped to gRPC status codes once, in ``_status``).
- ``quota``: pure quota arithmetic; ``ledger`` (with ``_schema``, ``_rows`` and
  the records of ``records``): storage; ``audit``: the audit log's hash chain,
  ``audit_file``: its export and offline verification.
- ``authority``: the TLS and enclave CAs; ``data_dir``: the data directory's ownership and
  modes; ``model_store``: models sealed at rest, ``model_check``: their load check.
- ``enrolment``, ``leases`` (with ``metering``: usage receipts), ``deployments``,
  ``roster`` (the enclave listing), ``control``: the domain services.
- ``gateway``, ``admin``: the gRPC servicers; ``server``: the running process;
  ``metrics``: its Prometheus metrics.
- ``console``: the admin API client; ``cli`` (with ``_cli_audit``, ``_cli_admin``, ``_cli_deployment``,
  ``_cli_args`` and ``_cli_output``): the ``custodian`` command.
"""
